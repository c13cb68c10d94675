"""The CPU threads decoding runs on: `set_threads`, the most a step may use (`--threads`), and
`step_threads`, how many of them a step takes for its work (`minilab.generate`'s decoders use it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from minilab.errors import MinilabError

# Multiply-adds (parameters x tokens) a decoding step gives each torch thread it runs on: a step with
# less work runs on fewer threads, down to one. Measured on a 2-core VM, ms a step on 1 / 2 threads:
# `micro` (1.9M parameters) 1 row 0.59 / 0.61, 4 rows 1.07 / 1.05, 5 rows 1.29 / 1.09, 8 rows
# 1.56 / 1.27; `tiny` (13.5M) 1 row 2.80 / 2.52, 8 rows 8.3 / 6.1; `small` (57.7M) 12.5 / 9.7
STEP_WORK_PER_THREAD = 4_000_000


def model_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def step_threads(params: int, tokens: int) -> Iterator[None]:
    """Run a decoding step of `tokens` tokens (rows x new positions) through a model of `params`
    parameters on one torch thread per `STEP_WORK_PER_THREAD` of its multiply-adds, at most torch's
    thread count (the cores, or `--threads`), which is set back after. Why: a one-row step of a small
    model is too short to split (a second thread only adds synchronisation, and on a busy machine a
    thread waiting for a core costs a time slice), while eight rows of it, or one row of a larger
    model, gain 10-30% from a second core. (torch's OpenMP thread count is per calling thread, so
    steps driven from different threads do not undo each other's; a torch built on its own thread
    pool instead cannot resize it once used, and keeps its count.)"""
    allowed = torch.get_num_threads()
    threads = max(1, min(allowed, params * tokens // STEP_WORK_PER_THREAD))
    if threads == allowed or not torch.backends.openmp.is_available():
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(allowed)


def set_threads(threads: int | None) -> int:
    """Set the most CPU threads a decoding step uses (`--threads`; default: torch's count,
    the cores) and return it. Each step takes as many of them as its work calls for, one on a small
    model's one-row step (`step_threads`)."""
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise MinilabError(f"--threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
