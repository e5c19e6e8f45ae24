"""Voxel-aware masking (FastDiT-3D), beside the generic maskers.

Random 3D patch masking needs nothing new: the shared "random" masker scores
any token set. FastDiT-3D's voxel-aware masking treats occupied (foreground)
and empty (background) patches separately, because empty space is
redundant: most of it can be hidden (the overall ratio goes up to ~99%)
while more of the occupied patches stay visible.

Contract. Every sample hides exactly `hidden_count(N, ratio)` patches, as
every masker does (a batch must gather densely, and the number of occupied
patches differs between samples). Within that total one class gets its own
ratio exactly, and the other class takes the rest:

    foreground_ratio=r_f: hide round(r_f * n_occupied) occupied patches and
        the remaining hidden_count - that many empty ones;
    background_ratio=r_b: hide round(r_b * n_empty) empty patches and the
        rest among the occupied ones.

Give at most one of the two (with neither, both classes are hidden at the
overall ratio: stratified random masking). When the requested count does not
fit (too few patches of the other class to absorb the rest) it is moved as
little as needed to keep the total exact. Which patches of a class are hidden
is uniformly random.

Occupancy comes from `Tokens.fields["foreground"]` (the voxel tokenizer sets it: a
patch is occupied when a voxel's density exceeds the modality's
`occupancy_threshold`). For tokens without it, pass `channels` and
`density_channel` (and `threshold`) and the masker computes it from the values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from polymae.shared.masking import Masker
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import Tokens, hidden_count

from .tokenizer import patch_occupancy


def class_split(total: int, n_first: int, n_second: int, first_ratio: float) -> tuple[int, int]:
    """Hidden counts (first, second) with first = round(ratio * n_first) when it fits and first + second = total."""
    want = int(round(first_ratio * n_first))
    first = min(max(want, total - n_second, 0), n_first, total)
    return first, total - first


@MASKERS.register("voxel_aware")
class VoxelAwareMasker(Masker):
    modalities = ("voxel",)
    def __init__(self, ratio: float = 0.99, foreground_ratio: float | None = None,
                 background_ratio: float | None = None, channels: int | None = None, density_channel: int = -1,
                 threshold: float = 0.0):
        super().__init__(ratio)
        if foreground_ratio is not None and background_ratio is not None:
            raise ValueError("give foreground_ratio or background_ratio, not both: the overall `ratio` fixes the "
                             "total (batches stack), so the other class takes the rest")
        for name, value in (("foreground_ratio", foreground_ratio), ("background_ratio", background_ratio)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.foreground_ratio, self.background_ratio = foreground_ratio, background_ratio
        self.channels, self.density_channel, self.threshold = channels, density_channel, threshold

    def occupancy(self, tokens: Tokens) -> Tensor:
        if "foreground" in tokens.fields:
            return tokens.fields["foreground"].bool()
        if self.channels is None:
            raise ValueError("the voxel_aware masker needs per-patch occupancy: tokens from the voxel modality carry "
                             "it (Tokens.fields['foreground']); for other tokens set mask.options.channels (and "
                             "density_channel, threshold)")
        return patch_occupancy(tokens.values, self.channels, self.density_channel, self.threshold)

    def split(self, n_tokens: int, n_occupied: int) -> tuple[int, int]:
        """(hidden occupied, hidden empty) for a sample with `n_occupied` of `n_tokens` patches occupied."""
        total, n_empty = hidden_count(n_tokens, self.ratio), n_tokens - n_occupied
        if self.background_ratio is not None:
            empty, occupied = class_split(total, n_empty, n_occupied, self.background_ratio)
            return occupied, empty
        return class_split(total, n_occupied, n_empty,
                           self.ratio if self.foreground_ratio is None else self.foreground_ratio)

    def scores(self, tokens, generator):
        occupied = self.occupancy(tokens)
        n = tokens.num_tokens
        hide_occupied, hide_empty = self.split(n, int(occupied.sum()))
        noise = torch.rand(n, generator=generator)
        scores = noise.clone()
        for members, count in ((occupied, hide_occupied), (~occupied, hide_empty)):
            index = members.nonzero().flatten()
            chosen = index[torch.argsort(noise[index])[:count]]  # a uniformly random `count` of the class
            scores[chosen] += 2.0                                # above every unchosen score (< 1)
        return scores

    def __repr__(self) -> str:
        which = (f"background_ratio={self.background_ratio}" if self.background_ratio is not None
                 else f"foreground_ratio={self.foreground_ratio if self.foreground_ratio is not None else self.ratio}")
        return f"VoxelAwareMasker(ratio={self.ratio}, {which})"
