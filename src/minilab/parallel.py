"""Worker processes for CPU-bound data stages (`corpus`, `pack`): one pool, bounded memory, order kept.

`ordered_map` feeds a pool from an iterator with at most `in_flight` items queued and yields the
results in input order, so memory stays flat whatever the input size (`Pool.imap` would pull the
whole input iterator into its task queue) and the output does not depend on the worker count.
With one worker everything runs in this process, without a pool. A worker that dies (killed,
out of memory) stops the run with a one-line error instead of waiting for it forever.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from minilab.errors import MinilabError


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. under `taskset`), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """A `workers` setting as a process count: 0 means every available core."""
    return workers if workers > 0 else cpu_cores()


@contextmanager
def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> Iterator[Any]:
    """A process pool of `workers` (each set up by `initializer(*initargs)`), or None for one worker,
    in which case this process is set up instead."""
    if workers <= 1:
        initializer(*initargs)
        yield None
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn" if os.name == "nt" else "forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        yield pool


def ordered_map(pool: Any, fn: Callable[[Any], Any], items: Iterable[Any], in_flight: int) -> Iterator[Any]:
    """fn(item) for every item, in order: in `pool` with at most `in_flight` items queued, or here
    when `pool` is None."""
    if pool is None:
        yield from map(fn, items)
        return
    from concurrent.futures.process import BrokenProcessPool

    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise MinilabError("a worker process died (killed, or out of memory: see `dmesg`); run again with "
                           "fewer --workers (1 runs everything in one process)") from None
