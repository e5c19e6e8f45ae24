"""The voxel modality: radiance/density grids -> 3D patch tokens, ViT or SparK
sparse encoder, voxel-aware masking, opacity-weighted reconstruction, pictures."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.modality import Modality
from polymae.shared.model import DecoderConfig, ModelConfig
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters
from . import masking as _masking  # noqa: F401  (registers "voxel_aware")
from . import objectives as _objectives  # noqa: F401  (registers "radiance")
from . import sparse as _sparse  # noqa: F401  (registers the "sparse_cnn" encoder; spconv loads on first use)
from .render import render_rows
from .tokenizer import patch_grid, patch_occupancy, patchify_3d, unpatchify_3d



@dataclass
class VoxelOptions:
    grid_size: tuple[int, int, int] = (32, 32, 16)  # (X, Y, Z) voxels fed to the model: larger grids are
    #                                                 cropped (random when training), smaller ones zero-padded
    patch_size: int = 8                  # cubic patches of patch_size^3 voxels
    channels: int = 4                    # per voxel: RGB + density (4), density only (1), or any C
    density_channel: int = -1            # which channel is density (-1: the last)
    occupancy_threshold: float = 0.0     # a patch is occupied when a voxel's density exceeds this
    flip: bool = True                    # random flips along x and y when training
    voxel_size: float | None = None      # point clouds: voxel edge in scan units (None: from the point spacing)
    min_points: int = 64                 # point clouds: tiles with fewer points are left out (and counted)

    def __post_init__(self):
        self.grid_size = tuple(int(s) for s in self.grid_size)
        if len(self.grid_size) != 3 or min(self.grid_size) < 1:
            raise ConfigError(f"modality_options.grid_size must be three positive sizes (X, Y, Z), "
                              f"got {self.grid_size}")
        if self.patch_size < 1 or any(s % self.patch_size for s in self.grid_size):
            raise ConfigError(f"modality_options.grid_size {list(self.grid_size)} must be a multiple of "
                              f"patch_size {self.patch_size} on every axis")
        if self.channels < 1:
            raise ConfigError(f"modality_options.channels must be >= 1, got {self.channels}")
        if not -self.channels <= self.density_channel < self.channels:
            raise ConfigError(f"modality_options.density_channel {self.density_channel} is not one of the "
                              f"{self.channels} channels")
        self.density_channel %= self.channels
        if self.voxel_size is not None and self.voxel_size <= 0:
            raise ConfigError(f"modality_options.voxel_size must be positive, got {self.voxel_size}")


def crop_or_pad(grid: torch.Tensor, size: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """[C, X, Y, Z] -> [C, *size]: crop larger axes (at random with a generator, else centred),
    zero-pad smaller ones (density 0: empty space) at the far end."""
    for axis, target in enumerate(size):
        dim, length = axis + 1, grid.shape[axis + 1]
        if length > target:
            spare = length - target
            start = int(torch.randint(0, spare + 1, (1,), generator=generator)) if generator is not None \
                else spare // 2
            grid = grid.narrow(dim, start, target)
        elif length < target:
            pad = list(grid.shape)
            pad[dim] = target - length
            grid = torch.cat([grid, grid.new_zeros(pad)], dim=dim)
    return grid


@MODALITIES.register("voxel")
class VoxelModality(Modality):
    name = "voxel"
    payload_keys = ("grid.npz", "grid.npy", "npz", "npy")
    Options = VoxelOptions
    default_masker = "voxel_aware"

    @property
    def default_objective(self) -> dict:
        o = self.options
        return {"radiance": {"weight": 1.0, "channels": o.channels, "density_channel": o.density_channel,
                             "alpha": "opacity", "step": 1.0}}

    # -- adapters ---------------------------------------------------------
    def voxelisation(self) -> adapters.Voxelisation:
        o = self.options
        return adapters.Voxelisation(grid_size=o.grid_size, voxel_size=o.voxel_size, channels=o.channels,
                                     min_points=o.min_points)

    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def read_source(self, source, **kwargs):
        return adapters.read_source(source, self.voxelisation())

    def decode(self, sample) -> torch.Tensor:
        key, data = self.payload(sample)
        source = f"{sample.get('__key__', '?')}.{key}"
        grid = adapters.decode_grid(data, source, suffix=key.rsplit(".", 1)[-1])
        if grid.shape[0] != self.options.channels:
            raise BadInput(source, f"grid has {grid.shape[0]} channels (shape {list(grid.shape)}); the modality "
                           f"expects {self.options.channels} (modality_options.channels)", "wrong_channels")
        return torch.from_numpy(grid)

    # -- tokenizer --------------------------------------------------------
    def tokenize(self, payload: torch.Tensor, generator: torch.Generator, train: bool = True) -> Tokens:
        grid = torch.as_tensor(payload, dtype=torch.float32)
        if grid.dim() != 4 or grid.shape[0] != self.options.channels:
            raise BadInput("grid", f"expected [{self.options.channels}, X, Y, Z], got {list(grid.shape)}",
                           "wrong_channels")
        grid = crop_or_pad(grid, self.options.grid_size, generator if train else None)
        if train and self.options.flip:
            flips = [axis + 1 for axis in (0, 1) if bool(torch.rand(1, generator=generator) < 0.5)]
            if flips:
                grid = grid.flip(flips)
        tokens = patchify_3d(grid.contiguous(), self.options.patch_size)
        tokens.fields["foreground"] = self.occupancy(tokens.values)
        return tokens

    def occupancy(self, values: torch.Tensor) -> torch.Tensor:
        o = self.options
        return patch_occupancy(values, o.channels, o.density_channel, o.occupancy_threshold)

    def untokenize(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> grid(s) [(B,) C, X, Y, Z]."""
        return unpatchify_3d(tokens.values, tokens.grid, self.options.patch_size)

    @property
    def d_in(self):
        return self.options.patch_size ** 3 * self.options.channels

    @property
    def num_coords(self):
        return 3

    @property
    def grid(self):
        return patch_grid(self.options.grid_size, self.options.patch_size)

    # -- model --------------------------------------------------------------
    def input_adapter(self, width: int, config: ModelConfig):
        if config.position == "sincos" and width % 6:
            raise ConfigError(f"model.width {width} must be a multiple of 6 for a 3D sin-cos position encoding "
                              "(two even parts per axis), e.g. 96, 192 or 384")
        return super().input_adapter(width, config)

    def decoder(self, decoder: DecoderConfig, encoder_width: int, config: ModelConfig):
        width = decoder.width or config.decoder_width
        if config.position == "sincos" and width % 6:
            raise ConfigError(f"model.decoder_width {width} must be a multiple of 6 for a 3D sin-cos position "
                              "encoding (two even parts per axis), e.g. 96, 192 or 384")
        return super().decoder(decoder, encoder_width, config)

    # -- pictures ---------------------------------------------------------------
    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """Rows of original | masked (hidden patches removed) | reconstruction (visible patches pasted back),
        each as three views of the grid (along z, y and x)."""
        values, hidden = tokens.values[:rows].float(), hidden[:rows].unsqueeze(-1)
        pred = pred[:rows].float()
        panels = [values, torch.where(hidden, torch.zeros_like(values), values), torch.where(hidden, pred, values)]
        grids = [self.untokenize(Tokens(p, tokens.coords[:rows], grid=tokens.grid)).numpy() for p in panels]
        return render_rows(grids, self.options.density_channel, scale_to=96)
