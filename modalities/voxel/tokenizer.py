"""3D patchify and its exact inverse, for dense grids [C, X, Y, Z] (shared/patchify.py, which
video tubelets use too), and per-patch occupancy.

A grid with cubic patches of edge p becomes gx*gy*gz tokens (gx = X / p,
...; the grid need not be cubic) of p^3*C values each. Tokens are ordered
over the patch grid with x slowest and z fastest, values inside a patch
(dx, dy, dz, channel) with the channel fastest, the 3D analogue of MAE's
(row, col) / (dy, dx, channel) image layout. coords are the (x, y, z) patch
indices, read by a 3-coordinate SinCosPosition (or a learned table over
`grid`, whose strides follow the same x-slowest order).
"""
from __future__ import annotations

from torch import Tensor

from polymae.shared.patchify import grid_coords_3d, patch_grid, patchify_3d, unpatchify_3d  # noqa: F401  (shared with video)


def patch_channel(values: Tensor, channels: int, channel: int) -> Tensor:
    """One channel of every voxel of every patch: [..., N, p^3*C] -> [..., N, p^3]."""
    if values.shape[-1] % channels:
        raise ValueError(f"token width {values.shape[-1]} is not a multiple of {channels} channels")
    return values.reshape(*values.shape[:-1], -1, channels)[..., channel]


def patch_occupancy(values: Tensor, channels: int, density_channel: int, threshold: float = 0.0) -> Tensor:
    """bool [..., N]: a patch is occupied (foreground) when any voxel's density exceeds `threshold`."""
    return patch_channel(values, channels, density_channel).amax(dim=-1) > threshold
