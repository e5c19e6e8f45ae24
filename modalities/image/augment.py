"""The image augmentations MAE uses, written in torch (torchvision does not
import beside this CPU torch): random resized crop and horizontal flip. Each works
on [..., C, H, W]: a clip's frames [T, C, H, W] get one crop box and one flip (video)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
