"""What minilab wrote: the markers that let destructive verbs tell minilab's output from the user's.

`cleanup`, `--force`, `merge`, `models rm` and `cache rm` may only remove or replace a directory that
carries one of these markers, all written by minilab itself:

- `manifest.json` with `"kind": "minilab.<stage>"`: corpus, packed, sft_data, dpo_data;
- `manifest.json` of a model (`registry.write_manifest`: training_type, files, fingerprint);
- `minilab_tokenizer.json`: a tokenizer `minilab tokenizer` trained or froze;
- `minilab_export.json`: a transformers directory `minilab export --format hf` wrote (no model
  manifest: it is not a registry model);
- `run.json` with `"kind": "minilab.run"`: a pretrain / SFT / DPO run directory, written when the
  run starts (before its first checkpoint, so a run killed early is still known as minilab's);
- `step-NNNNNN/` with `COMPLETE` and `meta.json`: a minilab checkpoint (the checkpoint index).

A folder with none of these, whatever it contains (`checkpoints/`, `metrics.jsonl`, `final/` of
another tool), is the user's. Torch-free: `cleanup` and `du` import this.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minilab import __version__
from minilab.checkpoint_index import MARKER, checkpoint_step
from minilab.errors import MinilabError
from minilab.fsutil import write_json_atomic

RUN_MARKER = "run.json"
RUN_KIND = "minilab.run"
TOKENIZER_MARKER = "minilab_tokenizer.json"
EXPORT_MARKER = "minilab_export.json"
_MODEL_KEYS = {"training_type", "files", "fingerprint"}


def _json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of minilab output `path` is ('corpus', 'packed', 'sft_data', 'dpo_data', 'model',
    'tokenizer', 'export', 'run', 'checkpoint'), or None when it carries no minilab marker (or is a symlink
    or not a directory)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    manifest = _json(path / "manifest.json")
    kind = manifest.get("kind")
    if isinstance(kind, str) and kind.startswith("minilab.") and kind != RUN_KIND:
        return kind.removeprefix("minilab.")
    if manifest.keys() >= _MODEL_KEYS:
        return "model"
    if (path / EXPORT_MARKER).is_file():  # before the tokenizer: an export holds its tokenizer's files
        return "export"
    if (path / TOKENIZER_MARKER).is_file():
        return "tokenizer"
    if _json(path / RUN_MARKER).get("kind") == RUN_KIND:
        return "run"
    if checkpoint_step(path) is not None and (path / MARKER).is_file() and (path / "meta.json").is_file():
        return "checkpoint"
    return None


def write_run_marker(run_dir: str | os.PathLike, stage: str, **fields: Any) -> None:
    """Mark `run_dir` as a minilab run of `stage` ('pretrain', 'sft', 'dpo'); kept when it exists."""
    path = Path(run_dir) / RUN_MARKER
    if _json(path).get("kind") == RUN_KIND:
        return
    write_json_atomic(path, {"kind": RUN_KIND, "stage": stage, "minilab_version": __version__,
                             "created": datetime.now(UTC).isoformat(timespec="seconds"), **fields})


def check_replaceable(out: str | os.PathLike, kinds: set[str] | frozenset[str], reading: tuple = (),
                      flag: str = "--output-dir") -> None:
    """Raise a one-line MinilabError unless `out` may be replaced whole by a stage writing one of
    `kinds`: it must not exist, be an empty directory, or be a minilab directory of one of those
    kinds; never a file, a symlink, a path any of `reading` (the inputs of this run) is or lies
    inside, the current folder or one of its parents, or the home folder."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise MinilabError(f"{out}: is a file, not a directory minilab wrote; {flag} replaces only minilab's "
                           "own output: remove it yourself or choose another path")
    real = out.resolve()
    for src in reading:
        s = Path(src).resolve()
        if s == real or s.is_relative_to(real):
            raise MinilabError(f"{out}: holds {src}, which this run reads; choose another {flag}")
    cwd = Path.cwd().resolve()
    if real == Path.home().resolve() or cwd.is_relative_to(real):
        raise MinilabError(f"{out}: is the home folder, the current folder or one of its parents; "
                           f"choose another {flag}")
    if not any(out.iterdir()):
        return
    kind = output_kind(out)
    want = " or ".join(sorted(kinds))
    if kind is None:
        raise MinilabError(f"{out}: has no minilab marker (it was not written by minilab), so it is not replaced; "
                           f"remove it yourself or choose another {flag}")
    if kind not in kinds:
        raise MinilabError(f"{out}: is a minilab {kind} directory, not a {want} one; choose another {flag}")


def check_output(out: str | os.PathLike, force: bool, kinds: set[str] | frozenset[str], reading: tuple = (),
                 flag: str = "--output-dir") -> None:
    """The one rule every stage applies to its output before any work starts: a path that exists
    is an error without `force` (naming --force), and with it must pass `check_replaceable`."""
    out = Path(out)
    if not force:
        if out.exists() or out.is_symlink():
            raise MinilabError(f"{out} already exists; pass --force to replace it, or choose another {flag}")
        return
    check_replaceable(out, kinds, reading, flag)
