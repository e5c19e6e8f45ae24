"""Batches from DataLoader workers to the main process through shared memory that is reused.

PyTorch hands every batch a worker makes over in a fresh shared-memory segment: the
worker creates and fills it (every 4 KiB page faulting on first touch), passes its file
descriptor through a socket (a connection and an authentication handshake per batch),
and the main process maps it and faults every page again as it reads. For 224px images
on a 2-core VM that cost the main process 0.18-0.28 ms per image, nearly what decoding
one costs, and the workers 0.1 ms more (benchmarks/pipeline.py; with the ring: 0.06 ms).

Here each worker keeps a ring of blocks that stay mapped in both processes:

    worker:  collate stacks a batch into a free block of its ring (`RingWriter.allocate`)
             -> `RingWriter.pack`: the batch's tensors become (offset, dtype, shape) notes
    main:    `BatchRing.unpack`: views of its own mapping of that block
             -> the Loader moves and finishes the batch
             -> `BatchRing.release`: copies out whatever still points into the block, frees it

A block travels as a tensor only when its slot is first used, grows, or a new pass
begins; after that a batch costs a few hundred bytes of pickle. Whether a slot is free
is a flag in shared memory that only the main process clears, after its copy-out, so a
worker never writes into a block the main process may still read: a worker that finds
every slot busy (more batches in flight than the ring holds) stacks into a one-off
segment, as PyTorch would. What the Loader yields is copied out, so a caller may keep
batches as long as it likes without holding a slot. Each pass starts with the worker's
whole ring free: by then the main process has consumed or, leaving a pass early,
discarded all the worker's batches.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from polymae.shared.errors import ConfigError, TrainingError
from polymae.shared.tokens import Batch

FREE, BUSY = 0, 1
GROWTH = 1.25  # a slot that must grow gets this headroom, so batches of varying size settle quickly


def shared_block(nbytes: int) -> Tensor:
    """`nbytes` of shared memory as a uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)))


def flag_index(worker: int, slot: int, slots: int) -> int:
    """Where a worker's slot keeps its free/busy flag in the shared array."""
    return worker * slots + slot


@dataclass(frozen=True)
class BlockView:
    """Where one tensor of a packed batch lies in its block."""
    offset: int              # in elements of `dtype`
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class Packed:
    """A batch as it crosses: its tensors in the block are BlockViews; `block` rides along
    only when the main process has not mapped this slot's current block yet."""
    batch: Batch
    worker: int
    slot: int
    generation: int
    block: Tensor | None


class RingWriter:
    """A worker's side of the ring: where collate stacks its batches, and how they are packed."""

    def __init__(self, flags, worker: int, slots: int):
        self.flags, self.worker, self.slots = flags, worker, slots
        self.blocks: list[Tensor | None] = [None] * slots
        self.generations = [0] * slots
        self.sent = [False] * slots
        self.current: int | None = None  # the slot of the batch being made, until it is packed

    def flag(self, slot: int) -> int:
        return flag_index(self.worker, slot, self.slots)

    def new_pass(self) -> None:
        """Every batch of the previous pass is consumed or discarded: all slots free, and the
        main process may have missed a block (one discarded unread), so each is sent again."""
        for slot in range(self.slots):
            self.flags[self.flag(slot)] = FREE
            self.sent[slot] = False
        self.current = None

    def allocate(self, nbytes: int) -> Tensor:
        """A uint8 tensor of `nbytes` in shared memory: the lowest free slot (so a ring only grows
        as far as the batches in flight need), else a one-off segment."""
        for slot in range(self.slots):
            if self.flags[self.flag(slot)] == FREE:
                break
        else:
            self.current = None
            return shared_block(nbytes)
        block = self.blocks[slot]
        if block is None or block.numel() < nbytes:
            size = nbytes if block is None else int(nbytes * GROWTH)
            block = shared_block(size)
            self.blocks[slot], self.sent[slot] = block, False
            self.generations[slot] += 1
        self.flags[self.flag(slot)] = BUSY
        self.current = slot
        return block[:nbytes]

    def pack(self, batch: Batch) -> Batch | Packed:
        """The batch just made, with its tensors in the current slot's block noted as BlockViews
        (a batch made without the ring, e.g. a skip report, goes as it is)."""
        slot, self.current = self.current, None
        if slot is None:
            return batch
        block = self.blocks[slot]
        base = block.untyped_storage().data_ptr()

        def note(t: Tensor):
            if t.untyped_storage().data_ptr() != base:
                return t
            return BlockView(t.storage_offset(), t.dtype, tuple(t.shape), t.stride())

        packed = Packed(batch.map_tensors(note), self.worker, slot, self.generations[slot],
                        None if self.sent[slot] else block)
        self.sent[slot] = True
        return packed


class BatchRing:
    """The rings of all of a loader's workers: made in the main process before the workers
    start (they inherit the flags), unpacked and released there."""

    def __init__(self, num_workers: int, slots: int):
        self.slots = slots
        self.flags = multiprocessing.Array("b", num_workers * slots, lock=False)
        self.mapped: dict[tuple[int, int], tuple[int, Tensor]] = {}  # (worker, slot) -> (generation, block)

    def writer(self, worker: int) -> RingWriter:
        return RingWriter(self.flags, worker, self.slots)

    def unpack(self, message: Batch | Packed) -> tuple[Batch, tuple[int, int] | None]:
        """(the batch, its (worker, slot) or None): tensors in the ring become views of this
        process's mapping of the block, which stays mapped for the slot's next batches."""
        if not isinstance(message, Packed):
            return message, None
        where = (message.worker, message.slot)
        if message.block is not None:
            self.mapped[where] = (message.generation, message.block)
        generation, block = self.mapped.get(where, (None, None))
        if generation != message.generation:
            raise RuntimeError(f"worker {message.worker} slot {message.slot}: batch of block generation "
                               f"{message.generation}, but generation {generation} is mapped here")
        storage = block.untyped_storage()

        def view(note: BlockView) -> Tensor:
            return torch.empty(0, dtype=note.dtype).set_(storage, note.offset, note.shape, note.stride)

        return message.batch.map_tensors(view, kind=BlockView), where

    def release(self, batch: Batch, where: tuple[int, int] | None) -> Batch:
        """Copy out what still points into the slot's block (what moving and finishing the batch
        did not already replace), then let the worker have the slot again. (A copy to a GPU has
        read the block by the time `Batch.to` returns: CUDA stages pageable memory, which the
        block is, before an asynchronous copy returns.)"""
        if where is None:
            return batch
        base = self.mapped[where][1].untyped_storage().data_ptr()
        batch = batch.map_tensors(lambda t: t.clone() if t.untyped_storage().data_ptr() == base else t)
        self.flags[flag_index(*where, self.slots)] = FREE
        return batch


@dataclass(frozen=True)
class WorkerStopped:
    """A worker's stream ended the run (no usable record, a bad setting): the error travels as a
    message and the Loader raises it as it is; the DataLoader would have wrapped it in the
    worker's traceback, which the CLI would print instead of one line."""
    error: Exception


class RingFeed(IterableDataset):
    """What the Loader's DataLoader iterates: in a worker, the stream's batches stacked into
    the worker's ring and packed; in the main process (no workers), the stream itself."""

    def __init__(self, stream, ring: BatchRing):
        super().__init__()
        self.stream, self.ring = stream, ring
        self.writer: RingWriter | None = None

    def __iter__(self) -> Iterator[Batch | Packed]:
        info = get_worker_info()
        if info is None:
            yield from self.stream
            return
        if self.writer is None:
            self.writer = self.ring.writer(info.id)
            self.stream.allocate = self.writer.allocate
        self.writer.new_pass()
        try:
            for batch in self.stream:
                yield self.writer.pack(batch)
        except (ConfigError, TrainingError) as error:  # the DataLoader would re-raise it with its traceback
            yield WorkerStopped(error)
