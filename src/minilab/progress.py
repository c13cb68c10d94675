"""A live progress bar for long loops (step, loss, tokens/s, ETA) that degrades to plain lines.

On a terminal it is a rich bar; in a log file (CI, nohup) it prints a line every ~5% so the
log shows progress without a flood of carriage returns.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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

    def note(self, text: str) -> None:
        """A line printed above the bar (eval results)."""
        if not self.enabled:
            return
        self.console.print(text, highlight=False) if self.live else print(text, file=sys.stderr, flush=True)
