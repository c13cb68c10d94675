"""Freed host memory kept for the next training step instead of handed back to the system (glibc).

Every training step frees and allocates the same large CPU tensors again (activations, gradients,
the fused head's logits chunks). glibc's malloc serves each allocation above its mmap threshold
(128 KiB at first, raised as such blocks are freed, at most 32 MiB) with fresh pages from the
kernel, and returns the top of its heap once more than the trim threshold is free there: so every
step takes thousands of page faults, each a kernel entry and a zeroed 4 KiB page. Measured on a
2-core CPU (benchmarks/train_throughput.py's shapes, batch 8 x 256, three interleaved pairs of
runs): 9-43 thousand faults a step; with both thresholds at 1 GiB under 1,000, and a step's time
`tiny` fp32 -1% (641 -> 631, 678 -> 671, 664 -> 666 ms), `tiny` bf16 -8% (430 -> 397, 497 -> 459,
496 -> 454), `small` fp32 -1 to -6%; peak RSS the same (the heap's pages are reused instead); the
demo's 5-minute pretraining 845 steps instead of 795. What jemalloc or tcmalloc preloaded would do,
done with glibc's own `mallopt` (the mmap threshold 32 MiB where a glibc refuses more: 2.36 here
takes 1 GiB, some older versions cap it).

`reuse_freed_memory()` wraps each training loop (`TrainingRun.fit`): the thresholds are raised when
it starts and the free memory is handed back to the system when it ends (`malloc_trim`), so a
process that trains and then evaluates or serves does not sit on the training's peak. The thresholds
stay raised after it: glibc has no way back to its adaptive ones, and its fixed defaults would map
fresh pages for every allocation above 128 KiB from then on (measured: 283 thousand faults and 945
ms for a `tiny` step that takes 685 ms untouched). Where the C library is not glibc (macOS,
Windows, musl) nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 2**30                                # both thresholds, from the first training loop on
CAPPED_BYTES = 32 * 2**20                         # the most some glibc versions take as mmap threshold


def _glibc():
    """The process's C library where it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    names = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, n) for n in names) else None


def keep_freed_memory() -> int:
    """Keep freed blocks in the heap for reuse from now on; the size up to which they are kept (1 GiB,
    or 32 MiB where glibc refuses more), 0 where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return 0
    # the trim threshold only once a mmap threshold is taken: setting either ends glibc's adaptive
    # thresholds, and a trim threshold alone would leave the mmap one where it happened to be
    kept = next((n for n in (KEEP_BYTES, CAPPED_BYTES) if libc.mallopt(M_MMAP_THRESHOLD, n) == 1), 0)
    return kept if kept and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1 else 0


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[int]:
    """`keep_freed_memory()` for the block, its free memory released after (also on an exception)."""
    kept = keep_freed_memory()
    try:
        yield kept
    finally:
        release_free_memory()
