"""Step-numbered training checkpoints: save, load, find the latest, prune old ones.

Layout of one checkpoint, `RUN_DIR/step-000500/`:

    model.safetensors   weights (tied tensors stored once; the dropped alias is in the metadata)
    optimizer.pt        optimizer.state_dict(), torch.save'd, loadable with weights_only=True
    scheduler.pt        scheduler.state_dict(), likewise (only when a scheduler is given)
    scaler.pt           GradScaler.state_dict() of fp16 runs (loss scale and growth tracker)
    rng.json            Python, NumPy, torch CPU and CUDA generator states (JSON, restored bitwise)
    meta.json           step, model config, the caller's meta (resolved run config, tokens_seen,
                        data position, tokenizer sha256, ...), versions, wall time, metric, and
                        `files`: the byte size of every file above, checked before a load
    COMPLETE            written last

The directory is assembled under a hidden temporary name and renamed into place
(`fsutil.atomic_dir`), so a crash mid-save leaves at most a hidden `.step-*.tmp` directory.
`list_checkpoints` additionally requires the `COMPLETE` marker, so a directory copied or synced
half-way from elsewhere is never mistaken for a checkpoint either. Nothing is ever read back with
pickle: weights through safetensors, optimizer/scheduler state through
`torch.load(weights_only=True)`, RNG state from JSON. A checkpoint whose files do not match the
sizes in its meta.json, or do not load (truncated, overwritten with garbage), is a one-line
`MinilabError` naming the file and the next older complete checkpoint to resume from instead.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from minilab import __version__
from minilab.checkpoint_index import MARKER, checkpoint_step, latest_checkpoint, list_checkpoints, read_meta
from minilab.config import to_dict
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import atomic_dir, write_json_atomic

FORMAT_VERSION = 1


# ---- RNG state -----------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    # bytearray: torch.frombuffer needs a writable buffer to avoid a warning.
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """All global generator states as JSON-safe data (ints, floats, base64 strings).

    Python's and NumPy's Mersenne Twister states are integer lists; torch's are opaque uint8
    tensors, stored as base64 of their exact bytes so `restore_rng_state` is bitwise.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": name, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned. CUDA states are restored only when this
    process sees the same number of devices (a resume on another machine cannot match anyway)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


# ---- weights -------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP/FSDP-style (`module`) wrappers,
    so parameter names in the file never carry wrapper prefixes."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _dedupe_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared storage kept once under its FIRST name (so with tied
    embeddings `model.embed_tokens.weight` stays and `lm_head.weight` goes, as in HF files),
    plus {dropped alias: kept name} for the file metadata.

    `state` is a full state dict gathered from a sharded (FSDP) `model`, whose tied entries are
    separate copies: there the aliases come from the module's shared parameters instead."""
    if state is not None:
        first: dict[int, str] = {}
        aliases = {name: first.setdefault(id(p), name)
                   for name, p in model.named_parameters(remove_duplicate=False)}
        aliases = {name: kept for name, kept in aliases.items() if name != kept}
        return {k: t.detach().contiguous() for k, t in state.items() if k not in aliases}, aliases
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def save_model_weights(model: nn.Module, path: str | os.PathLike,
                       state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's weights (or `state`, its full state dict gathered from FSDP) to a
    safetensors file, tied tensors once."""
    tensors, aliases = _dedupe_state_dict(_unwrap(model), state)
    meta = {"format": "pt", **{f"alias:{k}": v for k, v in aliases.items()}}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def read_model_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The full state dict in a file written by `save_model_weights`, tied names restored."""
    state = safetensors.torch.load_file(str(path), device=str(device))
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    for key, value in meta.items():
        if key.startswith("alias:") and value in state:
            state[key.removeprefix("alias:")] = state[value]
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu",
                       state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a file written by `save_model_weights` (or `state`, already read from it) into `model`
    (strict: every key must match). An FSDP-sharded model (every rank calls this) keeps its own
    shard of the full weights."""
    from minilab import distributed

    model = _unwrap(model)
    if distributed.is_fsdp(model):
        state = state if state is not None else read_model_weights(path)
        names = set(model.state_dict())
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if not missing and not unexpected:
            distributed.load_full_model_state(model, state)
    else:
        missing, unexpected = model.load_state_dict(state if state is not None else read_model_weights(path, device),
                                                    strict=False)
    if missing or unexpected:
        raise MinilabError(f"checkpoint {path} does not fit this model: missing {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                           f"{'...' if len(unexpected) > 3 else ''}")


# ---- save ----------------------------------------------------------------------------------
def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename, so after a power loss the renamed directory
    cannot hold zero-length files (rename order is durable only for flushed data)."""
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _remove_dir(path: Path) -> None:
    """Rename to a hidden name first, then delete: an interrupted rmtree must not leave a
    `step-*` directory that still has its COMPLETE marker but lost its weights."""
    hidden = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _clean_stale(run_dir: Path) -> None:
    """Remove hidden leftovers of saves/deletes killed by SIGKILL or power loss (the `finally`
    in atomic_dir never ran). One writer per run directory is assumed (rank 0 saves)."""
    for p in run_dir.glob(".step-*"):
        if p.is_dir() and (p.name.endswith(".tmp") or ".deleting-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _metric_key(path: Path) -> float:
    m = read_meta(path).get("metric")
    return math.inf if m is None or (isinstance(m, float) and math.isnan(m)) else float(m)


def apply_retention(run_dir: str | os.PathLike, keep_last: int | None, keep_best: bool = False,
                    protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, keeping the best by metric
    (lower is better) when `keep_best`, and always `protect`. None keeps everything.
    Returns the deleted paths."""
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ConfigError(f"must be at least 1, got {keep_last}", key="keep_last")
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:])
    if protect is not None:
        keep.add(Path(protect))
    if keep_best and ckpts:
        keep.add(min(ckpts, key=_metric_key))  # min() keeps the earliest on ties
    doomed = [p for p in ckpts if p not in keep]
    for p in doomed:
        _remove_dir(p)
    return doomed


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    meta: dict[str, Any], keep_last: int | None = None, keep_best: bool = False,
                    metric: float | None = None, scaler: Any = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/step-{step:06d}/` atomically and return its path.

    `model_state`/`optimizer_state` are the full state dicts of an FSDP-sharded model and its
    optimizer (`distributed.full_state`), written instead of `model.state_dict()` and
    `optimizer.state_dict()`, in the same format.

    `meta` is the caller's record (fully resolved run config, tokens_seen, data position,
    tokenizer_sha256, ...); step, model config, versions, wall time and metric are added here.
    Retention (`keep_last`, `keep_best`) runs only after the new checkpoint is in place, so a
    failed save never costs an old one. Re-saving an existing step replaces it atomically.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(run_dir)
    target = run_dir / f"step-{step:06d}"
    inner = _unwrap(model)
    cfg = getattr(inner, "config", None)
    record = {
        **meta,
        "format": FORMAT_VERSION,
        "step": step,
        "metric": metric,
        "model_config": to_dict(cfg) if cfg is not None and not isinstance(cfg, dict) else cfg,
        "minilab_version": __version__,
        "torch_version": torch.__version__,
        "wall_time": time.time(),
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    started = time.perf_counter()
    with atomic_dir(target, overwrite=True) as tmp:
        save_model_weights(inner, tmp / "model.safetensors", model_state)
        if optimizer is not None or optimizer_state is not None:
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                       tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:  # fp16: without it a resumed run restarts the loss scale at 2**16
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        write_json_atomic(tmp / "rng.json", capture_rng_state())
        record["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        record["save_seconds"] = round(time.perf_counter() - started, 3)
        write_json_atomic(tmp / "meta.json", record)
        (tmp / MARKER).write_text(f"{step}\n", encoding="utf-8")
        _fsync_tree(tmp)
    apply_retention(run_dir, keep_last, keep_best, protect=target)
    return target


# ---- load ----------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory itself, or the latest one of a run directory."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if checkpoint_step(path) is not None and path.is_dir():
        raise MinilabError(f"checkpoint {path} is incomplete (no {MARKER} marker); "
                           "it was interrupted while saving")
    latest = latest_checkpoint(path)
    if latest is None:
        raise MinilabError(f"no complete checkpoint in {path}")
    return latest


def damaged(path: Path, problem: str) -> MinilabError:
    """The one-line error for a checkpoint file that cannot be trusted: what is wrong, and the next
    older complete checkpoint of the same run to resume from (named), if there is one."""
    ckpt = path.parent
    step = checkpoint_step(ckpt)
    older = [p for p in list_checkpoints(ckpt.parent) if step is not None and checkpoint_step(p) < step]
    hint = (f"resume from the next older complete checkpoint instead: --resume {older[-1]}" if older
            else "there is no older complete checkpoint of this run to resume from")
    return MinilabError(f"{path}: {problem}; checkpoint {ckpt.name} is damaged; {hint}")


def check_checkpoint_files(path: Path, meta: dict[str, Any]) -> None:
    """Every file meta.json lists is there with its recorded byte size (checkpoints written before
    sizes were recorded are not checked)."""
    for name, size in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise damaged(f, "missing (meta.json lists it)")
        if f.stat().st_size != size:
            raise damaged(f, f"{f.stat().st_size:,} bytes, but meta.json records {size:,} (truncated or changed)")


def _load_pt(path: Path, map_location: str | torch.device = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def _read(path: Path, read, *args):
    """`read(path, *args)`, with any failure to parse the file (garbage, truncation) as `damaged`."""
    try:
        return read(path, *args)
    except MinilabError:
        raise
    except Exception as e:  # safetensors, pickle, zip and JSON errors alike: the file is unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in first:  # torch's advice about weights_only=False: not what to do here
            first = "not a valid torch.save file"
        raise damaged(path, f"cannot be read ({first[:160]})") from None


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu",
                    scaler: Any = None) -> dict[str, Any]:
    """Load a checkpoint (or a run directory's latest) into the given objects; return its meta.
    With an FSDP-sharded `model` every rank calls this and keeps its shard of the weights and of
    the optimizer state (from a checkpoint of any run: one process, DDP or FSDP).

    The returned dict is meta.json plus `path` (the checkpoint directory) and `rng` (the saved
    generator states, for callers that restore them later with `restore_rng_state`).
    """
    from minilab import distributed

    path = resolve_checkpoint(path)
    meta = _read(path / "meta.json", lambda f: read_meta(f.parent))
    check_checkpoint_files(path, meta)
    if model is not None:
        weights = _read(path / "model.safetensors", read_model_weights, map_location)
        load_model_weights(model, path / "model.safetensors", device=map_location, state=weights)
    for obj, fname in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        if not (path / fname).is_file():
            raise MinilabError(f"checkpoint {path} has no {fname} to resume from")
        fsdp = obj is optimizer and model is not None and distributed.is_fsdp(_unwrap(model))
        state = _read(path / fname, _load_pt, "cpu" if fsdp else map_location)
        if fsdp:
            distributed.load_full_optimizer_state(_unwrap(model), optimizer, state)
            continue
        obj.load_state_dict(state)
    if scaler is not None and (path / "scaler.pt").is_file():  # absent: the run was not fp16 before
        scaler.load_state_dict(_read(path / "scaler.pt", _load_pt))
    rng_file = path / "rng.json"
    if rng_file.is_file():
        meta["rng"] = _read(rng_file, lambda f: json.loads(f.read_text(encoding="utf-8")))
        if restore_rng:
            restore_rng_state(meta["rng"])
    meta["path"] = str(path)
    return meta
