"""`minilab cleanup PATH`: give disk back from runs (and leftovers in model directories).

PATH is a run directory (`run/checkpoints/step-NNNNNN/`), a model directory, or a root holding
runs (`runs/`). The plan is always printed, with the bytes each action frees; nothing is touched
without `--yes`. Rules:

- keep the newest `--keep-last` complete checkpoints and the best one (lowest metric in meta.json);
- never delete the newest complete checkpoint of a run, nor any checkpoint a registry model's
  manifest (or registry entry) points into;
- `--strip-optimizer` removes optimizer.pt/scheduler.pt from kept checkpoints, except from the
  newest one of a run that has no `final/` yet (it may still be resumed);
- incomplete checkpoints (no COMPLETE marker), hidden leftovers of interrupted saves, and failed
  runs (no complete checkpoint, no final model, untouched for `--min-age-hours`) are deleted.

Deletion renames first and then removes (as `checkpoint._remove_dir` does), so an interrupted
cleanup never leaves a half-deleted directory that still looks like a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minilab.checkpoint_index import MARKER, checkpoint_step, list_checkpoints
from minilab.errors import MinilabError
from minilab.fsutil import dir_size, human_bytes

OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")


@dataclass
class Action:
    kind: str          # "delete" (a file or directory) or "strip" (one optimizer file)
    path: str
    bytes: int
    reason: str


def _size(path: Path) -> int:
    if path.is_symlink():
        return 0
    return dir_size(path) if path.is_dir() else path.stat().st_size


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def registry_references(models_dir: str | None = None) -> set[Path]:
    """Every existing path a registered model points at: entry paths and path-like manifest values."""
    from minilab.registry import list_models, read_manifest

    refs: set[Path] = set()
    for row in list_models(models_dir):
        path = Path(row["path"])
        refs.add(path.resolve())
        if path.is_dir():
            for text in _strings(read_manifest(path)):
                if ("/" in text or os.sep in text) and len(text) < 4096 and Path(text).exists():
                    refs.add(Path(text).resolve())
    return refs


def _protected(path: Path, refs: set[Path]) -> bool:
    """True if a registry reference is this path or lies inside it."""
    p = path.resolve()
    return any(r == p or r.is_relative_to(p) for r in refs)


def _metric(ckpt: Path) -> float:
    try:
        m = json.loads((ckpt / "meta.json").read_text(encoding="utf-8")).get("metric")
    except (OSError, json.JSONDecodeError):
        return math.inf
    return math.inf if m is None or (isinstance(m, float) and math.isnan(m)) else float(m)


def is_run(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file() or (path / "final").is_dir()


def _ckpt_dir(run: Path) -> Path:
    return run / "checkpoints" if (run / "checkpoints").is_dir() else run


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            with contextlib.suppress(OSError):  # a file removed while walking
                newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
    return newest


def plan_run(run: Path, keep_last: int, strip_optimizer: bool, refs: set[Path],
             min_age_hours: float) -> list[Action]:
    """The actions for one run directory."""
    ckdir = _ckpt_dir(run)
    complete = list_checkpoints(ckdir)
    actions: list[Action] = []
    if not complete and not (run / "final").is_dir():
        age_h = (time.time() - _newest_mtime(run)) / 3600
        if age_h >= min_age_hours and not _protected(run, refs):
            return [Action("delete", str(run), _size(run), "failed run: no complete checkpoint, no final model")]
    for p in sorted(ckdir.iterdir()) if ckdir.is_dir() else []:
        leftover = p.name.startswith(".step-") and (p.name.endswith(".tmp") or ".deleting-" in p.name
                                                     or ".old-" in p.name)
        incomplete = checkpoint_step(p) is not None and p.is_dir() and not (p / MARKER).is_file()
        if (leftover or incomplete) and not _protected(p, refs):
            actions.append(Action("delete", str(p), _size(p),
                                  "leftover of an interrupted save" if leftover else "incomplete checkpoint"))
    if not complete:
        return actions
    newest = complete[-1]
    keep = set(complete[-keep_last:]) | {newest, min(complete, key=_metric)}
    keep |= {c for c in complete if _protected(c, refs)}
    for c in complete:
        if c not in keep:
            actions.append(Action("delete", str(c), _size(c), f"older than the last {keep_last}, not the best"))
    if strip_optimizer:
        resumable = not (run / "final").is_dir()
        for c in sorted(keep):
            if c == newest and resumable:
                continue  # the run may still be resumed from it
            for name in OPTIMIZER_FILES:
                f = c / name
                if f.is_file():
                    actions.append(Action("strip", str(f), f.stat().st_size, "optimizer state of a kept checkpoint"))
    return actions


def plan_cleanup(path: str | os.PathLike, keep_last: int = 2, strip_optimizer: bool = False,
                 models_dir: str | None = None, min_age_hours: float = 1.0) -> list[Action]:
    """Everything `cleanup` would do under `path` (a run, a model directory or a root of runs)."""
    root = Path(path)
    if not root.is_dir():
        raise MinilabError(f"{root}: no such directory")
    if keep_last < 1:
        raise MinilabError(f"--keep-last must be at least 1, got {keep_last}")
    refs = registry_references(models_dir)
    if is_run(root) or list_checkpoints(root):
        return plan_run(root, keep_last, strip_optimizer, refs, min_age_hours)
    if (root / "config.json").is_file() or (root / "manifest.json").is_file():
        return [Action("delete", str(p), _size(p), "leftover of an interrupted write") for p in sorted(root.iterdir())
                if p.name.startswith(".") and (".tmp" in p.name or ".deleting-" in p.name or ".old-" in p.name)]
    actions: list[Action] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.is_symlink() and is_run(child):
            actions += plan_run(child, keep_last, strip_optimizer, refs, min_age_hours)
    return actions


def apply(actions: list[Action]) -> int:
    """Carry out the actions; returns the bytes freed (measured just before each removal)."""
    freed = 0
    for a in actions:
        p = Path(a.path)
        if not p.exists():
            continue
        size = _size(p)
        if p.is_dir():
            hidden = p.with_name(f".{p.name}.deleting-{os.getpid()}")
            os.replace(p, hidden)
            shutil.rmtree(hidden)
        else:
            p.unlink()
        freed += size
    return freed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cli import flag

    p.add_argument("path", help="a run directory, a model directory, or a root such as runs/")
    flag(p, "--keep-last", type=int, default=2, metavar="K", help="complete checkpoints kept per run (plus the best)")
    flag(p, "--strip-optimizer", action="store_true", help="remove optimizer state from kept checkpoints")
    flag(p, "--min-age-hours", type=float, default=1.0, metavar="H",
         help="a run without checkpoints counts as failed only when untouched this long (default 1)")
    flag(p, "--models-dir", metavar="DIR", help="registry root whose references are protected")
    p.add_argument("--yes", "-y", action="store_true", help="delete (without it: only show the plan)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    actions = plan_cleanup(args.path, args.keep_last, args.strip_optimizer, args.models_dir, args.min_age_hours)
    total = sum(a.bytes for a in actions)
    if args.json:
        print(json.dumps({"actions": [asdict(a) for a in actions], "bytes": total, "applied": args.yes}, indent=2))
    else:
        for a in actions:
            print(f"{'delete' if a.kind == 'delete' else 'strip '} {human_bytes(a.bytes):>10}  {a.path}  ({a.reason})")
        verb = "frees" if args.yes else "would free"
        print(f"{len(actions)} actions, {verb} {human_bytes(total)} ({total:,} bytes)"
              + ("" if args.yes or not actions else "; run again with --yes to delete"))
    if args.yes and actions:
        freed = apply(actions)
        if not args.json:
            print(f"freed {human_bytes(freed)} ({freed:,} bytes)")
    return 0
