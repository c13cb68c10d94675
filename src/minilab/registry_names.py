"""Model names: `{architecture}-{size}-{dataset}-{training_type}-v{N}`, e.g.
`llama-23M-tinystories-pretrain-v1`, and their rules (see `minilab.registry`, the library that
names, registers and finds models; `registry.make_name` picks the next free version).

`-` separates the five fields, so no field may contain one: architecture and dataset are
lowercase `[a-z0-9][a-z0-9_.]*` (`slug` lowercases them and turns `-` and spaces into `_`);
size looks like `1.8M`, `23M`, `1.1B`; training_type is one of `TRAINING_TYPES`; the version is
`v1`, `v2`, ...
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from minilab.errors import ConfigError

TRAINING_TYPES = ("pretrain", "sft", "lora", "dpo", "merged", "ft", "int8")
_FIELD_RE = re.compile(r"^[a-z0-9][a-z0-9_.]*$")
_SIZE_RE = re.compile(r"^(\d+(\.\d)?[KMB]|\d+)$")
_VERSION_RE = re.compile(r"^v([1-9]\d*)$")
_EXAMPLE = "llama-23M-tinystories-pretrain-v1"
MAX_NAME = 128


def validate_name(name: str) -> str:
    """Return `name` if it follows the convention, else raise a one-line `ConfigError`."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("model name is empty", key="name")
    if "/" in name or "\\" in name or os.sep in name or Path(name).is_absolute():
        raise ConfigError(f"model name '{name}' must not contain path separators", key="name")
    if ".." in name:
        raise ConfigError(f"model name '{name}' must not contain '..'", key="name")
    if len(name) > MAX_NAME:
        raise ConfigError(f"model name is longer than {MAX_NAME} characters", key="name")
    parts = name.split("-")
    if len(parts) != 5:
        raise ConfigError(f"model name '{name}' must be ARCH-SIZE-DATASET-TYPE-vN (five fields separated "
                          f"by '-'), e.g. {_EXAMPLE}", key="name")
    arch, size, dataset, ttype, version = parts
    for label, value in (("architecture", arch), ("dataset", dataset)):
        if not _FIELD_RE.match(value):
            raise ConfigError(f"model name '{name}': {label} '{value}' must be lowercase [a-z0-9][a-z0-9_.]*",
                              key="name")
    if not _SIZE_RE.match(size):
        raise ConfigError(f"model name '{name}': size '{size}' must look like 1.8M, 23M or 1.1B", key="name")
    if ttype not in TRAINING_TYPES:
        raise ConfigError(f"model name '{name}': training type '{ttype}' is not one of "
                          f"{', '.join(TRAINING_TYPES)}", key="name")
    if not _VERSION_RE.match(version):
        raise ConfigError(f"model name '{name}': version '{version}' must be v1, v2, ...", key="name")
    return name


def parse_name(name: str) -> dict[str, Any]:
    """The fields of a valid name; `version` is an int and `base` the name without `-vN`."""
    arch, size, dataset, ttype, version = validate_name(name).split("-")
    return {"architecture": arch, "size": size, "dataset": dataset, "training_type": ttype,
            "version": int(version[1:]), "base": name.rsplit("-", 1)[0]}


def slug(value: str, label: str) -> str:
    """`value` as a name field: lowercase, runs of spaces and `-` as `_`; a one-line error otherwise."""
    text = re.sub(r"[\s\-]+", "_", str(value).strip().lower())
    if not _FIELD_RE.match(text) or ".." in text:
        raise ConfigError(f"{label} '{value}' cannot be used in a model name (need [a-z0-9][a-z0-9_.]*)",
                          key=label)
    return text
