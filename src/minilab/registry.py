"""The model registry and the `minilab models` verb.

A registered model is a standard Hugging Face directory (config.json, model.safetensors,
tokenizer files, generation_config.json, optional `adapters/` in PEFT format) plus a
`manifest.json`: name, training type, parent name and fingerprint, lineage, data manifests and
hashes, tokenizer sha256, resolved config, metrics, parameter count, versions, creation time and
the sha256 and size of every other file in the directory.

Names are `{architecture}-{size}-{dataset}-{training_type}-v{N}`, e.g.
`llama-23M-tinystories-pretrain-v1`. `-` separates the five fields, so no field may contain one:
architecture and dataset are lowercase `[a-z0-9][a-z0-9_.]*` (`make_name` lowercases them and
turns `-` and spaces into `_`); size is the TRUE parameter count through `fsutil.format_params`
(`1.8M`, `23M`, `1.1B`); training_type is one of `TRAINING_TYPES`; the version is `v1`, `v2`, ...
Those rules live in `registry_names.py` (`validate_name`, `parse_name`, available here too).

Where entries live. The root is `models/` (relative to the working directory), overridden by
`MINILAB_MODELS_DIR` or a `root=` argument / `--models-dir`. The root holds `registry.json`, a
small index written atomically, mapping each name to a directory: either a copy owned by the
registry (`ROOT/NAME/`, stored root-relative so the root can be moved) or a pointer to a
directory elsewhere, typically a run's `final/` (stored absolute). A JSON index rather than
symlinks because it works on every filesystem (Windows, some network and FUSE mounts have no
symlinks) and survives copying. Directories `ROOT/NAME/` with a manifest but no index entry
(copied in by hand) are listed too.

Removal policy. `remove_model` drops the entry and deletes the directory only when it lives
inside the root (a registry-owned copy). A pointed-to directory outside the root is left alone
unless `delete_files=True` (`--delete-files`): the registry never destroys a run's output it
merely refers to.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minilab import __version__
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import atomic_dir, dir_size, format_params, read_json_if_present, sha256_file, write_json_atomic
from minilab.registry_names import MAX_NAME, parse_name, slug, validate_name
from minilab.registry_names import TRAINING_TYPES as TRAINING_TYPES  # registry.X stays the public library

INDEX = "registry.json"
log = logging.getLogger("minilab.registry")
MANIFEST = "manifest.json"
ENV_VAR = "MINILAB_MODELS_DIR"


# ---- names ---------------------------------------------------------------------------------
def make_name(architecture: str, params: int | str, dataset: str, training_type: str,
              root: str | os.PathLike | None = None) -> str:
    """The convention name with the next free version in the registry (highest existing + 1,
    so a removed version's number is not silently reused while it may still be in lineages)."""
    size = format_params(params) if isinstance(params, int) else str(params)
    base = f"{slug(architecture, 'architecture')}-{size}-{slug(dataset, 'dataset')}-{training_type}"
    validate_name(f"{base}-v1")
    root_path = models_root(root)
    taken = set(_entries(root_path))
    if root_path.is_dir():
        taken |= {p.name for p in root_path.iterdir()}
    versions = [int(m.group(1)) for n in taken if (m := re.fullmatch(re.escape(base) + r"-v(\d+)", n))]
    return f"{base}-v{max(versions, default=0) + 1}"


# ---- manifest ------------------------------------------------------------------------------
def _version_of(dist: str) -> str | None:
    # importlib.metadata rather than `import transformers`: that import alone takes seconds.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_table(model_dir: Path) -> dict[str, dict[str, Any]]:
    table = {}
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir).as_posix()
        if p.is_file() and rel != MANIFEST and not p.name.startswith(".manifest.json."):
            table[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return table


def _fingerprint(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the (path, sha256) of every file but the manifest: identifies the content."""
    text = "".join(f"{info['sha256']}  {rel}\n" for rel, info in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a model directory ({} when it has none)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinilabError(f"{path} is not valid JSON: {e}") from None


def write_manifest(model_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Create or update `manifest.json` atomically and return it.

    `fields` update the existing manifest; the file table (size and sha256 of every other file),
    fingerprint and tool versions are recomputed, so call this after the directory is complete.
    """
    model_dir = Path(model_dir)
    manifest: dict[str, Any] = {
        "format": 1, "name": None, "training_type": None, "parent": None, "parent_fingerprint": None,
        "lineage": [], "data": [], "tokenizer_sha256": None, "config": None, "metrics": {}, "params": None,
        **read_manifest(model_dir), **fields}
    manifest.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    manifest["versions"] = {"minilab": __version__, "torch": _version_of("torch"),
                            "transformers": _version_of("transformers")}
    manifest["files"] = _file_table(model_dir)
    manifest["fingerprint"] = _fingerprint(manifest["files"])
    write_json_atomic(model_dir / MANIFEST, manifest)
    return manifest


def verify_manifest(model_dir: str | os.PathLike) -> list[str]:
    """Differences between the directory and its manifest's file table (empty when intact)."""
    model_dir = Path(model_dir)
    recorded = read_manifest(model_dir).get("files")
    if recorded is None:
        return [f"{model_dir} has no {MANIFEST}"]
    actual = _file_table(model_dir)
    problems = [f"missing: {rel}" for rel in recorded if rel not in actual]
    problems += [f"not in manifest: {rel}" for rel in actual if rel not in recorded]
    problems += [f"changed: {rel}" for rel, info in actual.items()
                 if rel in recorded and recorded[rel].get("sha256") != info["sha256"]]
    return problems


def count_params(model_dir: str | os.PathLike) -> int | None:
    """Parameters in the top-level safetensors files, read from their headers (no tensor data);
    a tied head stored twice is counted once."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, int] = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                shapes[key] = n
    config = read_json_if_present(model_dir / "config.json")
    if config.get("tie_word_embeddings") and "model.embed_tokens.weight" in shapes:
        shapes.pop("lm_head.weight", None)
    return sum(shapes.values())


# ---- the index -----------------------------------------------------------------------------
def models_root(root: str | os.PathLike | None = None) -> Path:
    """The registry root: `root`, else $MINILAB_MODELS_DIR, else `models/`."""
    return Path(root or os.environ.get(ENV_VAR) or "models").expanduser()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise read-modify-write of the index between processes (POSIX; elsewhere unlocked)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".registry.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_index(root: Path) -> dict[str, dict[str, Any]]:
    data = read_json_if_present(root / INDEX)
    return dict(data.get("models", {}))


def _write_index(root: Path, models: dict[str, dict[str, Any]]) -> None:
    write_json_atomic(root / INDEX, {"format": 1, "models": dict(sorted(models.items()))})


def _entries(root: Path) -> dict[str, dict[str, Any]]:
    """name -> {"path": absolute-or-root-relative Path, "linked": bool}: index plus hand-copied dirs."""
    out = {}
    for name, entry in _read_index(root).items():
        path = Path(entry["path"])
        out[name] = {**entry, "path": path if path.is_absolute() else root / path}
    if root.is_dir():
        known = {e["path"].resolve() for e in out.values()}
        for p in root.iterdir():
            if p.name not in out and (p / MANIFEST).is_file() and _is_valid(p.name) and p.resolve() not in known:
                out[p.name] = {"path": p, "linked": False}
    return out


def _is_valid(name: str) -> bool:
    try:
        validate_name(name)
        return True
    except ConfigError:
        return False


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path != root and path.is_relative_to(root)


def _unknown(name: str, root: Path, names: list[str]) -> MinilabError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5) if len(name) <= MAX_NAME else []
    hint = f"; did you mean {', '.join(close)}?" if close else \
        f" ({len(names)} registered; see 'minilab models list')"
    shown = name if len(name) <= MAX_NAME else f"{name[:40]}…({len(name):,} characters)"
    return MinilabError(f"unknown model '{shown}': not a directory and not in the registry at {root}{hint}")


def _is_dir(path: Path) -> bool:
    """`path.is_dir()`, False where the OS cannot even look it up (a name too long, ...)."""
    return _stat_test(path, Path.is_dir)


def _stat_test(path: Path, test) -> bool:
    try:
        return test(path)
    except OSError:
        return False


def is_model_dir(path: Path) -> bool:
    """A directory with the manifest `write_manifest` gives every registry model (owned.py's rule)."""
    from minilab.owned import output_kind

    return output_kind(path) == "model"


def resolve_model_dir(path_or_name: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The one resolver of a local model reference: an existing directory as given (`~` expanded),
    else the directory of a name registered under `root`. Fine-tuning adds hub ids on top of it
    (`finetune.models.resolve_base_dir`), the planner presets and config files (`planner.resolve`)."""
    path = Path(path_or_name).expanduser()
    if _is_dir(path):
        return path
    if _stat_test(path, Path.is_file):
        raise MinilabError(f"{path}: is a file, expected a model directory")
    root_path = models_root(root)
    entries = _entries(root_path)
    entry = entries.get(str(path_or_name))
    if entry is None:
        raise _unknown(str(path_or_name), root_path, sorted(entries))
    if not entry["path"].is_dir():
        raise MinilabError(f"model '{path_or_name}' is registered but its directory {entry['path']} is gone")
    return entry["path"]


# ---- register / list / show / remove -------------------------------------------------------
def _derive_name(model_dir: Path, fields: dict[str, Any], root: Path) -> str:
    config = read_json_if_present(model_dir / "config.json")
    arch = fields.get("architecture") or config.get("model_type")
    params = fields.get("params") or count_params(model_dir)
    dataset, ttype = fields.get("dataset"), fields.get("training_type")
    missing = [k for k, v in (("architecture", arch), ("params", params), ("dataset", dataset),
                              ("training_type", ttype)) if not v]
    if missing:
        raise MinilabError(f"cannot name {model_dir}: give name= or {', '.join(missing)}")
    return make_name(arch, params, dataset, ttype, root)


def _lineage_fields(parent: str | None, explicit: dict[str, Any], root: Path) -> dict[str, Any]:
    """parent_fingerprint and lineage from a registered parent's manifest, unless the caller
    gave them (values inherited from the source's old manifest could describe another parent)."""
    if not parent:
        return {}
    entry = _entries(root).get(parent)
    pm = read_manifest(entry["path"]) if entry and entry["path"].is_dir() else {}
    step = {"name": parent, "fingerprint": pm.get("fingerprint"), "training_type": pm.get("training_type")}
    return {"parent_fingerprint": explicit.get("parent_fingerprint") or pm.get("fingerprint"),
            "lineage": explicit.get("lineage") or [*pm.get("lineage", []), step]}


def register(model_dir: str | os.PathLike, name: str | None = None, *, root: str | os.PathLike | None = None,
             link: bool = True, **manifest_fields: Any) -> Path:
    """Enter `model_dir` into the registry and return the registered directory.

    `name` defaults to `make_name` from the fields (architecture, params, dataset, training_type;
    architecture and params fall back to config.json and the safetensors headers). With `link`
    the index points at `model_dir` (its manifest.json is written there); otherwise the
    directory is copied to `ROOT/NAME/` atomically and the source is not touched.
    """
    src = Path(model_dir)
    if not src.is_dir():
        raise MinilabError(f"model directory {src} does not exist")
    if not any((src / f).is_file() for f in ("config.json", "adapter_config.json", "adapters/adapter_config.json")):
        raise MinilabError(f"{src} is not a model directory (no config.json or adapter_config.json)")
    root_path = models_root(root)
    fields = {**read_manifest(src), **manifest_fields}
    name = validate_name(name) if name else _derive_name(src, fields, root_path)
    parsed = parse_name(name)
    with _locked(root_path):
        entries = _entries(root_path)
        if name in entries or (root_path / name).exists():
            raise MinilabError(f"model '{name}' already exists in the registry at {root_path}")
        if link:
            for other, entry in entries.items():
                if entry["path"].resolve() == src.resolve():
                    raise MinilabError(f"{src} is already registered as '{other}'")
        fields.update(name=name, training_type=parsed["training_type"],
                      architecture=fields.get("architecture") or parsed["architecture"],
                      dataset=fields.get("dataset") or parsed["dataset"])
        fields.setdefault("params", count_params(src))
        fields.update(_lineage_fields(fields.get("parent"), manifest_fields, root_path))
        for key in ("files", "fingerprint", "versions"):
            fields.pop(key, None)  # recomputed by write_manifest
        if link:
            write_manifest(src, **fields)
            dest = src
            # Root-relative inside the root (the root stays movable), absolute outside it.
            stored = src.resolve().relative_to(root_path.resolve()).as_posix() if _inside(src, root_path) \
                else str(src.resolve())
        else:
            dest = root_path / name
            with atomic_dir(dest) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)  # follows symlinks: a real copy
                write_manifest(tmp, **fields)
            stored = name
        index = _read_index(root_path)
        index[name] = {"path": stored, "linked": link,
                       "registered": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_index(root_path, index)
    return dest


def release_path(model_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> list[str]:
    """Drop the linked entries that point at `model_dir` (files kept): a run about to overwrite its
    `final/` with new weights (a finished run extended with more steps) must not leave an old
    name describing weights that are gone. Returns the names dropped."""
    src = Path(model_dir)
    root_path = models_root(root)
    if not (root_path / INDEX).is_file():
        return []
    with _locked(root_path):
        entries = _entries(root_path)
        names = [n for n, e in entries.items() if e.get("linked") and e["path"].resolve() == src.resolve()]
        if names:
            index = _read_index(root_path)
            for n in names:
                index.pop(n, None)
            _write_index(root_path, index)
    for n in names:
        log.warning("%s was registered as %s; its weights are being replaced, so that name is dropped", src, n)
    return names


def dependents(model_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> list[str]:
    """Registered models that name the model at `model_dir` as their parent (by one of its
    registered names) or as their base (`base_model.path`): a LoRA cannot load without its base,
    and lineage would point at nothing. Replacing or removing `model_dir` is refused while any exist."""
    entries = _entries(models_root(root))
    target = Path(model_dir).resolve()
    names = {n for n, e in entries.items() if e["path"].resolve() == target}
    found = []
    for name, entry in entries.items():
        if name in names or not _is_dir(entry["path"]):
            continue
        try:
            manifest = read_manifest(entry["path"])
        except MinilabError:
            continue
        base = manifest.get("base_model")
        base_path = base.get("path") if isinstance(base, dict) else None
        if manifest.get("parent") in names or (isinstance(base_path, str) and Path(base_path).resolve() == target):
            found.append(name)
    return sorted(found)


def refuse_if_depended_on(what: str, model_dir: Path, root: Path, hint: str = "remove {them} first "
                           "(minilab models rm NAME)") -> None:
    if deps := dependents(model_dir, root):
        them = "that" if len(deps) == 1 else "those"
        raise MinilabError(f"{what}: the parent or base of {', '.join(deps)} (registered); " + hint.format(them=them))


def list_models(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, type, params, size_bytes (true bytes on disk),
    parent, created, path, linked, missing."""
    rows = []
    for name, entry in sorted(_entries(models_root(root)).items()):
        path: Path = entry["path"]
        exists = path.is_dir()
        manifest = read_manifest(path) if exists else {}
        rows.append({"name": name, "type": manifest.get("training_type") or parse_name(name)["training_type"],
                     "params": manifest.get("params"), "size_bytes": dir_size(path) if exists else None,
                     "parent": manifest.get("parent"), "created": manifest.get("created"),
                     "path": str(path), "linked": bool(entry.get("linked")), "missing": not exists})
    return rows


def show_model(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Registry entry, manifest and the files actually on disk (path, size) of one model."""
    root_path = models_root(root)
    path = resolve_model_dir(name, root_path)
    entry = _entries(root_path).get(name, {})
    if not entry and not is_model_dir(path):
        raise MinilabError(f"{name}: a directory but not a minilab model (no model manifest.json in it); "
                           "give a registry name (see 'minilab models list') or a model directory")
    files = [{"path": p.relative_to(path).as_posix(), "size": p.stat().st_size}
             for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()]
    return {"name": name, "path": str(path), "linked": bool(entry.get("linked")),
            "size_bytes": sum(f["size"] for f in files), "manifest": read_manifest(path), "files": files}


def remove_model(name: str, root: str | os.PathLike | None = None, *, delete_files: bool = False) -> dict[str, Any]:
    """Drop `name` from the registry. Its directory is deleted when it lives inside the root, or
    when `delete_files` is set; a linked directory elsewhere is kept. Returns what was done."""
    root_path = models_root(root)
    with _locked(root_path):
        entries = _entries(root_path)
        if name not in entries:
            raise _unknown(name, root_path, sorted(entries))
        path: Path = entries[name]["path"]
        refuse_if_depended_on(name, path, root_path)
        delete = path.is_dir() and (_inside(path, root_path) or delete_files)
        hidden = None
        if delete:
            # Hide it first (an invalid name is never listed), so an interrupted rmtree cannot
            # leave a half-deleted directory that still looks registered.
            hidden = path.with_name(f".{path.name}.deleting-{os.getpid()}")
            os.replace(path, hidden)
        index = _read_index(root_path)
        index.pop(name, None)
        _write_index(root_path, index)
    if hidden is not None:
        shutil.rmtree(hidden, ignore_errors=True)
    return {"name": name, "path": str(path), "deleted_files": delete}


def removal_plan(name: str, root: Path, delete_files: bool = False) -> tuple[Path, bool]:
    """What `models rm NAME` would do, checked before asking: the entry's path and whether its
    files would be deleted. Unknown names and models others depend on are refused here."""
    entries = _entries(root)
    if name not in entries:
        raise _unknown(name, root, sorted(entries))
    path = entries[name]["path"]  # may be gone already: rm must still drop a stale entry
    refuse_if_depended_on(name, path, root)  # before asking: a yes could not be acted on
    return path, path.is_dir() and (_inside(path, root) or delete_files)
