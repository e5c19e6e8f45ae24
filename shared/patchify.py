"""Patchify for dense 3-D grids and its exact inverse: voxel grids and video clips share it.

A grid [C, X, Y, Z] with patches of px x py x pz becomes gx*gy*gz tokens (gx = X / px,
...) of px*py*pz*C values each. Tokens are ordered over the patch grid with x slowest and
z fastest; values inside a patch (dx, dy, dz, channel) with the channel fastest: the 3-D
analogue of MAE's (row, col) / (dy, dx, channel) image layout. A grid whose first axis
is time ([C, T, H, W], patches (dt, p, p)) gets tokens (t, row, col) and values
(dt, dy, dx, channel). coords are the (x, y, z) patch indices in token order.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .tokens import Tokens


def patch_sizes(patch: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (patch,) * 3 if isinstance(patch, int) else tuple(int(p) for p in patch)


@functools.lru_cache(maxsize=32)
def grid_coords_3d(gx: int, gy: int, gz: int) -> Tensor:
    """[gx*gy*gz, 3] float (x, y, z) patch indices in token order (one tensor per grid shape,
    shared by every sample's tokens: never written to)."""
    xs, ys, zs = torch.meshgrid(torch.arange(gx), torch.arange(gy), torch.arange(gz), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten(), zs.flatten()], dim=-1).float()


def patch_grid(shape: tuple[int, int, int], patch: int | tuple[int, int, int]) -> tuple[int, int, int]:
    sizes = patch_sizes(patch)
    if any(size % p for size, p in zip(shape, sizes)):
        raise ValueError(f"grid {'x'.join(map(str, shape))} is not a multiple of patch size "
                         f"{'x'.join(map(str, sizes))} on every axis")
    return tuple(size // p for size, p in zip(shape, sizes))


def patchify_3d(grid: Tensor, patch: int | tuple[int, int, int]) -> Tokens:
    """[C, X, Y, Z] (or [B, C, X, Y, Z]) -> Tokens with values [(B,) gx*gy*gz, px*py*pz*C]."""
    *lead, c, x_size, y_size, z_size = grid.shape
    px, py, pz = patch_sizes(patch)
    gx, gy, gz = patch_grid((x_size, y_size, z_size), patch)
    x = grid.reshape(*lead, c, gx, px, gy, py, gz, pz)
    n = len(lead)
    # (..., c, gx, px, gy, py, gz, pz) -> (..., gx, gy, gz, px, py, pz, c)
    order = list(range(n)) + [n + i for i in (1, 3, 5, 2, 4, 6, 0)]
    values = x.permute(order).reshape(*lead, gx * gy * gz, px * py * pz * c)
    coords = grid_coords_3d(gx, gy, gz).expand(*lead, gx * gy * gz, 3)
    return Tokens(values=values, coords=coords, grid=(gx, gy, gz))


def unpatchify_3d(values: Tensor, grid: tuple[int, int, int], patch: int | tuple[int, int, int]) -> Tensor:
    """[(B,) gx*gy*gz, px*py*pz*C] -> [(B,) C, X, Y, Z], the exact inverse of `patchify_3d`."""
    gx, gy, gz = grid
    px, py, pz = patch_sizes(patch)
    *lead, n_tokens, d = values.shape
    volume = px * py * pz
    if n_tokens != gx * gy * gz or d % volume:
        raise ValueError(f"{n_tokens} tokens of {d} values do not tile a {gx}x{gy}x{gz} grid of "
                         f"{px}x{py}x{pz} patches")
    c = d // volume
    x = values.reshape(*lead, gx, gy, gz, px, py, pz, c)
    n = len(lead)
    # (..., gx, gy, gz, px, py, pz, c) -> (..., c, gx, px, gy, py, gz, pz)
    order = list(range(n)) + [n + i for i in (6, 0, 3, 1, 4, 2, 5)]
    return x.permute(order).reshape(*lead, c, gx * px, gy * py, gz * pz)
