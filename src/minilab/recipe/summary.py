"""The run's summary: one `Row` per stage, durations, and the plain-text tables.

Shared by the runner (plan and summary), the dry-run estimate and the report, and importing
none of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    stage: str
    kind: str
    status: str                 # cached | ran | resumed | failed | skipped
    wall_s: float | None
    output: str
    size: int | None
    metric: str


def fmt_seconds(seconds: float | None) -> str:
    """`12.3 s`, `2 min 05.0 s`; `-` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def summary_rows(rows: list[Row]) -> list[list[str]]:
    from minilab.fsutil import human_bytes

    return [[r.stage, r.status, fmt_seconds(r.wall_s), r.output, human_bytes(r.size) if r.size is not None else "-",
             r.metric] for r in rows]


def print_summary(rows: list[Row]) -> None:
    print("\n== summary")
    print_table(["stage", "status", "time", "output", "size", "key metric"], summary_rows(rows))
