"""The image modality: decode -> augment -> patchify, and a picture of reconstructions."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from PIL import Image

from polymae.shared.config import bounded
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.modality import Modality
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters
from .augment import (FinetuneAugmentations, finetune_augment, random_hflip, random_resized_crop, resize,
                      with_finetune_augmentations)
from .tokenizer import PixelNormalisation, patchify, unpatchify

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageOptions:
    image_size: tuple[int, int] = bounded((224, 224), 1)  # (height, width) fed to the model
    patch_size: int = bounded(16, 1)
    channels: int = 3                            # 1 (grey) or 3 (RGB)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop area range (MAE: 0.2-1.0)
    crop_ratio: tuple[float, float] = bounded((3 / 4, 4 / 3), 0.0, low_open=True)
    hflip: bool = True
    mean: tuple[float, ...] | None = bounded(None)  # None: ImageNet's for RGB, 0.5 for grey
    std: tuple[float, ...] | None = bounded(None, 0.0, low_open=True)  # a 0 would divide by zero
    max_pixels: int = bounded(adapters.DEFAULT_MAX_PIXELS, 1)  # larger images are rejected from their header

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(s) for s in self.image_size)
        if any(s % self.patch_size for s in self.image_size):
            raise ConfigError(f"modality_options.image_size {self.image_size} must be a multiple of "
                              f"patch_size {self.patch_size}")
        if self.channels not in (1, 3):
            raise ConfigError(f"modality_options.channels must be 1 or 3, got {self.channels}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"modality_options.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else ((0.5,), (0.5,))
        self.mean = tuple(self.mean or default_mean)
        self.std = tuple(self.std or default_std)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"modality_options.mean/std need {self.channels} values")


@MODALITIES.register("image")
class ImageModality(Modality):
    name = "image"
    payload_keys = (*dict.fromkeys(adapters.IMAGE_SUFFIXES.values()), "jpg", "png", "jpeg")
    Options = ImageOptions
    default_masker = "random"
    decoded_cacheable = True  # crop, resize, flip, RandAugment and erasing all make new tensors (test_image)
    augmentations: FinetuneAugmentations | None = None  # fine-tuning's RandAugment and erasing (with_augmentations)

    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def read_source(self, source, **kwargs):
        return adapters.read_source(source)

    def decode(self, sample):
        key, data = self.payload(sample)
        return adapters.decode_image(data, f"{sample.get('__key__', '?')}.{key}", self.options.channels,
                                     min_side=self.options.patch_size, max_pixels=self.options.max_pixels)

    def with_augmentations(self, options: dict, where: str = "finetune.augment") -> "ImageModality":
        """A copy that adds RandAugment and random erasing (`FinetuneAugmentations`: randaug_n,
        randaug_m, randaug_mstd, randaug_prob, erase_prob, erase_area, erase_aspect) to its
        training pixels, after crop and flip, drawn from each sample's own generator."""
        return with_finetune_augmentations(self, options, where)

    # -- tokenizer --------------------------------------------------------
    def pixels(self, image: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        """uint8 [C, H, W] -> uint8 [C, *image_size], augmented when training."""
        o = self.options
        if image.dtype != torch.uint8:
            raise BadInput("image", f"pixels must be uint8 [C, H, W] as decode gives them, got {image.dtype}",
                           "wrong_dtype")
        if min(image.shape[-2:]) < o.patch_size:
            raise BadInput("image", f"{image.shape[-1]}x{image.shape[-2]} is smaller than one "
                           f"{o.patch_size}px patch", "too_small")
        if train:
            image = random_resized_crop(image, o.image_size, o.crop_scale, o.crop_ratio, generator)
            if o.hflip:
                image = random_hflip(image, generator)
            if self.augmentations is not None:
                image = finetune_augment(image, self.augmentations, o.mean, o.std, generator)
        else:
            image = resize(image, o.image_size)
        return image

    def tokenize(self, payload, generator, train=True):
        """uint8 patches: the workers ship bytes, `finish` normalises them where they are consumed."""
        return patchify(self.pixels(payload, generator, train), self.options.patch_size)

    @functools.cached_property
    def normalisation(self) -> PixelNormalisation:
        return PixelNormalisation(self.options.mean, self.options.std, self.options.patch_size ** 2)

    def finish(self, tokens):
        """uint8 patches -> mean/std-normalised float32 (tokens that are float are finished already)."""
        if tokens.values.dtype != torch.uint8:
            return tokens
        return replace(tokens, values=self.normalisation.normalise(tokens.values))

    def untokenize(self, tokens):
        """Tokens (uint8 or normalised) -> uint8 image(s) [(B,) C, H, W] in pixel space."""
        return unpatchify(self.normalisation.to_uint8(tokens.values), tokens.grid, self.options.patch_size)

    @property
    def d_in(self):
        return self.options.patch_size ** 2 * self.options.channels

    @property
    def num_coords(self):
        return 2

    @property
    def grid(self):
        p = self.options.patch_size
        return (self.options.image_size[0] // p, self.options.image_size[1] // p)

    @property
    def coord_extents(self):
        """Coords are (x, y) = (col, row): x runs over the grid's width."""
        return self.grid[::-1]

    # -- Hugging Face ViTMAE -------------------------------------------------------
    def import_weights(self, model, folder, stream: str) -> bool:
        """`model.init_from` a local ViTMAE folder; False when the folder holds another kind of model."""
        from . import hf_interop

        if hf_interop.folder_model_type(folder) != "vit_mae":
            return False
        hf_interop.load_hf_weights(model, folder)
        return True

    def export_weights(self, model, folder, encoder_only: bool, norm_pix: bool, mask_ratio: float):
        """(folder, class name): the model as a Hugging Face ViTMAE folder `from_pretrained` loads."""
        from . import hf_interop

        written = hf_interop.save_hf_folder(model, folder, encoder_only=encoder_only, norm_pix_loss=norm_pix,
                                            mask_ratio=mask_ratio)
        return written, "ViTMAEModel" if encoder_only else "ViTMAEForPreTraining"

    # -- pictures ---------------------------------------------------------------
    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8):
        """Rows of original | masked (hidden patches grey) | reconstruction (visible patches pasted
        back), each cell scaled to about 96 px and set apart by a white gap."""
        values, hidden = tokens.values[:rows].float(), hidden[:rows].unsqueeze(-1)
        pred = pred[:rows].float()
        grey = torch.zeros_like(values)  # the normalised mean: mid grey
        panels = [values, torch.where(hidden, grey, values), torch.where(hidden, pred, values)]
        images = [self.untokenize(Tokens(p, tokens.coords[:rows], grid=tokens.grid)) for p in panels]
        height, width = self.options.image_size
        scale = max(1, 96 // max(height, width))
        cell_h, cell_w, gap = height * scale, width * scale, 4
        n = images[0].shape[0]
        picture = Image.new("RGB", (3 * cell_w + 4 * gap, n * cell_h + (n + 1) * gap), "white")
        for row in range(n):
            for column, panel in enumerate(images):
                array = panel[row].permute(1, 2, 0).numpy()
                cell = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
                picture.paste(cell.resize((cell_w, cell_h), Image.NEAREST),
                              (gap + column * (cell_w + gap), gap + row * (cell_h + gap)))
        return picture
