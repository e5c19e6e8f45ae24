"""3D patchify and its exact inverse, for dense grids [C, X, Y, Z].

A grid with cubic patches of edge p becomes gx*gy*gz tokens (gx = X / p,
...; the grid need not be cubic) of p^3*C values each. Tokens are ordered
over the patch grid with x slowest and z fastest, values inside a patch
(dx, dy, dz, channel) with the channel fastest, the 3D analogue of MAE's
(row, col) / (dy, dx, channel) image layout. coords are the (x, y, z) patch
indices, read by a 3-coordinate SinCosPosition (or a learned table over
`grid`, whose strides follow the same x-slowest order).
"""
from __future__ import annotations

import torch
from torch import Tensor

from polymae.shared.tokens import Tokens


def grid_coords_3d(gx: int, gy: int, gz: int) -> Tensor:
    """[gx*gy*gz, 3] float (x, y, z) patch indices in token order."""
    xs, ys, zs = torch.meshgrid(torch.arange(gx), torch.arange(gy), torch.arange(gz), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten(), zs.flatten()], dim=-1).float()


def patch_grid(shape: tuple[int, int, int], patch: int) -> tuple[int, int, int]:
    if any(size % patch for size in shape):
        raise ValueError(f"grid {'x'.join(map(str, shape))} is not a multiple of patch size {patch} on every axis")
    return tuple(size // patch for size in shape)


def patchify_3d(grid: Tensor, patch: int) -> Tokens:
    """[C, X, Y, Z] (or [B, C, X, Y, Z]) -> Tokens with values [(B,) gx*gy*gz, p^3*C]."""
    *lead, c, x_size, y_size, z_size = grid.shape
    gx, gy, gz = patch_grid((x_size, y_size, z_size), patch)
    x = grid.reshape(*lead, c, gx, patch, gy, patch, gz, patch)
    n = len(lead)
    # (..., c, gx, px, gy, py, gz, pz) -> (..., gx, gy, gz, px, py, pz, c)
    order = list(range(n)) + [n + i for i in (1, 3, 5, 2, 4, 6, 0)]
    values = x.permute(order).reshape(*lead, gx * gy * gz, patch ** 3 * c)
    coords = grid_coords_3d(gx, gy, gz).expand(*lead, gx * gy * gz, 3)
    return Tokens(values=values, coords=coords, grid=(gx, gy, gz))


def unpatchify_3d(values: Tensor, grid: tuple[int, int, int], patch: int) -> Tensor:
    """[(B,) gx*gy*gz, p^3*C] -> [(B,) C, X, Y, Z], the exact inverse of `patchify_3d`."""
    gx, gy, gz = grid
    *lead, n_tokens, d = values.shape
    if n_tokens != gx * gy * gz or d % patch ** 3:
        raise ValueError(f"{n_tokens} tokens of {d} values do not tile a {gx}x{gy}x{gz} grid of {patch}^3 patches")
    c = d // patch ** 3
    x = values.reshape(*lead, gx, gy, gz, patch, patch, patch, c)
    n = len(lead)
    # (..., gx, gy, gz, px, py, pz, c) -> (..., c, gx, px, gy, py, gz, pz)
    order = list(range(n)) + [n + i for i in (6, 0, 3, 1, 4, 2, 5)]
    return x.permute(order).reshape(*lead, c, gx * patch, gy * patch, gz * patch)


def patch_channel(values: Tensor, channels: int, channel: int) -> Tensor:
    """One channel of every voxel of every patch: [..., N, p^3*C] -> [..., N, p^3]."""
    if values.shape[-1] % channels:
        raise ValueError(f"token width {values.shape[-1]} is not a multiple of {channels} channels")
    return values.reshape(*values.shape[:-1], -1, channels)[..., channel]


def patch_occupancy(values: Tensor, channels: int, density_channel: int, threshold: float = 0.0) -> Tensor:
    """bool [..., N]: a patch is occupied (foreground) when any voxel's density exceeds `threshold`."""
    return patch_channel(values, channels, density_channel).amax(dim=-1) > threshold
