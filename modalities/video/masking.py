"""Video maskers: VideoMAE's tube masking, random spatio-temporal masking, and VideoMAE V2's
running-cell decoder mask.

Tokens sit on the (t, row, col) tubelet grid. Both maskers hide exactly the count asked
for through `Mask.from_scores`, as every polymae masker does:

- `tube`: one 2D mask over (row, col) repeated over time (VideoMAE, default 90%): a spatial
  place is hidden in every time slot or in none, so the encoder cannot copy a hidden
  patch from the frame before. It hides `T * round(ratio * H * W)` tokens.
- `spacetime`: a uniformly random subset of all tokens (MAE's random masking in 3D).

`decode_ratio` (VideoMAE V2; None: the full decoder) adds `Mask.decode`: the decoder
reconstructs only the hidden tokens a running cell picks. The cell is 2 x 2 grid places
holding a queue of "decode" and "skip" marks (decode_ratio 0.5: two of each) that rotates
by one place every time slot, so every place is decoded in half of the time slots and the
decoded places move frame to frame; the cell's phase is drawn per sample. The loss counts
only tokens that are hidden and decoded (`Batch.target_weights`). With tube masking and a
number of time slots divisible by 4, exactly `decode_ratio` of the hidden tokens are decoded.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from polymae.shared.masking import Masker
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import Mask, Tokens, hidden_count

CELL = 4  # places in the 2 x 2 running cell


def grid_3d(tokens: Tokens, masker: str) -> tuple[int, int, int]:
    if tokens.grid is None or len(tokens.grid) != 3:
        raise ValueError(f"the {masker} masker needs tokens on a (time, rows, cols) grid, got grid={tokens.grid}")
    return tokens.grid


@functools.lru_cache(maxsize=64)
def running_cell_maps(grid: tuple[int, int, int], decode_ratio: float) -> Tensor:
    """bool [4, T*H*W]: for each of the cell's 4 starting phases, the tokens the decoder
    reconstructs (VideoMAE V2's RunningCellMaskingGenerator, any grid size: place (r, c)
    is cell place 2 * (r % 2) + c % 2)."""
    t, h, w = grid
    skipped = CELL - round(CELL * decode_ratio)
    queue = torch.tensor([True] * skipped + [False] * (CELL - skipped))   # True: not decoded
    place = (2 * (torch.arange(h)[:, None] % 2) + torch.arange(w)[None, :] % 2).flatten()  # [H*W]
    maps = []
    for phase in range(CELL):
        frames = [~queue[(place + phase + time + 1) % CELL] for time in range(t)]  # the cell runs, then is read
        maps.append(torch.cat(frames))
    return torch.stack(maps)


class VideoMasker(Masker):
    modalities = ("video",)
    def __init__(self, ratio: float = 0.9, decode_ratio: float | None = None):
        super().__init__(ratio)
        if decode_ratio is not None and decode_ratio not in (0.25, 0.5, 0.75):
            raise ValueError(f"decode_ratio must be 0.25, 0.5 or 0.75 (1 to 3 of the running cell's 4 places), "
                             f"or null for the full decoder; got {decode_ratio}")
        self.decode_ratio = decode_ratio

    def with_decode(self, mask: Mask, tokens: Tokens, generator: torch.Generator) -> Mask:
        if self.decode_ratio is None:
            return mask
        maps = running_cell_maps(grid_3d(tokens, "running-cell"), self.decode_ratio)
        phase = int(torch.randint(0, CELL, (1,), generator=generator))
        mask.decode = mask.hidden & maps[phase]
        return mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, decode_ratio={self.decode_ratio})"


@MASKERS.register("tube")
class TubeMasker(VideoMasker):
    """VideoMAE's tube masking (see the module docstring)."""

    def __call__(self, tokens, generator, num_hidden=None):
        t, h, w = grid_3d(tokens, "tube")
        if num_hidden is None:
            num_hidden = t * hidden_count(h * w, self.ratio)
        scores = torch.rand(h * w, generator=generator).repeat(t)  # one score per place, alike in every slot
        mask = Mask.from_scores(scores, num_hidden, tokens.valid)
        return self.with_decode(mask, tokens, generator)


@MASKERS.register("spacetime")
class SpaceTimeMasker(VideoMasker):
    """Random spatio-temporal masking: any tokens, independently of time."""

    def __call__(self, tokens, generator, num_hidden=None):
        if num_hidden is None:
            num_hidden = hidden_count(tokens.num_real, self.ratio)
        mask = Mask.from_scores(torch.rand(tokens.num_tokens, generator=generator), num_hidden, tokens.valid)
        return self.with_decode(mask, tokens, generator)
