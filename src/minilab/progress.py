"""Live progress bars that degrade to plain lines: training steps (`StepProgress`: step, loss,
tokens/s, ETA) and input bytes (`ByteProgress`: MB read, MB/s, ETA, for `corpus`).

On a terminal each is a rich bar; in a log file (CI, nohup) it prints a line every ~5% so the
log shows progress without a flood of carriage returns.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class StepProgress:
    def __init__(self, total: int, start: int = 0, description: str = "train", enabled: bool = True):
        self.total, self.start, self.description = total, start, description
        self.enabled = enabled  # off on ranks other than 0: one bar per run, not per process
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal and enabled
        self._t0 = time.perf_counter()
        self._next_line = start
        self._progress: Progress | None = None

    def __enter__(self) -> StepProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.start,
                                                 loss="-", rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, step: int, loss: float | None = None, tok_s: float | None = None, unit: str = "tok/s",
               mfu: float | None = None) -> None:
        rate = f"{tok_s:,.0f} {unit}" if tok_s is not None else ""
        if mfu is not None:
            rate += f" MFU {100 * mfu:.1f}%"
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss_text, rate=rate)
            return
        if self.enabled and (step >= self._next_line or step == self.total):
            done = step - self.start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"{self.description} {step}/{self.total} loss {loss_text} {rate} "
                  f"elapsed {elapsed:.0f}s ETA {eta:.0f}s", file=sys.stderr, flush=True)
            self._next_line = step + max(1, self.total // 20)

    def set_total(self, total: int) -> None:
        """A new number of steps (a time-budgeted run re-planned its length)."""
        if total != self.total:
            self.total = total
            if self._progress is not None:
                self._progress.update(self._task, total=total)

    def note(self, text: str) -> None:
        """A line printed above the bar (eval results)."""
        if not self.enabled:
            return
        self.console.print(text, highlight=False) if self.live else print(text, file=sys.stderr, flush=True)


class ByteProgress:
    """Progress through `total` input bytes (None when unknown: no bar or ETA, only MB and MB/s).

    In a log file a line is printed every ~5% of the input, and only once the run has taken more
    than `quiet_s` seconds, so small runs print nothing but their result."""

    quiet_s = 2.0

    def __init__(self, total: int | None, description: str = "corpus"):
        self.total, self.description = total or None, description
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self._t0 = time.perf_counter()
        self._next_line = 0.0
        self._progress: Progress | None = None

    def __enter__(self) -> ByteProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TextColumn("{task.fields[docs]} docs"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self.console)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, docs="0")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def line(self, done: int, docs: int) -> str:
        """'corpus 20.0/100.0 MB 5.3 MB/s 7,331 docs elapsed 4s ETA 15s' (no total or ETA if unknown)."""
        elapsed = time.perf_counter() - self._t0
        rate = done / 1e6 / max(elapsed, 1e-9)
        of = f"/{self.total / 1e6:.1f}" if self.total else ""
        eta = f" ETA {(self.total - done) / 1e6 / rate:.0f}s" if self.total and rate > 0 else ""
        return (f"{self.description} {done / 1e6:.1f}{of} MB {rate:.1f} MB/s {docs:,} docs "
                f"elapsed {elapsed:.0f}s{eta}")

    def update(self, done: int, docs: int) -> None:
        """`done` bytes of the input read, `docs` documents so far."""
        if self._progress is not None:
            self._progress.update(self._task, completed=done, docs=f"{docs:,}")
            return
        if time.perf_counter() - self._t0 < self.quiet_s:
            return
        step = (self.total or 0) / 20 or 64e6  # every 5%, or every 64 MB when the total is unknown
        if done >= self._next_line:
            print(self.line(done, docs), file=sys.stderr, flush=True)
            self._next_line = done + step
