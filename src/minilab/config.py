"""Typed configs: dataclasses loaded from JSON/YAML with dotted overrides, validated on load.

A config is a (possibly nested) dataclass. Each field may carry `metadata={"help": ...}`, which
feeds `--help` and the docs. `load_config(cls, path, overrides)` reads the file, applies
`a.b=value` overrides (values parsed as YAML scalars, so `3e-4`, `true`, `[1, 2]` work), and
builds the dataclass, checking every key and type on the way. Any problem is a `ConfigError`
that names the file and the dotted key, e.g.

    configs/run.yaml: key 'train.lrr': unknown key (did you mean 'lr'?)

Single-field rules live in the field's metadata and are checked here for every config of every
verb, so a bad value is refused on load instead of crashing deep inside a stage:
`"min"`/`"max"` (inclusive) and `"gt"`/`"lt"` (exclusive) bound a number; `"check"` is a
function of the value returning an error message (or None). `SEED` and
`DEVICE` are the shared ones, e.g. `field(default=1234, metadata={"help": ..., **SEED})`.

A dataclass may define `validate(self)` for cross-field rules ("n_head must divide d_model");
it raises `ConfigError` with `key=` set, and the loader adds the file name and key prefix.

Every float value, bounded or not, must be finite: `nan` and `inf` (`--set optim.lr=nan`) are
refused on load, since no setting means them and a `nan` passes every `<`/`>` check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from minilab.errors import ConfigError

T = TypeVar("T")

# A seed every consumer takes: torch.manual_seed, random.Random, numpy's default_rng, and the
# 32-bit one, np.random.seed (pretrain).
SEED = {"min": 0, "max": 2**32 - 1}

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(value: Any) -> str | None:
    """The devices the training and inference stages run on (`training.resolve_device`)."""
    if isinstance(value, str) and _DEVICE_RE.match(value):
        return None
    return f"unknown device {value!r}: use auto, cpu, cuda, cuda:N (a GPU index) or mps"


DEVICE = {"check": check_device}


def models_dir_field(what: str = "", *, recipe_stage: bool = False) -> Any:
    """The `models_dir` field every registry-writing config has: the registry root, `what` the
    stage does there; a recipe-only stage's default is the recipe's registry."""
    default = ("the recipe's (its models_dir, else $MINILAB_MODELS_DIR, else models/)" if recipe_stage
               else "$MINILAB_MODELS_DIR, else models/")
    return dataclasses.field(default=None, metadata={"help": f"registry root{what}; default {default}"})


def recipe_output_dir_field() -> Any:
    """`output_dir` of a config only a recipe runs: always the stage's folder."""
    return dataclasses.field(default="", metadata={
        "help": "set by the recipe: the stage's folder in its workdir (a recipe may not set it)"})


def check_field(meta: Any, value: Any) -> str | None:
    """The error message for `value` under a field's metadata rules, or None when it passes."""
    if value is None:
        return None
    check = meta.get("check")
    if check is not None and (problem := check(value)):
        return problem
    bounds = {k: meta[k] for k in ("min", "max", "gt", "lt") if k in meta}
    if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if ("min" in bounds and value < bounds["min"]) or ("max" in bounds and value > bounds["max"]) or \
            ("gt" in bounds and value <= bounds["gt"]) or ("lt" in bounds and value >= bounds["lt"]):
        return f"must be {_range_text(bounds)}, got {value!r}"
    return None


def _range_text(b: dict[str, Any]) -> str:
    low = ("[", b["min"]) if "min" in b else ("(", b["gt"]) if "gt" in b else None
    high = (b["max"], "]") if "max" in b else (b["lt"], ")") if "lt" in b else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{'≥' if low[0] == '[' else '>'} {low[1]}"
    return f"{'≤' if high[1] == ']' else '<'} {high[0]}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping; a parse error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not a text file (byte {e.start} is not UTF-8): a config is JSON or YAML text",
                          source=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from None
    if "\x00" in text:
        raise ConfigError("not a text file (it contains NUL bytes): a config is JSON or YAML text", source=str(path))
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {e.lineno}: invalid JSON: {e.msg}", source=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{line}invalid YAML: {getattr(e, 'problem', e)}", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys to values", source=str(path))
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object (a model's config.json); a parse error names the
    file and line. What the HF loader and the planner's model resolution read alike."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {e.lineno}: invalid JSON: {e.msg}", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", source=str(path))
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). The value is parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. train.lr=3e-4)", source="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with each dotted `key=value` override set."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides or []:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set '{key}': '{part}' is not a section", source="--set", key=key)
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Build `cls` from `base` (defaults as data), then the file at `path`, then `overrides`."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        data = deep_merge(data, read_config_file(path))
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set)" if path else "--set"
    return from_dict(cls, data, source=source)


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types; errors name `source` and key."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", source=source, key=prefix or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"unknown key{hint}", source=source, key=dotted)
        kwargs[key] = _coerce(hints[key], value, source=source, key=dotted)
        if problem := check_field(fields[key].metadata, kwargs[key]):
            raise ConfigError(problem, source=source, key=dotted)
    missing = [n for n, f in fields.items() if n not in kwargs and _is_required(f)]
    if missing:
        raise ConfigError("required key is missing", source=source, key=f"{prefix}{missing[0]}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            key = f"{prefix}{e.key}" if e.key else (prefix.rstrip(".") or None)
            raise ConfigError(_bare_message(e), source=source, key=key) from None
    return obj


def _bare_message(e: ConfigError) -> str:
    msg = str(e)
    if e.key and msg.startswith(f"key '{e.key}': "):
        msg = msg[len(f"key '{e.key}': "):]
    return msg


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, *, source: str, key: str) -> Any:
    """Check `value` against type `tp`, converting only where it is lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source=source, key=key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: X's own message names the item at fault (data_weights[1])
            raise errors[0]
        raise ConfigError(f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}",
                          source=source, key=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}",
                              source=source, key=key)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", source=source, key=key)
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", source=source, key=key)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", source=source, key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"expected an integer, got {value!r}", source=source, key=key)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `3e-4` as a string because it has no dot: accept it.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"expected a number, got {value!r}", source=source, key=key)
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {number!r}", source=source, key=key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", source=source, key=key)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"expected a path, got {value!r}", source=source, key=key)
    raise TypeError(f"config type {tp!r} of {key} is not supported")


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON-able data, for manifests and meta.json."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `--help` epilogs and docs. The default is
    the one a run gets: a nested dataclass's keys show the values of the field's own default
    (SFTConfig's `optim` factory gives lr 2e-4, not OptimConfig's class default 1e-3)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if instance is not None:
            has, value = True, getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            has, value = True, f.default
        elif f.default_factory is not dataclasses.MISSING:
            has, value = True, f.default_factory()
        else:
            has, value = False, None
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.", value if has else None)
            continue
        rows.append((f"{prefix}{f.name}", repr(value) if has else "(required)", f.metadata.get("help", "")))
    return rows
