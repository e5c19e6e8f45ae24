"""Position encodings read token `coords` [..., k] and return [..., width].

`SinCosPosition` is MAE's fixed encoding generalised to any k: the width is
split into k equal parts and part j encodes coordinate j with sines and
cosines of geometrically spaced frequencies. Image coords are (x, y), which
puts the column first as MAE and its Hugging Face port do. It reads real-valued
coords, so it serves pixel grids, tubelets, voxel cubes and time stamps alike.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sincos_1d(positions: Tensor, width: int) -> Tensor:
    """[...] -> [..., width]: half sines, half cosines (MAE ordering)."""
    if width % 2:
        raise ValueError(f"sin-cos width must be even, got {width}")
    omega = torch.arange(width // 2, dtype=torch.float64, device=positions.device) / (width / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.to(torch.float64).unsqueeze(-1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).float()


class SinCosPosition(nn.Module):
    """Integer coords (grid indices, the common case) read cached 1D tables
    instead of recomputing float64 sines and cosines every step; any other
    coords are computed directly. Both give the same values."""

    MAX_ROWS = 8192  # integer coords spanning at most this many positions use the cache

    def __init__(self, width: int, num_coords: int):
        super().__init__()
        if width % (2 * num_coords):
            raise ValueError(f"width {width} must divide into {num_coords} even parts for a {num_coords}D sin-cos encoding")
        self.width, self.num_coords = width, num_coords
        self._tables: dict[torch.device, tuple[int, Tensor]] = {}  # device -> (first position, [P, part])

    def _table(self, device: torch.device, lo: int, hi: int) -> tuple[int, Tensor]:
        first, table = self._tables.get(device, (lo, None))
        if table is None or lo < first or hi >= first + table.shape[0]:
            last = hi if table is None else max(hi, first + table.shape[0] - 1)
            first = min(lo, first)
            positions = torch.arange(first, last + 1, dtype=torch.float64, device=device)
            table = sincos_1d(positions, self.width // self.num_coords)
            self._tables[device] = (first, table)
        return first, table

    def forward(self, coords: Tensor) -> Tensor:
        part = self.width // self.num_coords
        if coords.numel() and not coords.requires_grad and (
                not coords.is_floating_point() or torch.equal(coords, coords.round())):
            lo, hi = float(coords.min()), float(coords.max())
            cached = self._tables.get(coords.device)
            span_lo = lo if cached is None else min(lo, cached[0])
            span_hi = hi if cached is None else max(hi, cached[0] + cached[1].shape[0] - 1)
            if span_hi - span_lo < self.MAX_ROWS:
                first, table = self._table(coords.device, int(lo), int(hi))
                index = coords.long() - first
                return torch.cat([table[index[..., j]] for j in range(self.num_coords)], dim=-1)
        return torch.cat([sincos_1d(coords[..., j], part) for j in range(self.num_coords)], dim=-1)


class LearnedPosition(nn.Module):
    """A learned table over a fixed grid. `grid` is the extent of each coordinate, in the
    order of the coords (image coords are (x, y), so an h x w image grid is (w, h))."""

    def __init__(self, width: int, grid: tuple[int, ...]):
        super().__init__()
        self.grid = tuple(grid)
        self.table = nn.Parameter(torch.zeros(int(torch.tensor(self.grid).prod()), width))
        nn.init.trunc_normal_(self.table, std=0.02)
        strides = torch.tensor([int(torch.tensor(self.grid[j + 1:]).prod()) for j in range(len(self.grid))])
        self.register_buffer("strides", strides, persistent=False)

    def forward(self, coords: Tensor) -> Tensor:
        index = (coords.round().long() * self.strides).sum(-1)
        return self.table[index]


class MLPPosition(nn.Module):
    """A two-layer MLP on continuous coordinates (Point-MAE's centre encoding)."""

    def __init__(self, width: int, num_coords: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_coords, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, coords: Tensor) -> Tensor:
        return self.net(coords)


class NoPosition(nn.Module):
    """No position encoding: the model learns positions another way (an attention bias such as
    2D-ALiBi, `distance_bias`) or is meant not to know them (MP3's position prediction)."""

    def forward(self, coords: Tensor) -> Tensor:
        return coords.new_zeros((), dtype=torch.float32)  # broadcasts onto the embedded tokens


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al., "Train Short, Test Long"): a geometric sequence
    2^(-8/H), 2^(-16/H), ... for a power-of-two H; otherwise those of the power of two below
    H, then every other slope of the power of two above, as ALiBi's reference code does."""
    def powers_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    below = 2 ** math.floor(math.log2(heads))
    slopes = powers_of_two(below) + powers_of_two(2 * below)[0::2][:heads - below]
    return torch.tensor(slopes, dtype=torch.float32)


def distance_bias(query_coords: Tensor, key_coords: Tensor, slopes: Tensor) -> Tensor:
    """2D-ALiBi (CROMA): an additive attention bias of -slope x the Euclidean distance between
    token coordinates, one slope per head; coords [B, Nq, k] and [B, Nk, k] -> [B, H, Nq, Nk].
    It depends on distances only, not on where a token sits, so a model trained on small grids
    reads larger ones (no position table to outgrow); between two streams it is X-ALiBi."""
    offsets = query_coords.float()[:, :, None] - key_coords.float()[:, None, :]
    distance = offsets.square().sum(-1).sqrt()  # exact zeros on the diagonal (cdist's matmul path is not)
    return -slopes.to(distance.device).view(1, -1, 1, 1) * distance[:, None]


POSITIONS = ("sincos", "learned", "mlp", "none")  # what build_position builds (model.position)


def build_position(kind: str, width: int, num_coords: int, grid: tuple[int, ...] | None = None) -> nn.Module:
    if kind == "sincos":
        return SinCosPosition(width, num_coords)
    if kind == "learned":
        if grid is None:
            raise ValueError("a learned position table needs a fixed token grid")
        return LearnedPosition(width, grid)
    if kind == "mlp":
        return MLPPosition(width, num_coords)
    if kind == "none":
        return NoPosition()
    raise ValueError(f"unknown position encoding {kind!r}; one of {', '.join(POSITIONS)}")
