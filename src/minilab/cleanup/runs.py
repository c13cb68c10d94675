"""`minilab cleanup PATH`: give disk back from minilab runs (and leftovers of killed writes).

Only what minilab wrote is touched (`minilab.owned`): a run is a directory with `run.json`, or
one whose `checkpoints/` holds minilab checkpoints. PATH is a run, another minilab output (only
its leftovers), or a folder searched for runs (`runs/`); folders without a minilab marker are
passed over, and a PATH holding nothing minilab wrote is refused. The plan is always printed,
with the bytes each action frees; nothing is touched without `--yes`, which carries out exactly
that plan. Rules:

- keep the newest `--keep-last` complete checkpoints and the best one (lowest metric in meta.json);
- never delete the newest complete checkpoint of a run, nor any checkpoint a registry model's
  manifest (or registry entry) points into, nor anything in `checkpoints/` that is not minilab's;
- `--strip-optimizer` removes optimizer.pt/scheduler.pt from kept checkpoints, except from the
  newest one of a run that has no `final/` yet (it may still be resumed);
- incomplete `step-NNNNNN` checkpoints (no COMPLETE marker) and leftovers of writes whose process
  is gone (`fsutil.stale_leftovers`) are deleted; a failed run (run.json, no complete checkpoint,
  no final model, untouched for `--min-age-hours`, nothing in it but run files) is deleted whole.

Deletion renames first and then removes (as `checkpoint._remove_dir` does), so an interrupted
cleanup never leaves a half-deleted directory that still looks like a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minilab.checkpoint_index import MARKER, checkpoint_step, list_checkpoints
from minilab.errors import MinilabError
from minilab.fsutil import dir_size, human_bytes, leftover_pid, remove_path, stale_leftovers
from minilab.owned import RUN_MARKER, output_kind

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


# Everything a pretrain / SFT / DPO run writes at its top level: a failed run holding anything else
# (the user's files, next to a run started in their folder) is never deleted whole.
RUN_ENTRIES = frozenset({RUN_MARKER, "metrics.jsonl", "checkpoints", "final", "tensorboard", "reference_logps.npz"})
MAX_DEPTH = 4  # how deep a PATH that is not itself a run is searched for runs


def _ckpt_dir(run: Path) -> Path:
    return run / "checkpoints" if (run / "checkpoints").is_dir() else run


def _complete(ckdir: Path) -> list[Path]:
    """The complete minilab checkpoints (COMPLETE and meta.json) in `ckdir`, oldest first."""
    return [c for c in list_checkpoints(ckdir) if output_kind(c) == "checkpoint"]


def is_run(path: Path) -> bool:
    """A minilab run: it has run.json, or its checkpoints/ (or itself) holds minilab checkpoints.
    A `checkpoints/`, `metrics.jsonl` or `final/` of another tool does not make one."""
    return output_kind(path) == "run" or bool(_complete(_ckpt_dir(path)))


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            with contextlib.suppress(OSError):  # a file removed while walking
                newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
    return newest


def _old_style_leftover(p: Path, min_age_hours: float) -> bool:
    """A hidden `.step-*` temporary of a minilab version that did not put the pid in the name
    (`.step-000700.tmp`, `.step-000700.abc123.tmp`): stale once untouched for `min_age_hours`."""
    return (p.name.startswith(".step-") and leftover_pid(p.name) is None
            and (p.name.endswith(".tmp") or ".deleting-" in p.name or ".old-" in p.name)
            and (time.time() - _newest_mtime(p)) / 3600 >= min_age_hours)


def _only_run_entries(run: Path, ckdir: Path) -> bool:
    """True when `run` holds nothing but what a run writes (checkpoints/ only checkpoints)."""
    def ours(name: str) -> bool:
        return leftover_pid(name) is not None or name.startswith(".step-")
    return (all(n in RUN_ENTRIES or ours(n) for n in os.listdir(run))
            and (ckdir == run or all(checkpoint_step(n) is not None or ours(n) for n in os.listdir(ckdir))))


def leftover_actions(directory: Path, refs: set[Path]) -> list[Action]:
    """The leftovers of dead writers directly in `directory`."""
    return [Action("delete", str(p), _size(p), "leftover of an interrupted write (its process is gone)")
            for p in stale_leftovers(directory) if not _protected(p, refs)]


def plan_run(run: Path, keep_last: int, strip_optimizer: bool, refs: set[Path],
             min_age_hours: float) -> list[Action]:
    """The actions for one minilab run directory (see `is_run`)."""
    ckdir = _ckpt_dir(run)
    complete = _complete(ckdir)
    if (not complete and not (run / "final").is_dir() and output_kind(run) == "run"
            and _only_run_entries(run, ckdir) and not _protected(run, refs)
            and (time.time() - _newest_mtime(run)) / 3600 >= min_age_hours):
        return [Action("delete", str(run), _size(run), "failed run: no complete checkpoint, no final model")]
    actions = leftover_actions(run, refs)
    if ckdir != run:
        actions += leftover_actions(ckdir, refs)
    for p in sorted(ckdir.iterdir()):
        incomplete = checkpoint_step(p) is not None and p.is_dir() and not p.is_symlink() and not (p / MARKER).is_file()
        if (incomplete or _old_style_leftover(p, min_age_hours)) and not _protected(p, refs):
            actions.append(Action("delete", str(p), _size(p),
                                  "incomplete checkpoint" if incomplete else "leftover of an interrupted save"))
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
    """Everything `cleanup` would do under `path`: a minilab run, any other minilab output (its
    leftovers only), or a folder searched for those (`MAX_DEPTH` levels; folders that are not
    minilab's are passed over, never touched). A `path` holding nothing minilab wrote is refused."""
    root = Path(path)
    if not root.is_dir():
        raise MinilabError(f"{root}: no such directory")
    if keep_last < 1:
        raise MinilabError(f"--keep-last must be at least 1, got {keep_last}")
    refs = registry_references(models_dir)
    actions: list[Action] = []

    def visit(d: Path, depth: int) -> bool:
        """Plan `d`; True if it is, or holds, something minilab wrote."""
        if is_run(d):
            actions.extend(plan_run(d, keep_last, strip_optimizer, refs, min_age_hours))
            return True
        leftovers = leftover_actions(d, refs)
        actions.extend(leftovers)
        if output_kind(d) is not None:
            return True  # corpus, packed data, a model...: only its leftovers are cleanup's business
        found = bool(leftovers)
        if depth < MAX_DEPTH:
            for child in sorted(d.iterdir()):
                if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
                    found = visit(child, depth + 1) or found
        return found

    if not visit(root, 0):
        raise MinilabError(f"{root}: holds nothing minilab wrote (no run.json, no minilab checkpoint, no "
                           "leftover of a minilab write), so cleanup leaves it alone; point it at a minilab run "
                           "or at a folder of runs such as runs/")
    return actions


def apply(actions: list[Action]) -> int:
    """Carry out the actions; returns the bytes freed (measured just before each removal)."""
    freed = 0
    for a in actions:
        p = Path(a.path)
        if not p.exists():
            continue
        size = _size(p)
        if p.is_dir() and not p.is_symlink():
            hidden = p.with_name(f".{p.name}.deleting-{os.getpid()}")
            os.replace(p, hidden)
            remove_path(hidden)
        else:
            remove_path(p)
        freed += size
    return freed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag, float_range, int_range

    p.add_argument("path", help="a run directory, a model directory, or a folder holding runs such as runs/")
    flag(p, "--keep-last", type=int_range(1), default=2, metavar="K",
         help="complete checkpoints kept per run (plus the best)")
    flag(p, "--strip-optimizer", action="store_true", help="remove optimizer state from kept checkpoints")
    flag(p, "--min-age-hours", type=float_range(0), default=1.0, metavar="H",
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
