"""The image augmentations MAE uses, written in torch (torchvision does not
import beside this CPU torch): random resized crop and horizontal flip for pretraining,
and for fine-tuning RandAugment and random erasing (`FinetuneAugmentations`, MAE's
rand-m9-mstd0.5-inc1 and reprob 0.25). Each works on [..., C, H, W]: a clip's frames
[T, C, H, W] get one crop box, one flip and one draw of ops (video)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from polymae.shared.config import bounded, build
from polymae.shared.errors import ConfigError


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect in `ratio`
    (ten tries, then the largest centred crop within `ratio`, as torchvision does).
    The draws of all ten tries come from one call: per image, the generator's call
    overhead was a fifth of the whole crop-and-resize."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_aspect, u_top, u_left in torch.rand(10, 4, generator=generator).tolist():
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_aspect)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            # uniform over the height - h + 1 (width - w + 1) places, as randint would be
            return min(int(u_top * (height - h + 1)), height - h), min(int(u_left * (width - w + 1)), width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., C, H, W] -> [..., C, *size] of the same dtype, bilinear with antialiasing: one
    image, or the frames of a clip [T, C, H, W] resized alike in one call.

    uint8 stays uint8: PyTorch's vectorised uint8 kernel (channels-last, as images
    decode) is ~5x faster than resizing floats, and the pixels stay 1 byte each all
    the way to the loader."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    # a crop of a channels-last image is no longer dense: without this copy PyTorch falls back to a
    # planar kernel that is slower and hands back a planar image, which patchify then gathers slowly
    lead = image.shape[:-3]
    frames = image.reshape(-1, *image.shape[-3:]).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def random_resized_crop(image: Tensor, size: tuple[int, int], scale: tuple[float, float],
                        ratio: tuple[float, float], generator: torch.Generator) -> Tensor:
    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], scale, ratio, generator)
    return resize(image[..., top:top + h, left:left + w], size)


def random_hflip(image: Tensor, generator: torch.Generator) -> Tensor:
    return image.flip(-1) if float(torch.rand((), generator=generator)) < 0.5 else image


# -- fine-tuning: RandAugment and random erasing ------------------------------------------------------

@dataclass
class FinetuneAugmentations:
    """An image stream's `finetune.augment`: what MAE's fine-tuning adds to crop and flip.
    MAE: randaug_n 2, randaug_m 9, randaug_mstd 0.5 (timm's rand-m9-mstd0.5-inc1), erase_prob 0.25."""
    randaug_n: int = bounded(0, 0, 15)             # RandAugment ops drawn per image (with replacement); 0 = off
    randaug_m: float = bounded(9.0, 0.0, 10.0)     # their magnitude, out of 10
    randaug_mstd: float = bounded(0.5, 0.0)        # each op's magnitude ~ N(m, mstd), clipped to [0, 10]
    randaug_prob: float = bounded(0.5, 0.0, 1.0)   # a drawn op is applied with this probability (timm's)
    erase_prob: float = bounded(0.0, 0.0, 1.0)     # random erasing of one box per image; 0 = off
    erase_area: tuple[float, float] = bounded((0.02, 1 / 3), 0.0, 1.0, low_open=True)  # box area / image area
    erase_aspect: float = bounded(0.3, 0.0, 1.0, low_open=True)  # box aspect in [erase_aspect, 1 / erase_aspect]

    def __post_init__(self):
        if self.erase_area[0] > self.erase_area[1]:
            raise ConfigError(f"finetune.augment.erase_area must be (low, high) with low <= high, got {self.erase_area}")

    @property
    def active(self) -> bool:
        return bool(self.randaug_n) or self.erase_prob > 0


def _grey(x: Tensor) -> Tensor:
    """PIL's L conversion of [..., C, H, W] floats (C 1 or 3) -> [..., 1, H, W]."""
    if x.shape[-3] == 1:
        return x
    return (x * x.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(-3, keepdim=True)


def _blend(degenerate: Tensor, x: Tensor, factor: float) -> Tensor:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate)."""
    return degenerate + factor * (x - degenerate)


def _affine(x: Tensor, matrix: tuple[float, ...], fill: Tensor) -> Tensor:
    """PIL's Image.transform(AFFINE): output pixel (u, v) (continuous, pixel centres at +0.5) reads the
    input at (a u + b v + c, d u + e v + f), bilinear; what falls outside is `fill` [C]."""
    *lead, c, h, w = x.shape
    a, b, cc, d, e, f = matrix
    v, u = torch.meshgrid(torch.arange(h, dtype=x.dtype) + 0.5, torch.arange(w, dtype=x.dtype) + 0.5, indexing="ij")
    grid = torch.stack([(a * u + b * v + cc) * 2 / w - 1, (d * u + e * v + f) * 2 / h - 1], dim=-1)
    frames = torch.cat([x.reshape(-1, c, h, w), torch.ones_like(x.reshape(-1, c, h, w)[:, :1])], dim=1)
    out = F.grid_sample(frames, grid.expand(frames.shape[0], h, w, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    inside = out[:, -1:]
    return (out[:, :-1] + (1 - inside) * fill.view(1, c, 1, 1)).reshape(*lead, c, h, w)


def _sign(flip: bool) -> float:
    return -1.0 if flip else 1.0


def _auto_contrast(x, level, flip, fill):
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    stretched = (x - lo) * 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, stretched, x)


def _equalize(x, level, flip, fill):
    """PIL's ImageOps.equalize, per channel plane."""
    planes = x.reshape(-1, x.shape[-2] * x.shape[-1]).round().long().clamp(0, 255)
    out = torch.empty_like(planes)
    for i, plane in enumerate(planes):
        hist = torch.bincount(plane, minlength=256)
        step = (int(hist.sum()) - int(hist[hist.nonzero().max()])) // 255
        if step == 0:
            out[i] = plane
            continue
        lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(max=255)
        out[i] = lut[plane]
    return out.reshape(x.shape).to(x.dtype)


def _invert(x, level, flip, fill):
    return 255 - x


def _rotate(x, level, flip, fill):
    angle = -math.radians(30 * level * _sign(flip))  # counter-clockwise, as PIL's Image.rotate
    h, w = x.shape[-2:]
    cos, sin, cx, cy = math.cos(angle), math.sin(angle), w / 2, h / 2
    return _affine(x, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), fill)


def _posterize(x, level, flip, fill):  # timm's PosterizeIncreasing: 4 bits at level 0, 0 at level 1
    shift = 8 - (4 - int(level * 4))
    return ((x.round().long() >> shift) << shift).to(x.dtype)


def _solarize(x, level, flip, fill):  # SolarizeIncreasing: threshold 256 -> 0
    return torch.where(x >= 256 - int(level * 256), 255 - x, x)


def _solarize_add(x, level, flip, fill):
    return torch.where(x < 128, (x + int(level * 110)).clamp(max=255), x)


def _enhance_factor(level, flip):  # timm's *Increasing enhancements: 1 +- 0.9 level
    return 1.0 + 0.9 * level * _sign(flip)


def _colour(x, level, flip, fill):
    return _blend(_grey(x), x, _enhance_factor(level, flip))


def _contrast(x, level, flip, fill):
    mean = (_grey(x).mean(dim=(-3, -2, -1), keepdim=True) + 0.5).floor()
    return _blend(mean, x, _enhance_factor(level, flip))


def _brightness(x, level, flip, fill):
    return _blend(torch.zeros_like(x), x, _enhance_factor(level, flip))


def _sharpness(x, level, flip, fill):
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13), border pixels kept."""
    *lead, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    kernel = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]).div(13).view(1, 1, 3, 3)
    smooth = F.conv2d(x.reshape(-1, 1, h, w), kernel).round().reshape(*lead, c, h - 2, w - 2)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, _enhance_factor(level, flip))


def _shear_x(x, level, flip, fill):
    return _affine(x, (1, 0.3 * level * _sign(flip), 0, 0, 1, 0), fill)


def _shear_y(x, level, flip, fill):
    return _affine(x, (1, 0, 0, 0.3 * level * _sign(flip), 1, 0), fill)


def _translate_x(x, level, flip, fill):  # TranslateXRel: up to 0.45 of the width
    return _affine(x, (1, 0, 0.45 * level * _sign(flip) * x.shape[-1], 0, 1, 0), fill)


def _translate_y(x, level, flip, fill):
    return _affine(x, (1, 0, 0, 0, 1, 0.45 * level * _sign(flip) * x.shape[-2]), fill)


# timm's _RAND_INCREASING_TRANSFORMS (the "inc1" of MAE's rand-m9-mstd0.5-inc1), in its order
RANDAUGMENT_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate,
    "PosterizeIncreasing": _posterize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _colour, "ContrastIncreasing": _contrast, "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness, "ShearX": _shear_x, "ShearY": _shear_y,
    "TranslateXRel": _translate_x, "TranslateYRel": _translate_y,
}


def rand_augment_ops(n: int, m: float, mstd: float, prob: float,
                     generator: torch.Generator) -> list[tuple[str, float, bool]]:
    """The ops one image gets: (name, level in [0, 1], negated) for each of the `n` drawn (with
    replacement, as timm draws them) that passes its `prob`; all draws from one call."""
    draws = torch.rand(n, 4, generator=generator).tolist()
    noise = torch.randn(n, generator=generator).tolist() if mstd > 0 else [0.0] * n
    names = list(RANDAUGMENT_OPS)
    chosen = []
    for (u_op, u_apply, u_sign, _), z in zip(draws, noise):
        if u_apply < prob:
            chosen.append((names[min(int(u_op * len(names)), len(names) - 1)],
                           min(max(m + mstd * z, 0.0), 10.0) / 10, u_sign < 0.5))
    return chosen


def rand_augment(image: Tensor, ops: list[tuple[str, float, bool]], fill: Tensor) -> Tensor:
    """uint8 [..., C, H, W] through `ops` in turn (each op's result rounded to uint8, as PIL's are)."""
    if not ops:
        return image
    x = image.float()
    for name, level, flip in ops:
        x = RANDAUGMENT_OPS[name](x, level, flip, fill).round().clamp(0, 255)
    return x.to(torch.uint8)


def random_erase(image: Tensor, augment: FinetuneAugmentations, mean: tuple[float, ...], std: tuple[float, ...],
                 generator: torch.Generator) -> Tensor:
    """timm's RandomErasing (mode 'pixel', one box): with probability erase_prob, a box of
    erase_area of the image and aspect within erase_aspect (ten tries) is filled with per-pixel
    normal noise of the normalised space, here written as the uint8 pixels it normalises from."""
    if float(torch.rand((), generator=generator)) >= augment.erase_prob:
        return image
    *lead, c, height, width = image.shape
    low, high = augment.erase_area
    log_aspect = (math.log(augment.erase_aspect), -math.log(augment.erase_aspect))
    for u_area, u_aspect, u_top, u_left in torch.rand(10, 4, generator=generator).tolist():
        target = height * width * (low + (high - low) * u_area)
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < h < height and 0 < w < width:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            noise = torch.randn(*lead, c, h, w, generator=generator)
            pixels = 255 * (noise * torch.tensor(std).view(c, 1, 1) + torch.tensor(mean).view(c, 1, 1))
            image = image.clone()
            image[..., top:top + h, left:left + w] = pixels.round().clamp(0, 255).to(image.dtype)
            return image
    return image


def finetune_augment(image: Tensor, augment: FinetuneAugmentations, mean: tuple[float, ...],
                     std: tuple[float, ...], generator: torch.Generator) -> Tensor:
    """RandAugment, then random erasing, of uint8 [..., C, H, W] from the sample's own generator;
    geometric ops fill with the mean pixel (timm fills with the dataset mean)."""
    if augment.randaug_n:
        ops = rand_augment_ops(augment.randaug_n, augment.randaug_m, augment.randaug_mstd, augment.randaug_prob,
                               generator)
        image = rand_augment(image, ops, torch.tensor(mean) * 255)
    if augment.erase_prob > 0:
        image = random_erase(image, augment, mean, std, generator)
    return image


def with_finetune_augmentations(modality, options: dict, where: str):
    """`Modality.with_augmentations` of a modality that reads 2D pixels: a copy whose
    `augmentations` are `options` checked as FinetuneAugmentations, or the modality itself
    when they turn nothing on."""
    augmentations = build(FinetuneAugmentations, options or {}, where)
    if not augmentations.active:
        return modality
    augmented = copy.copy(modality)
    augmented.augmentations = augmentations
    return augmented
