"""The medical modality: DICOM and NIfTI records -> grey 2D patches or 3D patches.

mode 2d (radiographs, slices): the record's image in [0, 1] (DICOM display pipeline, or a
NIfTI slice clipped to percentiles) -> the image modality's random resized crop (train)
or resize (eval) to `image_size` -> mean/std -> its patchify (p x p grey patches, (x, y)
coords). mode 3d (volumes): the volume resampled to `spacing` (a no-op when the shards
were written at that spacing), clipped to percentiles (or `intensity_range`) and scaled
to [0, 1] -> random crop (train) or centre crop to `volume_size`, zero-padded where the
volume is smaller -> optional flips -> mean/std -> the shared 3D patchify (shared/
patchify.py: one implementation for voxel grids, video tubelets and volumes), with (x, y,
z) patch coords for a 3D sin-cos position encoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from polymae.modalities.image.augment import (FinetuneAugmentations, finetune_augment, random_hflip,
                                              random_resized_crop, resize, with_finetune_augmentations)
from polymae.modalities.image.tokenizer import patchify, unpatchify
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.modality import Modality
from polymae.shared.model import DecoderConfig, ModelConfig
from polymae.shared.patchify import patch_grid, patch_sizes, patchify_3d, unpatchify_3d
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters, dicom
from .render import render_rows
from .volume import percentile_scaled, read_nifti, resampled, volumes_of


@dataclass
class MedicalOptions:
    mode: str = "2d"                                # "2d": images and slices; "3d": volumes
    # 2D
    image_size: tuple[int, int] = (224, 224)        # (height, width) fed to the model
    patch_size: int = 16
    crop_scale: tuple[float, float] = (0.5, 1.0)    # random resized crop area range (thorax MAE: 0.5-1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False                             # off: a mirrored chest has its heart on the right
    use_voi: bool = True                            # DICOM: the header's VOI LUT / window (else percentiles)
    # 3D
    volume_size: tuple[int, int, int] = (96, 96, 96)   # (X, Y, Z) voxels fed to the model
    patch: tuple[int, int, int] = (16, 16, 16)          # 3D patch edge per axis
    spacing: tuple[float, float, float] | None = None   # resample volumes to this voxel size in mm (None: as stored)
    flip_axes: tuple[int, ...] = ()                     # volume axes flipped at random when training
    # intensities of NIfTI records (volumes, slices)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_range: tuple[float, float] | None = None  # a fixed window instead (CT: [-1000, 1000] HU)
    mean: float = 0.5                                   # token values are (x - mean) / std, x in [0, 1]
    std: float = 0.25
    # reading sources (`polymae shard`)
    slice_axis: int = 2                             # 2D mode, volumes: slices along this axis ...
    slice_step: int = 1                             # ... every slice_step-th ...
    min_slice_content: float = 0.05                 # ... that has at least this share of non-background voxels
    max_frames: int | None = None                   # 4D NIfTI / multi-frame DICOM: the first N frames at most
    keep_phi: bool = False                          # keep patient-identifying DICOM attributes in the records
    label: str | None = None                        # "modality" or "body_part": a DICOM header label as `cls`

    def __post_init__(self):
        if self.mode not in ("2d", "3d"):
            raise ConfigError(f"modality_options.mode must be '2d' or '3d', got {self.mode!r}")
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(s) for s in self.image_size)
        if any(s % self.patch_size for s in self.image_size):
            raise ConfigError(f"modality_options.image_size {list(self.image_size)} must be a multiple of "
                              f"patch_size {self.patch_size}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"modality_options.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if isinstance(self.volume_size, int):
            self.volume_size = (self.volume_size,) * 3
        self.volume_size = tuple(int(s) for s in self.volume_size)
        self.patch = patch_sizes(self.patch if not isinstance(self.patch, list) else tuple(self.patch))
        if len(self.volume_size) != 3 or len(self.patch) != 3 or min(self.patch) < 1 \
                or any(s % p for s, p in zip(self.volume_size, self.patch)):
            raise ConfigError(f"modality_options.volume_size {list(self.volume_size)} must be a multiple of "
                              f"patch {list(self.patch)} on each of its three axes")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ConfigError(f"modality_options.spacing must be three positive sizes in mm, got {self.spacing}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes) or self.slice_axis not in (0, 1, 2):
            raise ConfigError("modality_options.flip_axes and slice_axis name volume axes 0, 1 or 2")
        if not 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100:
            raise ConfigError(f"modality_options.clip_percentiles must be 0 <= low < high <= 100, "
                              f"got {self.clip_percentiles}")
        if self.label not in (None, *adapters.LABELS):
            raise ConfigError(f"modality_options.label must be one of {', '.join(adapters.LABELS)} (or null), "
                              f"got {self.label!r}")
        if self.std <= 0 or self.slice_step < 1:
            raise ConfigError("modality_options.std must be positive and slice_step at least 1")


def crop_or_pad(volume: torch.Tensor, size: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """[C, X, Y, Z] -> [C, *size]: a random (with a generator) or centred window on larger axes,
    zeros (background after scaling) around smaller ones, the volume centred."""
    for axis, target in enumerate(size):
        dim, length = axis + 1, volume.shape[axis + 1]
        if length > target:
            spare = length - target
            start = int(torch.randint(0, spare + 1, (1,), generator=generator)) if generator is not None \
                else spare // 2
            volume = volume.narrow(dim, start, target)
        elif length < target:
            before = (target - length) // 2
            shape = list(volume.shape)
            shape[dim] = before
            after = list(volume.shape)
            after[dim] = target - length - before
            volume = torch.cat([volume.new_zeros(shape), volume, volume.new_zeros(after)], dim=dim)
    return volume


@MODALITIES.register("medical")
class MedicalModality(Modality):
    name = "medical"
    payload_keys = ("dcm", "nii.gz", "nii")
    Options = MedicalOptions
    default_masker = "random"
    augmentations: FinetuneAugmentations | None = None  # fine-tuning's RandAugment and erasing, 2D only

    # -- adapters ---------------------------------------------------------
    def reading(self) -> adapters.Reading:
        o = self.options
        return adapters.Reading(mode=o.mode, spacing=o.spacing, slice_axis=o.slice_axis, slice_step=o.slice_step,
                                min_slice_content=o.min_slice_content, max_frames=o.max_frames,
                                keep_phi=o.keep_phi, label=o.label)

    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def read_source(self, source, **kwargs):
        return adapters.read_source(source, self.reading())

    def decode(self, sample) -> torch.Tensor:
        """2D: float32 [1, H, W] in [0, 1]; 3D: float32 [1, X, Y, Z] in [0, 1]."""
        key, data = self.payload(sample)
        source = f"{sample.get('__key__', '?')}.{key}"
        if key == "dcm":
            return self.decode_dicom(data, source)
        volumes = volumes_of(read_nifti(data, source), source, max_frames=1)
        volume, affine = volumes[0]
        if self.options.mode == "2d":
            if volume.shape[2] != 1:
                raise BadInput(source, f"a volume {list(volume.shape)} in 2D mode: shard volumes with "
                               "modality_options.mode=2d to get their slices", "not_an_image")
            image = volume[:, :, 0].T  # (x, y) voxels -> rows of y, columns of x
            if affine[1, 1] > 0:  # y runs towards anterior / superior: show it at the top
                image = image[::-1]
            return torch.from_numpy(self.intensities(np.ascontiguousarray(image)))[None]
        if min(volume.shape) < 2:
            raise BadInput(source, f"a slice {list(volume.shape)} in 3D mode", "not_a_volume")
        volume, _ = resampled(volume, affine, self.options.spacing)
        return torch.from_numpy(self.intensities(volume))[None]

    def decode_dicom(self, data: bytes, source: str) -> torch.Tensor:
        if self.options.mode == "3d":
            raise BadInput(source, "a single DICOM image in 3D mode (shard series folders with mode=3d)",
                           "not_a_volume")
        frames = dicom.display_pixels(dicom.read_dataset(data, source), source, self.options.use_voi)
        if frames.shape[0] != 1:
            raise BadInput(source, f"a record of {frames.shape[0]} frames; records hold one image", "not_an_image")
        return torch.from_numpy(frames[0])[None]

    def intensities(self, values: np.ndarray) -> np.ndarray:
        o = self.options
        if o.intensity_range is not None:
            low, high = o.intensity_range
            scaled = (np.clip(values, low, high) - low) / max(high - low, 1e-12)
        else:
            scaled = percentile_scaled(values, *o.clip_percentiles)
        return scaled.astype(np.float32)

    def with_augmentations(self, options: dict, where: str = "finetune.augment") -> "MedicalModality":
        """2D mode: the image modality's RandAugment and random erasing (the thorax fine-tuning
        recipe's rand-m6-mstd0.5-inc1), on the [0, 1] image as 8-bit pixels, as the paper's PIL
        pipeline reads its radiographs."""
        augmented = with_finetune_augmentations(self, options, where)
        if augmented is not self and self.options.mode != "2d":
            raise ConfigError(f"{where}: RandAugment and random erasing are for 2D images, not mode {self.options.mode}")
        return augmented

    # -- tokenizer --------------------------------------------------------
    def tokenize(self, payload: torch.Tensor, generator: torch.Generator, train: bool = True) -> Tokens:
        o = self.options
        x = torch.as_tensor(payload, dtype=torch.float32)
        if o.mode == "2d":
            if x.dim() != 3 or x.shape[0] != 1:
                raise BadInput("image", f"expected a grey image [1, H, W], got {list(x.shape)}", "wrong_channels")
            if train:
                x = random_resized_crop(x, o.image_size, o.crop_scale, o.crop_ratio, generator)
                if o.hflip:
                    x = random_hflip(x, generator)
                if self.augmentations is not None:
                    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8)
                    x = finetune_augment(pixels, self.augmentations, (o.mean,), (o.std,), generator).float() / 255
            else:
                x = resize(x, o.image_size)
            return patchify(((x - o.mean) / o.std).contiguous(), o.patch_size)
        if x.dim() != 4 or x.shape[0] != 1:
            raise BadInput("volume", f"expected a volume [1, X, Y, Z], got {list(x.shape)}", "wrong_channels")
        x = crop_or_pad(x, o.volume_size, generator if train else None)
        if train and o.flip_axes:
            flips = [axis + 1 for axis in o.flip_axes if bool(torch.rand(1, generator=generator) < 0.5)]
            if flips:
                x = x.flip(flips)
        return patchify_3d(((x - o.mean) / o.std).contiguous(), o.patch)

    def untokenize(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> images [(B,) 1, H, W] or volumes [(B,) 1, X, Y, Z], back in [0, 1] units."""
        o = self.options
        values = tokens.values.float() * o.std + o.mean
        if o.mode == "2d":
            return unpatchify(values, tokens.grid, o.patch_size)
        return unpatchify_3d(values, tokens.grid, o.patch)

    @property
    def d_in(self):
        o = self.options
        return o.patch_size ** 2 if o.mode == "2d" else int(np.prod(o.patch))

    @property
    def num_coords(self):
        return 2 if self.options.mode == "2d" else 3

    @property
    def grid(self):
        o = self.options
        if o.mode == "2d":
            return (o.image_size[0] // o.patch_size, o.image_size[1] // o.patch_size)
        return patch_grid(o.volume_size, o.patch)

    @property
    def coord_extents(self):
        """2D coords are (x, y) = (col, row), as the image modality's; 3D ones (x, y, z) in grid order."""
        return self.grid[::-1] if self.options.mode == "2d" else self.grid

    # -- model --------------------------------------------------------------
    def check_width(self, width: int, what: str, config: ModelConfig) -> None:
        if self.options.mode == "3d" and config.position == "sincos" and width % 6:
            raise ConfigError(f"{what} {width} must be a multiple of 6 for a 3D sin-cos position encoding "
                              "(two even parts per axis), e.g. 96, 192 or 384")

    def input_adapter(self, width: int, config: ModelConfig):
        self.check_width(width, "model.width", config)
        return super().input_adapter(width, config)

    def decoder(self, decoder: DecoderConfig, encoder_width: int, config: ModelConfig):
        self.check_width(decoder.width or config.decoder_width, "model.decoder_width", config)
        return super().decoder(decoder, encoder_width, config)

    # -- pictures ---------------------------------------------------------------
    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """Rows of original | masked (hidden patches black) | reconstruction (visible patches pasted back):
        radiographs as images, volumes as their three orthogonal middle slices."""
        values, hidden = tokens.values[:rows].float(), hidden[:rows].unsqueeze(-1)
        pred = pred[:rows].float()
        background = torch.full_like(values, -self.options.mean / self.options.std)  # 0 in [0, 1] units
        panels = [values, torch.where(hidden, background, values), torch.where(hidden, pred, values)]
        shown = [self.untokenize(Tokens(p, tokens.coords[:rows], grid=tokens.grid))[:, 0].clamp(0, 1).numpy()
                 for p in panels]
        return render_rows(shown, volumes=self.options.mode == "3d")
