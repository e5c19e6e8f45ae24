"""The data model (DESIGN.md, version 2): Tokens per stream, one Mask, Batch.

MASK CONVENTION (stated once, used everywhere): in `Mask.hidden`, True means
hidden (masked, to be predicted) and False means visible. Padding (`valid`
False) is neither: never visible, never a target.

A sample holds one or more named *streams* (`image`, `caption`, ...), each
tokenized by its modality into `Tokens`. A masker makes one `Mask` per
stream; `collate` pads each stream to the batch's longest, concatenates the
streams in the recipe's order and joins their masks into one `Mask` over
that concatenation. Every mask carries the MAE argsort idiom: `ids_shuffle`
orders a sample's tokens encoder-inputs first (visible tokens, and hidden
tokens of streams whose encoder reads them as a mask token, BERT-style),
then hidden, then padding; `ids_keep` is its first part, `ids_restore` its
inverse permutation, so `torch.gather(shuffled, 1, ids_restore)` puts tokens
back in their place. When samples have different numbers of encoder inputs
(text, graphs, a Dirichlet-split budget), `ids_keep` is as long as the
longest and `keep_valid` says which of its entries are real.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

# what a token enters the encoder as (Mask.substitute); values >= 0 name a token id
# (ids streams: BERT's random replacement) or a token index (value streams)
AS_ITSELF, AS_MASK_TOKEN = -1, -2
# how `stack_batch` fills a ragged column's padding: a value, or INDEX, the padded position's own
# index (a single stream's ids_shuffle / ids_restore, where padding maps to itself)
INDEX = "index"


@dataclass
class Tokens:
    """What a tokenizer makes of one stream of one sample (or, stacked, of a batch).

    values: [N, d]        the reconstruction target space (float; between tokenizer and
                          loader it may be a compact storage dtype, e.g. uint8 pixels, until
                          `Modality.finish` makes it float), or None for a discrete stream
    ids:    long [N]      discrete tokens (sub-words, atom types) whose target is a class index
    coords: float [N, k]  what the position encoding reads (grid (x, y), time, xyz, position)
    valid:  bool [N]      False on padding; None: every token is real
    grid:   the token grid's shape, in the tokenizer's row-major order (image: (rows, cols);
            voxel: (X, Y, Z)); None for tokens off a grid. Structured maskers and
            `untokenize` read it; it is the same for every sample of a batch.
    fields: further per-token tensors [N, ...] named by the modality (occupancy of a
            patch, the word a sub-word belongs to), batched like `values`
    edges:  long [2, E]   relations between this sample's tokens, in its token indices;
            batched by concatenation with offsets into the padded layout (b * N_max + i)
    edge_fields: per-edge tensors [E, ...], concatenated alike
    """

    values: Tensor | None = None
    coords: Tensor | None = None
    ids: Tensor | None = None
    valid: Tensor | None = None
    grid: tuple[int, ...] | None = None
    fields: dict[str, Tensor] = field(default_factory=dict)
    edges: Tensor | None = None
    edge_fields: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.values is None and self.ids is None:
            raise ValueError("Tokens need values or ids")
        if self.coords is None:  # a 1-D sequence: its position is its index
            n = self.num_tokens
            lead = self.primary.shape[:-2] if self.values is not None else self.ids.shape[:-1]
            self.coords = torch.arange(n, dtype=torch.float32).view(n, 1).expand(*lead, n, 1)

    @property
    def primary(self) -> Tensor:
        return self.values if self.values is not None else self.ids

    @property
    def num_tokens(self) -> int:
        return self.values.shape[-2] if self.values is not None else self.ids.shape[-1]

    @property
    def num_real(self) -> int:
        """Real (non-padding) tokens of one sample."""
        return self.num_tokens if self.valid is None else int(self.valid.sum())


@dataclass
class Mask:
    """One sample's (or, stacked, a batch's) mask; see the module docstring.

    hidden:      bool [N]   True = hidden (a target)
    ids_shuffle: long [N]   encoder inputs first, then the other hidden tokens, then padding
    ids_restore: long [N]   inverse of ids_shuffle
    num_visible: int        how many tokens the encoder reads (per batch: the longest row)
    keep_valid:  bool [B, num_visible] or None: which of a row's `ids_keep` are real (None: all)
    decode:      bool [N] or None: the hidden tokens the decoder reconstructs when fewer than
                 all (a running-cell decoder mask); None = every hidden token
    substitute:  long [N] or None: what each encoder input enters as (AS_ITSELF, AS_MASK_TOKEN,
                 or an id / token index >= 0); None = visible tokens as themselves only
    """

    hidden: Tensor
    ids_shuffle: Tensor
    ids_restore: Tensor
    num_visible: int
    keep_valid: Tensor | None = None
    decode: Tensor | None = None
    substitute: Tensor | None = None

    @property
    def ids_keep(self) -> Tensor:
        return self.ids_shuffle[..., : self.num_visible]

    @property
    def ids_hidden(self) -> Tensor:
        """The tokens after the encoder inputs (uniform batches: exactly the hidden ones)."""
        return self.ids_shuffle[..., self.num_visible:]

    @property
    def num_hidden(self) -> int:
        return int(self.hidden.sum())

    @classmethod
    def from_scores(cls, scores: Tensor, num_hidden: int, valid: Tensor | None = None,
                    encoder_reads_hidden: bool = False) -> "Mask":
        """Hide the `num_hidden` real tokens with the highest score.

        Every masker reduces to this: random masking scores with uniform noise,
        block and colour masking with structured scores. Padding (`valid` False)
        goes last and is neither visible nor hidden. A stable sort keeps the
        choice deterministic under ties. `encoder_reads_hidden` (BERT-style
        streams) keeps hidden tokens among the encoder inputs, in token order.
        """
        n = scores.shape[-1]
        real = n if valid is None else int(valid.sum())
        if not 0 <= num_hidden <= real:
            raise ValueError(f"cannot hide {num_hidden} of {real} tokens")
        if valid is not None and real < n:
            scores = torch.where(valid, scores.float(), torch.full_like(scores, torch.inf, dtype=torch.float32))
        order = torch.argsort(scores, dim=-1, stable=True)  # ascending: visible, hidden, padding
        if encoder_reads_hidden and scores.dim() == 1:  # every real token an encoder input, in its order
            hidden = torch.zeros(n, dtype=torch.bool)
            hidden[order[real - num_hidden:real]] = True
            if valid is None or real == n:  # no padding: the identity, its own inverse
                inputs = torch.arange(n)
                return cls(hidden=hidden, ids_shuffle=inputs, ids_restore=inputs, num_visible=real)
            inputs = torch.cat([valid.nonzero().flatten(), (~valid).nonzero().flatten()])
            return cls(hidden=hidden, ids_shuffle=inputs, ids_restore=inverse_permutation(inputs), num_visible=real)
        rank = inverse_permutation(order)
        hidden = (rank >= real - num_hidden) & (rank < real)
        if encoder_reads_hidden:  # rows of scores at once: every token an encoder input, in its order
            if valid is not None and real < valid.numel():
                raise ValueError("encoder_reads_hidden with padding needs one sample's scores at a time")
            inputs = torch.arange(n).expand_as(order)
            return cls(hidden=hidden, ids_shuffle=inputs, ids_restore=inputs, num_visible=real)
        return cls(hidden=hidden, ids_shuffle=order, ids_restore=rank, num_visible=real - num_hidden)


def inverse_permutation(order: Tensor) -> Tensor:
    """The inverse of a permutation along the last axis, by scattering positions (a second argsort would sort again)."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def hidden_count(num_tokens: int | np.ndarray, ratio: float) -> int | np.ndarray:
    """The exact number of tokens every masker hides: round(ratio * N) (half to even), at least one
    visible; of one sample, or elementwise of an array of samples' token counts."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if isinstance(num_tokens, np.ndarray):
        return np.maximum(np.minimum(np.rint(ratio * num_tokens).astype(np.int64), num_tokens - 1), 0)
    if num_tokens <= 0:
        return 0
    return min(int(round(ratio * num_tokens)), num_tokens - 1)


@dataclass
class Batch:
    """Per-stream stacked Tokens (in the recipe's stream order), one Mask over their
    concatenation, labels when the data has them, and bookkeeping.

    `skipped` counts records the data worker skipped since its previous batch,
    by kind; the trainer sums them so nothing is dropped without a count.
    `views` holds further views of the same sample (CropMAE's second crop).
    """

    streams: dict[str, Tokens]
    mask: Mask
    labels: Tensor | None = None
    keys: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    views: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.mask.hidden.shape[0]

    @property
    def tokens(self) -> Tokens:
        """The one stream of a single-stream batch."""
        if len(self.streams) != 1:
            raise ValueError(f"this batch has streams {list(self.streams)}; pick one from Batch.streams")
        return next(iter(self.streams.values()))

    @property
    def layout(self) -> dict[str, slice]:
        """Where each stream's tokens sit in the concatenation the Mask covers."""
        spans, start = {}, 0
        for name, tokens in self.streams.items():
            spans[name] = slice(start, start + tokens.num_tokens)
            start += tokens.num_tokens
        return spans

    def stream_mask(self, name: str) -> tuple[Tensor, Tensor | None]:
        """(hidden, decode) [B, N_stream] of one stream."""
        span = self.layout[name]
        decode = None if self.mask.decode is None else self.mask.decode[:, span]
        return self.mask.hidden[:, span], decode

    def target_weights(self, name: str) -> Tensor:
        """[B, N_stream] float: 1 on the stream's real tokens that are hidden (and decoded), else 0."""
        hidden, decode = self.stream_mask(name)
        weights = hidden if decode is None else hidden & decode
        valid = self.streams[name].valid
        if valid is not None:
            weights = weights & valid
        return weights.float()

    def map_tensors(self, fn: Callable[[Any], Any], kind: type = Tensor) -> "Batch":
        """The same batch with `fn` applied to every tensor in it (tokens, mask, labels, views),
        or to every object of `kind` that stands in for one (pipelines/transport.py)."""
        def apply(obj):
            if isinstance(obj, kind):
                return fn(obj)
            if isinstance(obj, (Tokens, Mask)):
                return replace(obj, **{f.name: apply(getattr(obj, f.name)) for f in fields(obj)})
            if isinstance(obj, dict):
                return {k: apply(v) for k, v in obj.items()}
            return obj

        return replace(self, streams=apply(self.streams), mask=apply(self.mask), labels=apply(self.labels),
                       views=apply(self.views))

    def to(self, device: torch.device | str) -> "Batch":
        return self.map_tensors(lambda t: t.to(device, non_blocking=True))


# -- batching ---------------------------------------------------------------------------------------

def stack_batch(columns: list, allocate: Callable[[int], Tensor] | None = None,
                fills: list | None = None) -> list[Tensor]:
    """Each column of per-sample tensors stacked along a new first axis, padded along the
    first per-sample axis to the column's longest, all into one block of memory. A column
    may also be one tensor already batched, copied in as it is.

    `fills[c]` is what column c's padding holds: 0 by default, another value, or INDEX
    (the padded position's own index, for 1-D index columns). The padding is written
    straight into the block and the samples' tokens go in with one copy per column
    (their concatenation scattered to the padded rows), not one per sample.

    `allocate(nbytes)` gives the block (uint8); by default it is ordinary memory. The data
    loader passes its workers' shared-memory ring (pipelines/transport.py): one block per
    batch is one thing to hand over to the main process, not one per tensor."""
    layout, total = [], 0
    for column in columns:
        total = -(-total // 64) * 64  # every tensor starts on a cache line, so any dtype is aligned
        if isinstance(column, Tensor):
            shape, dtype = tuple(column.shape), column.dtype
            lengths = None
        else:
            first = column[0]
            dtype, lengths = first.dtype, None if first.dim() == 0 else tuple(t.shape[0] for t in column)
            shape = (len(column), *first.shape) if lengths is None else (len(column), max(lengths), *first.shape[1:])
            if lengths is not None and min(lengths) == shape[1]:
                lengths = None  # nothing to pad
        nbytes = (column if isinstance(column, Tensor) else column[0]).element_size() * int(torch.Size(shape).numel())
        layout.append((total, nbytes, shape, dtype, lengths))
        total += nbytes
    block = allocate(total) if allocate is not None else torch.empty(total, dtype=torch.uint8)
    stacked, rows_of = [], {}
    for c, (column, (offset, nbytes, shape, dtype, lengths)) in enumerate(zip(columns, layout)):
        out = block[offset:offset + nbytes].view(dtype).view(shape)
        if isinstance(column, Tensor):
            out.copy_(column)
        elif lengths is None:
            torch.stack(column, out=out)
        else:
            if lengths not in rows_of:  # where the samples' tokens go in the flattened [B * N_max] rows
                real = torch.arange(shape[1]) < torch.tensor(lengths)[:, None]
                rows_of[lengths] = real.view(-1).nonzero().flatten()
            fill = 0 if fills is None or fills[c] is None else fills[c]
            if fill == INDEX:
                out.copy_(torch.arange(shape[1], dtype=dtype).expand(shape))
            else:
                out.fill_(fill)
            out.view(shape[0] * shape[1], *shape[2:]).index_copy_(0, rows_of[lengths], torch.cat(column))
        stacked.append(out)
    return stacked


def joint_mask(masks: list[Mask], lengths: list[int], padded: list[int]) -> Mask:
    """One sample's stream masks -> one Mask over the streams concatenated, each padded to
    `padded[s]` tokens: encoder inputs of every stream first, then hidden tokens, then padding."""
    if len(masks) == 1 and lengths[0] == padded[0]:
        return masks[0]
    inputs, rest, pads, hidden, decode, substitute = [], [], [], [], [], []
    offset = 0
    any_decode = any(m.decode is not None for m in masks)
    any_substitute = any(m.substitute is not None for m in masks)
    for mask, length, width in zip(masks, lengths, padded):
        inputs.append(mask.ids_keep + offset)
        rest.append(mask.ids_shuffle[mask.num_visible:] + offset)  # hidden, then the tokenizer's own padding
        pads.append(torch.arange(offset + length, offset + width))
        hidden.append(torch.nn.functional.pad(mask.hidden, (0, width - length)))
        if any_decode:
            own = mask.decode if mask.decode is not None else mask.hidden
            decode.append(torch.nn.functional.pad(own, (0, width - length)))
        if any_substitute:
            own = mask.substitute if mask.substitute is not None else torch.full((length,), AS_ITSELF)
            substitute.append(torch.nn.functional.pad(own, (0, width - length), value=AS_ITSELF))
        offset += width
    order = torch.cat(inputs + rest + pads)
    return Mask(hidden=torch.cat(hidden), ids_shuffle=order, ids_restore=inverse_permutation(order),
                num_visible=sum(len(i) for i in inputs), decode=torch.cat(decode) if any_decode else None,
                substitute=torch.cat(substitute) if any_substitute else None)


def collate(items: list[tuple[dict[str, Tokens], dict[str, Mask] | None, Any, str]],
            skipped: dict[str, int] | None = None, allocate: Callable[[int], Tensor] | None = None,
            mask: Mask | None = None) -> Batch:
    """Per-sample (streams, stream masks, label, key) -> one Batch, in one block (`stack_batch`).

    Each stream's per-token tensors are padded to the batch's longest with `valid` False
    (stacked as they are when every sample has the same count), its edges concatenated
    with offsets into the padded layout; the stream masks join into one Mask (`joint_mask`).
    `mask`: a one-stream batch's Mask already stacked so (`Masker.stacked`); the items then
    carry None for their masks.
    """
    keys = [key for _, _, _, key in items]
    names = list(items[0][0])
    for streams, _, _, key in items:
        if list(streams) != names:
            raise ValueError(f"record {key!r} has streams {list(streams)}, the batch {names}")
    columns: dict[str, list[Tensor] | Tensor] = {}
    fills: dict[str, Any] = {}
    padded, lengths_per_stream = {}, {}
    for name in names:
        per_sample = [streams[name] for streams, _, _, _ in items]
        lengths = [t.num_tokens for t in per_sample]
        lengths_per_stream[name], padded[name] = lengths, max(lengths)
        ragged = len(set(lengths)) > 1
        first = per_sample[0]
        if first.grid is not None and any(t.grid != first.grid for t in per_sample):
            raise ValueError(f"stream {name!r}: records of token grids {sorted({t.grid for t in per_sample})} "
                             f"(keys {keys[:4]}...) cannot share a batch: resize them to one grid")
        for part in ("values", "ids", "coords"):
            if getattr(first, part) is not None:
                columns[f"{name}/{part}"] = [getattr(t, part) for t in per_sample]
        if all(t.valid is None for t in per_sample):
            if ragged:  # real where a position is under the sample's length: one comparison for the batch
                columns[f"{name}/valid"] = torch.arange(padded[name])[None, :] < torch.tensor(lengths)[:, None]
        else:
            columns[f"{name}/valid"] = [t.valid if t.valid is not None else torch.ones(t.num_tokens, dtype=torch.bool)
                                        for t in per_sample]
        for part in first.fields:
            columns[f"{name}/fields/{part}"] = [t.fields[part] for t in per_sample]
    if mask is not None:  # stacked by its masker: copied into the block as it is
        if len(names) != 1:
            raise ValueError(f"a stacked mask covers one stream; this batch has {names}")
        for part in ("hidden", "ids_shuffle", "ids_restore", "decode", "substitute"):
            if getattr(mask, part) is not None:
                columns[f"mask/{part}"] = getattr(mask, part)
        visible = [mask.num_visible]
    elif len(names) == 1:
        # one stream: its masks padded in the block are what joint_mask would give (the padding
        # neither hidden nor decoded, entering as itself, and last in ids_shuffle: at its own index)
        masks = [m[names[0]] for _, m, _, _ in items]
        columns["mask/hidden"] = [m.hidden for m in masks]
        columns["mask/ids_shuffle"] = [m.ids_shuffle for m in masks]
        columns["mask/ids_restore"] = [m.ids_restore for m in masks]
        fills.update({"mask/ids_shuffle": INDEX, "mask/ids_restore": INDEX, "mask/substitute": AS_ITSELF})
        if any(m.decode is not None for m in masks):
            columns["mask/decode"] = [m.decode if m.decode is not None else m.hidden for m in masks]
        if any(m.substitute is not None for m in masks):
            columns["mask/substitute"] = [m.substitute if m.substitute is not None else
                                          torch.full(m.hidden.shape, AS_ITSELF) for m in masks]
    else:
        masks = [joint_mask([m[n] for n in names], [lengths_per_stream[n][i] for n in names],
                            [padded[n] for n in names]) for i, (_, m, _, _) in enumerate(items)]
        for part in ("hidden", "ids_shuffle", "ids_restore", "decode", "substitute"):
            if getattr(masks[0], part) is not None:
                columns[f"mask/{part}"] = [getattr(m, part) for m in masks]
    if mask is None:
        visible = [m.num_visible for m in masks]
    labels = [lab for _, _, lab, _ in items]
    if all(isinstance(lab, (bool, int, float)) for lab in labels):  # class indices, values: one tensor at once
        columns["labels"] = torch.tensor(labels)
    elif all(lab is not None for lab in labels):
        columns["labels"] = [torch.as_tensor(lab) for lab in labels]
    out = dict(zip(columns, stack_batch(list(columns.values()), allocate, [fills.get(c) for c in columns])))

    streams = {}
    for name in names:
        first = items[0][0][name]
        edges, edge_fields = concat_edges([s[name] for s, _, _, _ in items], padded[name])
        streams[name] = Tokens(values=out.get(f"{name}/values"), ids=out.get(f"{name}/ids"),
                               coords=out[f"{name}/coords"], valid=out.get(f"{name}/valid"), grid=first.grid,
                               fields={part: out[f"{name}/fields/{part}"] for part in first.fields},
                               edges=edges, edge_fields=edge_fields)
    keep_valid = None if mask is None else mask.keep_valid
    if len(set(visible)) > 1:
        keep_valid = torch.arange(max(visible))[None, :] < torch.tensor(visible)[:, None]
    mask = Mask(hidden=out["mask/hidden"], ids_shuffle=out["mask/ids_shuffle"], ids_restore=out["mask/ids_restore"],
                num_visible=max(visible), keep_valid=keep_valid, decode=out.get("mask/decode"),
                substitute=out.get("mask/substitute"))
    return Batch(streams=streams, mask=mask, labels=out.get("labels"), keys=keys, skipped=dict(skipped or {}))


def concat_edges(per_sample: list[Tokens], width: int) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Per-sample edges [2, E_i] (local indices) -> [2, sum E_i] into the padded layout
    (sample b's token i is b * width + i, as PyG's Batch offsets graphs), with their fields."""
    if per_sample[0].edges is None:
        return None, {}
    counts = torch.tensor([t.edges.shape[1] for t in per_sample])
    offsets = (torch.arange(len(per_sample)) * width).repeat_interleave(counts)  # one add, not one per sample
    edges = torch.cat([t.edges for t in per_sample], dim=1) + offsets
    fields_ = {name: torch.cat([t.edge_fields[name] for t in per_sample]) for name in per_sample[0].edge_fields}
    return edges, fields_
