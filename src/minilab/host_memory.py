"""Freed host memory kept for the next training step instead of handed back to the system (glibc).

Every training step frees and allocates the same large CPU tensors again (activations, gradients,
the fused head's logits chunks). glibc's malloc serves each allocation above its mmap threshold
(128 KiB at first, raised as such blocks are freed, at most 32 MiB) with fresh pages from the
kernel, and returns the top of its heap once more than the trim threshold is free there: so every
step takes thousands of page faults, each a kernel entry and a zeroed 4 KiB page. Measured on a
2-core CPU, `tiny` shape (benchmarks/train_throughput.py), 10-30 thousand faults a step; with both
thresholds at 1 GiB, under 1,000 and none: fp32 ~3% and bf16 ~5-20% less time a step, peak RSS no
higher (the heap's pages are reused instead). What jemalloc or tcmalloc preloaded would do, done
with glibc's own `mallopt`.

`reuse_freed_memory()` holds the setting for one training loop (`TrainingRun.fit`), then puts
glibc's fixed defaults back and returns the free memory at once (`malloc_trim`), so a process that
trains and then serves does not keep the training's peak. Where the C library is not glibc (macOS,
Windows, musl) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 2**30                                # both thresholds while a loop runs
DEFAULT_BYTES = 128 * 2**10                       # glibc's initial values of both


def _glibc():
    """The process's C library where it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    names = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, n) for n in names) else None


def keep_freed_memory(keep: bool) -> bool:
    """Keep freed blocks of up to 1 GiB in the heap for reuse (`keep`), or put glibc's defaults
    back and return what is free to the system. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    value = KEEP_BYTES if keep else DEFAULT_BYTES
    ok = libc.mallopt(M_MMAP_THRESHOLD, value) == 1 and libc.mallopt(M_TRIM_THRESHOLD, value) == 1
    if not keep:
        libc.malloc_trim(0)
    return ok


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """`keep_freed_memory(True)` for the block, its defaults back after (also on an exception)."""
    kept = keep_freed_memory(True)
    try:
        yield kept
    finally:
        if kept:
            keep_freed_memory(False)
