"""The CPU threads decoding runs on: `set_threads`, the most a step may use (`--threads`), and
`StepThreads`, how many of them a step takes (`minilab.generate`'s decoders ask it each step).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from minilab.errors import MinilabError

# Multiply-adds (parameters x tokens) a decoding step gives each torch thread it runs on: a step with
# less work runs on fewer threads, down to one. Measured on a 2-core VM, ms a step on 1 / 2 threads:
# `micro` (1.9M parameters) 1 row 0.59 / 0.61, 4 rows 1.07 / 1.05, 5 rows 1.29 / 1.09, 8 rows
# 1.56 / 1.27; `tiny` (13.5M) 1 row 2.80 / 2.52, 8 rows 8.3 / 6.1; `small` (57.7M) 12.5 / 9.7
STEP_WORK_PER_THREAD = 4_000_000
# Steps (of those the work gives several threads) between two checks against the machine, and how
# much faster the other setting must be at a check to be kept (see `StepThreads`)
CHECK_EVERY = 32
CHECK_MARGIN = 0.9
# Whether torch's thread count can be changed per step (OpenMP; torch's own pool keeps its size)
_OPENMP = torch.backends.openmp.is_available()


def model_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class StepThreads:
    """The torch threads the decoding steps of a model of `params` parameters run on.

    A step of `tokens` tokens (rows x new positions) takes one thread per `STEP_WORK_PER_THREAD` of
    its multiply-adds, at most torch's count (the cores, or `--threads`), set back after the step.
    Why: a one-row step of a small model is too short to split (a second thread only adds
    synchronisation), while eight rows of it, or one row of a larger model, gain 10-30% from a
    second core. Then checked against the machine: the threads wait for each other at every
    product, so while another program kept one of two cores busy, `tiny` decoded 2.7x slower on two
    threads than on one, which the work cannot tell. So every `CHECK_EVERY`-th step that would take
    several threads runs on the other setting (one thread, or back to several), and where it took
    under `CHECK_MARGIN` of the step before it of as many tokens, that setting is kept until the
    next check. (torch's OpenMP thread count is per calling thread, so steps driven from different
    threads do not undo each other's; a torch built on its own thread pool cannot resize it once
    used, and is left at its count.)"""

    def __init__(self, params: int):
        self.params = params
        self.alone = False      # steps the work gives several threads run on one (the last check)
        self.steps = 0          # steps the work gives several threads
        self.last: tuple[int, float] | None = None  # (tokens, seconds) of the last such step, not a check

    @contextmanager
    def __call__(self, tokens: int) -> Iterator[None]:
        allowed = torch.get_num_threads()
        threads = max(1, min(allowed, self.params * tokens // STEP_WORK_PER_THREAD))
        several = threads > 1 and _OPENMP
        check = False
        if several:
            self.steps += 1
            check = self.steps % CHECK_EVERY == 0
            if self.alone != check:  # one thread: as the last check found, or this step checks it
                threads = 1
        resize = threads != allowed and _OPENMP
        if resize:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if resize:
                torch.set_num_threads(allowed)
        seconds = time.perf_counter() - t0
        if not several:
            return
        if not check:
            self.last = (tokens, seconds)
        elif self.last is not None and self.last[0] == tokens and seconds < CHECK_MARGIN * self.last[1]:
            self.alone = threads == 1


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_threads_for(model: torch.nn.Module) -> StepThreads:
    """The model's `StepThreads`, kept with the model: each reply of a chat carries on from the last
    one's checks rather than starting over."""
    threads = _BY_MODEL.get(model)
    if threads is None:
        threads = _BY_MODEL[model] = StepThreads(model_params(model))
    return threads


def set_threads(threads: int | None) -> int:
    """Set the most CPU threads a decoding step uses (`--threads`; default: torch's count,
    the cores) and return it. Each step takes as many of them as its work calls for, one on a small
    model's one-row step (`StepThreads`)."""
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise MinilabError(f"--threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
