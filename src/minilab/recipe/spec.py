"""Reading a recipe: its keys, its stages, their references and their fingerprints.

Every problem is a `ConfigError` naming the recipe file and the dotted key, raised before any
stage runs: an unknown top-level key, an unknown stage kind, a reference to a stage that does
not come earlier, and (through each stage's own config class) any unknown or mistyped key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilab.config import apply_overrides, read_config_file
from minilab.errors import ConfigError
from minilab.recipe.refs import BUILTIN_REFS, REF_ATTRS, find_refs

TOP_KEYS = ("name", "description", "workdir", "models_dir", "final_model", "stages")
STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass
class Stage:
    name: str
    kind: str
    config: dict[str, Any]          # as written, without the `stage:` key
    deps: list[str] = field(default_factory=list)  # stages it references, in first-use order
    index: int = 0


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    workdir: Path
    models_dir: str | None
    final_model: str | None
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def stage_dir(self, name: str) -> Path:
        return self.workdir / name

    def dependents(self, name: str) -> set[str]:
        """Stages that use `name`'s output, directly or through others."""
        out: set[str] = set()
        for s in self.stages:
            if name in s.deps or out.intersection(s.deps):
                out.add(s.name)
        return out


def load_recipe(path: str | Path, *, workdir: str | None = None, models_dir: str | None = None,
                overrides: list[str] | None = None) -> Recipe:
    """Read and check the recipe at `path`; `overrides` are dotted KEY=VALUE (stages.sft.max_steps=50)."""
    from minilab.stage import kinds

    path = Path(path)
    data = read_config_file(path)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{path} (with --set)"
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown key (known keys: {', '.join(TOP_KEYS)})", source=source, key=key)
    name = str(data.get("name") or path.stem)
    if not RECIPE_NAME.match(name):
        raise ConfigError("use letters, digits, '-' and '_' (it names the work directory)",
                          source=source, key="name")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise ConfigError("a mapping of stage names to their configs is required", source=source, key="stages")
    stages: list[Stage] = []
    for i, (sname, cfg) in enumerate(raw_stages.items()):
        key = f"stages.{sname}"
        if not isinstance(sname, str) or not STAGE_NAME.match(sname):
            raise ConfigError("stage names use lowercase letters, digits, '-' and '_'", source=source, key=key)
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise ConfigError("expected a mapping of the stage's config keys", source=source, key=key)
        cfg = dict(cfg)
        kind = cfg.pop("stage", sname)
        if kind not in kinds():
            raise ConfigError(f"unknown stage kind '{kind}' (kinds: {', '.join(kinds())}; name the kind with "
                              f"'stage: KIND' when the stage's name is not one)", source=source, key=f"{key}.stage")
        known = {s.name for s in stages}
        deps: list[str] = []
        for ref, attr in find_refs(cfg):
            if ref in BUILTIN_REFS and attr is None:
                continue
            if ref == sname or ref not in known:
                later = " (it comes later: stages run in the order written)" if ref in raw_stages else ""
                raise ConfigError(f"${{{ref}}} names no earlier stage{later}; earlier stages: "
                                  f"{', '.join(sorted(known)) or 'none'}", source=source, key=key)
            if attr not in REF_ATTRS:
                raise ConfigError(f"${{{ref}.{attr}}}: unknown attribute (use ${{{ref}}} for its output, "
                                  f"${{{ref}.dir}} or ${{{ref}.name}})", source=source, key=key)
            if ref not in deps:
                deps.append(ref)
        stages.append(Stage(sname, kind, cfg, deps, i))
    recipe = Recipe(path=path, name=name, description=str(data.get("description") or ""),
                    workdir=Path(workdir or data.get("workdir") or f"runs/{name}"),
                    models_dir=models_dir or data.get("models_dir") or os.environ.get("MINILAB_MODELS_DIR"),
                    final_model=data.get("final_model"), stages=stages)
    if recipe.final_model is not None:
        for ref, _attr in find_refs(recipe.final_model):
            if ref not in raw_stages and ref not in BUILTIN_REFS:
                raise ConfigError(f"${{{ref}}} names no stage", source=source, key="final_model")
    for s in stages:  # every stage's config checked by its own config class, before anything runs
        from minilab.recipe.stages import build_config

        build_config(recipe, s, lambda ref, attr: placeholder(recipe, ref, attr), source=source)
    return recipe


def placeholder(recipe: Recipe, ref: str, attr: str | None) -> str:
    """What a reference stands for (a path; a marker for a registry name not known before its stage ran)."""
    from minilab.stage import get as get_stage

    if ref == "recipe_dir":
        return str(recipe.path.resolve().parent)
    if ref == "workdir":
        return str(recipe.workdir)
    if attr == "name":
        return f"<registry name of {ref}>"
    stage = recipe.stage(ref)
    d = recipe.stage_dir(ref)
    return str(d if attr == "dir" else get_stage(stage.kind).output_path(d, stage.config))


# ---- fingerprints ---------------------------------------------------------------------------------
_DIGESTS: dict[tuple[str, int, int], str] = {}


def path_digest(p: Path) -> str:
    """SHA-256 of a file's bytes (memoised per size and mtime); a directory's listing of sizes and mtimes."""
    from minilab.fsutil import sha256_file

    st = p.stat()
    if p.is_file():
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = sha256_file(p)
        return _DIGESTS[key]
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            fs = f.stat()
            h.update(f"{f.relative_to(p)}\0{fs.st_size}\0{fs.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()


def external_inputs(config: Any, workdir: Path) -> dict[str, str]:
    """Digests of the files and folders a stage config names that live outside the recipe's work
    directory (the user's data): editing one of them reruns the stage."""
    out: dict[str, str] = {}
    work = workdir.resolve()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and len(v) < 4096 and "\n" not in v:
            p = Path(v).expanduser()
            try:
                if not p.exists():
                    return
                rp = p.resolve()
            except OSError:
                return
            if rp == work or work in rp.parents:
                return  # a stage output: covered by that stage's fingerprint
            out[v] = path_digest(p)

    walk(config)
    return out


def fingerprint(kind: str, config: dict[str, Any], upstream: dict[str, str], inputs: dict[str, str]) -> str:
    from minilab import __version__

    blob = json.dumps({"minilab": __version__, "kind": kind, "config": config, "upstream": upstream,
                       "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
