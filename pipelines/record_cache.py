"""Decoded records kept in a data worker's memory for the passes after its first.

A small dataset is read many times over: the default recipe's 1,433 digits make
a batch of 64 in 22 records per epoch and 3,000 steps read each of them 134
times, and parsing its tar headers and decoding its PNG was 60% of what each
record cost a worker (the rest is what changes per epoch: crop, flip, tokens,
mask, batch). So a worker keeps, per shard it reads to the end without damage,
the records it read and, as they are decoded, what decoding made of them; a
later pass over that shard replays them in the same order and only tokenizes
and masks them afresh. Batches, masks and skip counts are exactly those of
reading the shard again (a record that failed to decode fails again, with the
same error); only the time differs.

Kept within `budget` bytes per worker (raw bytes plus decoded arrays): shards are
kept while they fit, and a shard that does not is read as usual (never held whole in
memory on the way: collecting it stops where it would overrun); a decoded record
that does not fit is decoded again next time. So a dataset too large to cache costs
one comparison per record. Only a stream whose modalities promise that tokenizing
never writes into what `decode` returned (`Modality.decoded_cacheable`) is cached.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

SLOT = "__decoded_slot__"  # a cached record's holder of its decoded payloads (shared by its copies)


def payload_nbytes(value: Any) -> int:
    """The memory a record's entry or decoded payload holds (tensors, arrays, bytes, text, nested dicts)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(payload_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_nbytes(v) for v in value)
    return 64  # a number, a label, an error: small


class DecodedCache:
    """One worker's cache, keyed by (shard, part). While reading a shard, `collect` gathers its
    records and gives each a slot for its decoded payloads; `keep(key, records)` offers the
    shard once it was read to its end; `replay(key, draw)` gives a kept shard's records again;
    `decoded(sample)` / `store(sample, result)` read and fill a record's slot as the stream
    decodes it."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.shards: dict[tuple, list[dict]] = {}
        self.enabled = budget > 0  # the stream collects (and so gives slots) only when it is
        self.pending = 0  # bytes of the shard being collected

    def replay(self, key: tuple, draw: int | None) -> Iterator[dict] | None:
        """A kept shard's records as reading it again yields them: the same dicts, or, for a
        further draw or pass (`draw`), copies marked with it (sharing their slots); None when
        the shard is not kept."""
        records = self.shards.get(key) if self.enabled else None
        if records is None:
            return None
        return iter(records) if draw is None else ({**record, "__draw__": draw} for record in records)

    def collect(self, read: list[dict], sample: dict) -> list[dict] | None:
        """Add a record read from a shard to what the shard has delivered so far and give it its
        slot; None (stop collecting) once the shard's records alone would overrun the budget, so
        a shard too large to keep is never held in memory."""
        self.pending = (self.pending if read else 0) + sum(payload_nbytes(v) for v in sample.values())
        if self.used + self.pending > self.budget:
            self.discard(read)
            return None
        sample[SLOT] = [None, 0]  # decoded payloads (or error), their bytes
        read.append(sample)
        return read

    def discard(self, records: list[dict]) -> None:
        """Records of a shard that will not be kept (too large, damaged, left early): their slots go,
        with the bytes their decoded payloads were counted for; those still in flight decode as usual."""
        for record in records:
            slot = record.pop(SLOT, None)
            if slot is not None and slot[0] is not None:
                self.used -= slot[1]

    def keep(self, key: tuple, records: list[dict], complete: bool = True) -> None:
        """A shard read to its end, kept when it delivered every record it promises (`complete`) and
        fits, and no key repeats in it (replaying could not tell the two apart); otherwise its slots
        are discarded. Kept as copies without the read's draw mark: the records themselves may
        still wait in the shuffle buffer."""
        size = sum(payload_nbytes(v) for r in records for k, v in r.items() if k != SLOT)
        if not complete or len({r["__key__"] for r in records}) != len(records) or not self.reserve(size):
            self.discard(records)
            return
        self.shards[key] = [{k: v for k, v in r.items() if k != "__draw__"} for r in records]

    def reserve(self, size: int) -> bool:
        """Count `size` more bytes against the budget, if they fit."""
        if self.used + size > self.budget:
            return False
        self.used += size
        return True

    @staticmethod
    def decoded(sample: dict) -> Any:
        """What decoding this record gave before (its payloads, or the BadInput it raised), or None."""
        slot = sample.get(SLOT)
        return None if slot is None else slot[0]

    def store(self, sample: dict, result: Any) -> None:
        slot = sample.get(SLOT)
        if slot is None or slot[0] is not None:
            return
        size = payload_nbytes(result)
        if self.reserve(size):
            slot[0], slot[1] = result, size
