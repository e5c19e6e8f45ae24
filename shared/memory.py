"""Keep freed memory in the process instead of handing it back to the kernel.

A batch's tensors are megabytes: above glibc's mmap threshold (128 KiB to
start with), each is a fresh mapping of its own, given back when freed, so
every 4 KiB page of the next one faults again on first touch. On this kind
of machine (a VM, where a fault costs microseconds) that was most of the
data loader's main-process time: 320,000-716,000 faults per 2,048 images
in benchmarks/pipeline.py's loader, 21,000-26,000 with the thresholds
below, and a 10-20% faster forward pass in benchmarks/train_step.py
(glibc's own adaptive threshold gets there only some of the time).
jemalloc or tcmalloc preloaded would do the same; this needs no install.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed: allocations below it come from the reusable heap
TRIM_THRESHOLD = 1 << 30    # give the heap's free top back only once a GiB of it is idle


@functools.cache
def glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def reuse_freed_memory() -> bool:
    """Tune glibc's malloc (once per process; forked workers inherit it). False where the C
    library is not glibc (macOS, musl): nothing changes there."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                      TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim; False elsewhere).

    Call it just before forking workers. Free memory kept for reuse (above) is shared
    copy-on-write with every child after a fork, so the parent's next write to each such
    page copies it, and so does each child's: after benchmarks/visible_only.py had left
    2.3 GB of freed activations in the process, a data loader forked from it ran at a
    third of its speed (1,068 vs 2,734 images/s), page copies taking the difference."""
    libc = glibc()
    return libc is not None and bool(libc.malloc_trim(0))
