"""Maskers over point groups: Point-MAE's block masking and R-MAE's radial masking.

Both only score groups (higher = hidden first) from the group centres in
`tokens.coords` [G, 3]; the shared `Mask.from_scores` turns scores into a
mask hiding exactly `round(ratio * G)` groups. The shared "random" masker
works on groups unchanged (Point-MAE's default).
"""
from __future__ import annotations

import math

import torch

from polymae.shared.masking import Masker
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import Tokens


@MASKERS.register("point_block")
class PointBlockMasker(Masker):
    modalities = ("pointcloud", "lidar")
    """Point-MAE's block masking: a random seed group and the groups whose centres
    lie nearest to it are hidden (one contiguous blob of the cloud)."""

    def scores(self, tokens: Tokens, generator: torch.Generator) -> torch.Tensor:
        centres = tokens.coords[..., :3].float().cpu()
        seed = int(torch.randint(0, centres.shape[0], (1,), generator=generator))
        return -(centres - centres[seed]).pow(2).sum(-1)


@MASKERS.register("radial")
class RadialMasker(Masker):
    modalities = ("pointcloud", "lidar")
    """R-MAE's radial masking: the sweep is split into `num_sectors` azimuth sectors
    around the sensor at `origin` (and, with `range_bins` > 1, each sector into
    equal-width range bins up to the farthest group), and whole cells are hidden
    in random order until `round(ratio * G)` groups are hidden; only the last
    cell taken may be hidden in part (exact count). Cells are ranked first and
    groups at random within a cell, so a score is `cell rank + U[0, 1)`.

    origin: the sensor position in token coordinates (x, y, z; only x, y are
        read). The lidar modality keeps the sensor at (0, 0, 0).
    contiguous: hide one wedge of adjacent sectors starting at a random sector,
        instead of sectors drawn at random (R-MAE's randomly selected angular groups).
    random_rotation: turn the sector boundaries by a random angle per sample.
    """

    def __init__(self, ratio: float = 0.9, num_sectors: int = 16, range_bins: int = 1,
                 origin: tuple[float, ...] = (0.0, 0.0, 0.0), contiguous: bool = False,
                 random_rotation: bool = True):
        super().__init__(ratio)
        if num_sectors < 1 or range_bins < 1:
            raise ValueError(f"num_sectors ({num_sectors}) and range_bins ({range_bins}) must be >= 1")
        if len(origin) < 2:
            raise ValueError(f"origin needs at least (x, y), got {origin}")
        self.num_sectors, self.range_bins, self.contiguous = num_sectors, range_bins, contiguous
        self.origin = tuple(float(v) for v in origin)
        self.random_rotation = random_rotation

    def sectors(self, coords: torch.Tensor, rotation: float = 0.0) -> torch.Tensor:
        """Sector index [G] of each centre (azimuth measured from +x, turned by `rotation`)."""
        rel = coords[..., :2].float().cpu() - torch.tensor(self.origin[:2])
        azimuth = torch.remainder(torch.atan2(rel[..., 1], rel[..., 0]) - rotation, 2 * math.pi)
        return (azimuth / (2 * math.pi / self.num_sectors)).long().clamp_(0, self.num_sectors - 1)

    def range_bin(self, coords: torch.Tensor) -> torch.Tensor:
        rel = coords[..., :2].float().cpu() - torch.tensor(self.origin[:2])
        distance = rel.norm(dim=-1)
        width = float(distance.max()) / self.range_bins + 1e-12
        return (distance / width).long().clamp_(0, self.range_bins - 1)

    def draw_rotation(self, generator: torch.Generator) -> float:
        if not self.random_rotation:
            return 0.0
        return float(torch.rand((), generator=generator)) * 2 * math.pi / self.num_sectors

    def scores(self, tokens: Tokens, generator: torch.Generator) -> torch.Tensor:
        coords = tokens.coords
        rotation = self.draw_rotation(generator)
        sector = self.sectors(coords, rotation)
        cell = sector * self.range_bins + (self.range_bin(coords) if self.range_bins > 1 else 0)
        cells = self.num_sectors * self.range_bins
        if self.contiguous:
            first = int(torch.randint(0, self.num_sectors, (1,), generator=generator))
            sector_rank = self.num_sectors - 1 - torch.remainder(torch.arange(self.num_sectors) - first,
                                                                 self.num_sectors)
            bin_rank = torch.randperm(self.range_bins, generator=generator)
            rank = (sector_rank[:, None] * self.range_bins + bin_rank[None, :]).reshape(cells)
        else:
            rank = torch.randperm(cells, generator=generator)
        return rank[cell].float() + torch.rand(coords.shape[0], generator=generator)

    def __repr__(self) -> str:
        return (f"RadialMasker(ratio={self.ratio}, num_sectors={self.num_sectors}, range_bins={self.range_bins}, "
                f"origin={self.origin}, contiguous={self.contiguous})")
