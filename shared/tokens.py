"""The data model: Tokens, Mask and Batch.

MASK CONVENTION (stated once, used everywhere): in `Mask.hidden`, True means
hidden (masked, to be predicted) and False means visible.

A masker hides exactly `round(ratio * N)` tokens of every sample, so a batch
gathers densely. Every mask also carries the MAE argsort idiom:
`ids_shuffle` orders tokens visible-first, `ids_keep` / `ids_hidden` are its
two halves and `ids_restore` is its inverse permutation, so
`torch.gather(shuffled, 1, ids_restore)` puts tokens back in their place.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class Tokens:
    """What a tokenizer makes of one sample (or, stacked, of a batch).

    values: float [N, d_in]  the reconstruction target lives in this space (between
            tokenizer and loader it may be a compact dtype, e.g. uint8 pixels,
            until `Modality.finish` makes it float)
    coords: float [N, k]     what the position encoding reads (grid index, time, xyz, ...)
    valid:  bool  [N] or None, False on padding tokens
    grid:   token-grid shape (e.g. (h, w)) when the tokens tile a grid, else None;
            structured maskers (block, colour) and `untokenize` read it.
    foreground: bool [N] or None, True on tokens that hold content (an occupied
            voxel patch, an object's pixels), set by tokenizers that know it;
            content-aware maskers (voxel-aware masking) read it.
    """

    values: Tensor
    coords: Tensor
    valid: Tensor | None = None
    grid: tuple[int, ...] | None = None
    foreground: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.values.shape[-2]


@dataclass
class Mask:
    hidden: Tensor       # bool [N] (or [B, N] stacked); True = hidden
    ids_shuffle: Tensor  # long [N]: visible tokens first, then hidden ones
    ids_restore: Tensor  # long [N]: inverse of ids_shuffle
    num_visible: int

    @property
    def ids_keep(self) -> Tensor:
        return self.ids_shuffle[..., : self.num_visible]

    @property
    def ids_hidden(self) -> Tensor:
        return self.ids_shuffle[..., self.num_visible:]

    @classmethod
    def from_scores(cls, scores: Tensor, num_hidden: int) -> "Mask":
        """Hide the `num_hidden` tokens with the highest score (per row).

        Every masker reduces to this: random masking scores with uniform noise,
        block and colour masking with structured scores. A stable sort keeps
        the choice deterministic under ties.
        """
        n = scores.shape[-1]
        if not 0 <= num_hidden <= n:
            raise ValueError(f"cannot hide {num_hidden} of {n} tokens")
        ids_shuffle = torch.argsort(scores, dim=-1, stable=True)  # ascending: visible first
        # the inverse permutation, by scattering positions (a second argsort would sort again)
        positions = torch.arange(n, device=scores.device).expand_as(ids_shuffle)
        ids_restore = torch.empty_like(ids_shuffle).scatter_(-1, ids_shuffle, positions)
        hidden = ids_restore >= (n - num_hidden)
        return cls(hidden=hidden, ids_shuffle=ids_shuffle, ids_restore=ids_restore, num_visible=n - num_hidden)


def hidden_count(num_tokens: int, ratio: float) -> int:
    """The exact number of tokens every masker hides: round(ratio * N), at least one visible."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return min(int(round(ratio * num_tokens)), num_tokens - 1)


@dataclass
class Batch:
    """Stacked Tokens + Mask, labels when the data has them, and bookkeeping.

    `skipped` counts records the data worker skipped since its previous batch,
    by kind; the trainer sums them so nothing is dropped without a count.
    `extras` carries per-modality tensors (e.g. a second view).
    """

    tokens: Tokens
    mask: Mask
    labels: Tensor | None = None
    keys: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.values.shape[0]

    def map_tensors(self, fn: Callable[[Any], Any], kind: type = Tensor) -> "Batch":
        """The same batch with `fn` applied to every tensor in it (tokens, mask, labels, extras),
        or to every object of `kind` that stands in for one (pipelines/transport.py)."""
        def apply(obj):
            if isinstance(obj, kind):
                return fn(obj)
            if isinstance(obj, (Tokens, Mask)):
                return replace(obj, **{f.name: apply(getattr(obj, f.name)) for f in fields(obj)})
            if isinstance(obj, dict):
                return {k: apply(v) for k, v in obj.items()}
            return obj

        return replace(self, tokens=apply(self.tokens), mask=apply(self.mask), labels=apply(self.labels),
                       extras=apply(self.extras))

    def to(self, device: torch.device | str) -> "Batch":
        return self.map_tensors(lambda t: t.to(device, non_blocking=True))


def stack_batch(columns: list[list[Tensor]], allocate: Callable[[int], Tensor] | None = None) -> list[Tensor]:
    """`torch.stack` of each column of per-sample tensors, all into one block of memory.

    `allocate(nbytes)` gives the block (uint8); by default it is ordinary memory. The data
    loader passes its workers' shared-memory ring (pipelines/transport.py): one block per
    batch is one thing to hand over to the main process, not one per tensor."""
    layout, total = [], 0
    for column in columns:
        total = -(-total // 64) * 64  # every tensor starts on a cache line, so any dtype is aligned
        nbytes = len(column) * column[0].numel() * column[0].element_size()
        layout.append((total, nbytes))
        total += nbytes
    block = allocate(total) if allocate is not None else torch.empty(total, dtype=torch.uint8)
    stacked = []
    for column, (offset, nbytes) in zip(columns, layout):
        out = block[offset:offset + nbytes].view(column[0].dtype).view(len(column), *column[0].shape)
        stacked.append(torch.stack(column, out=out))
    return stacked


def collate(items: list[tuple[Tokens, Mask, Any, str]], skipped: dict[str, int] | None = None,
            allocate: Callable[[int], Tensor] | None = None) -> Batch:
    """Stack per-sample (tokens, mask, label, key) into a dense Batch (in one block: `stack_batch`).

    Every sample must have the same token count and the same number of
    visible tokens (maskers guarantee the latter); a mismatch names the keys.
    """
    tokens = [t for t, _, _, _ in items]
    masks = [m for _, m, _, _ in items]
    keys = [k for _, _, _, k in items]
    shapes = {tuple(t.values.shape) for t in tokens}
    if len(shapes) != 1:
        raise ValueError(f"cannot batch tokens of shapes {sorted(shapes)} (keys {keys[:4]}...): "
                         "resize or pad to one token count")
    if len({m.num_visible for m in masks}) != 1:
        raise ValueError(f"masks in one batch hide different token counts (keys {keys[:4]}...)")
    labels = [lab for _, _, lab, _ in items]
    columns = {"values": [t.values for t in tokens], "coords": [t.coords for t in tokens],
               "hidden": [m.hidden for m in masks], "ids_shuffle": [m.ids_shuffle for m in masks],
               "ids_restore": [m.ids_restore for m in masks]}
    if tokens[0].valid is not None:
        columns["valid"] = [t.valid for t in tokens]
    if all(t.foreground is not None for t in tokens):
        columns["foreground"] = [t.foreground for t in tokens]
    if all(lab is not None for lab in labels):
        columns["labels"] = [torch.as_tensor(lab) for lab in labels]
    out = dict(zip(columns, stack_batch(list(columns.values()), allocate)))
    stacked = Tokens(values=out["values"], coords=out["coords"], valid=out.get("valid"), grid=tokens[0].grid,
                     foreground=out.get("foreground"))
    mask = Mask(hidden=out["hidden"], ids_shuffle=out["ids_shuffle"], ids_restore=out["ids_restore"],
                num_visible=masks[0].num_visible)
    return Batch(tokens=stacked, mask=mask, labels=out.get("labels"), keys=keys, skipped=dict(skipped or {}))
