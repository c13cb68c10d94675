"""Finding checkpoints on disk: the `step-NNNNNN` names, the `COMPLETE` marker, `meta.json`.

Kept apart from `minilab.checkpoint` (which saves and loads them with torch) so that `cleanup`,
`du` and the registry can list checkpoints without importing torch; `minilab.checkpoint`
re-exports every name here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `step-NNNNNN` directory name, None for any other name."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest step first. Temporary (`.step-*.tmp`), half-deleted
    and marker-less directories are skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
