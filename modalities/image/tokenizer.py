"""Patchify and its exact inverse, in MAE's (and Hugging Face's) token layout.

An image [C, H, W] with patch size p becomes h*w tokens of p*p*C values
ordered (row, col) over the grid and (dy, dx, channel) inside a patch;
coords are (x, y) = (col, row).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from polymae.shared.tokens import Tokens


@functools.lru_cache(maxsize=32)
def grid_coords(h: int, w: int) -> Tensor:
    """(x, y) = (col, row) of an h x w grid, row by row: [h*w, 2] float. One tensor per grid
    shape, shared by every image's tokens (made once, not per image; never written to)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1).float()


def patchify(image: Tensor, patch: int) -> Tokens:
    """[C, H, W] (or [B, C, H, W]) -> Tokens with values [(B,) h*w, p*p*C]."""
    *lead, c, height, width = image.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not a multiple of patch size {patch}")
    h, w = height // patch, width // patch
    # one patch row is p pixels x c channels side by side in (H, W, C) order: copying whole rows of
    # p*c values (a view when the image is channels-last, as decoded images are) is 1.5x faster
    # than gathering single channel values
    x = image.movedim(-3, -1).reshape(*lead, h, patch, w, patch * c)
    x = x.transpose(-3, -2)                    # (..., h, w, p, p*c)
    values = x.reshape(*lead, h * w, patch * patch * c)
    coords = grid_coords(h, w).expand(*lead, h * w, 2)
    return Tokens(values=values, coords=coords, grid=(h, w))


def unpatchify(values: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """[(B,) h*w, p*p*C] -> [(B,) C, H, W], the exact inverse of `patchify`."""
    h, w = grid
    *lead, n, d = values.shape
    c = d // (patch * patch)
    x = values.reshape(*lead, h, w, patch, patch, c)
    x = x.transpose(-4, -3)                    # (..., h, p, w, p, c)
    x = x.movedim(-1, -5)                      # (..., c, h, p, w, p)
    return x.reshape(*lead, c, h * patch, w * patch)


class PixelNormalisation:
    """uint8 pixels <-> mean/std-normalised float32 values of tokens of `pixels` pixels each, channel
    fastest: normalised = pixel * scale + shift. The affine is made once per device, since it runs
    on every batch (images, and video tubelets, whose tokens are pixels too)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], pixels: int):
        self.mean, self.std, self.pixels = mean, std, pixels
        self.affines: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def affine(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self.affines:
            mean = torch.tensor(self.mean, device=device) * 255
            std = torch.tensor(self.std, device=device) * 255
            self.affines[device] = ((1 / std).repeat(self.pixels), (-mean / std).repeat(self.pixels))
        return self.affines[device]

    def normalise(self, values: Tensor) -> Tensor:
        """uint8 -> float32 in one pass (uint8 x float32 promotes inside the op: no float copy first)."""
        scale, shift = self.affine(values.device)
        return torch.addcmul(shift, values, scale)

    def to_uint8(self, values: Tensor) -> Tensor:
        """Normalised (or already uint8) values -> uint8 pixels."""
        if values.dtype == torch.uint8:
            return values
        scale, shift = self.affine(values.device)
        return ((values.float() - shift) / scale).round().clamp(0, 255).to(torch.uint8)
