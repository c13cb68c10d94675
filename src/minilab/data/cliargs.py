"""Build a stage's typed config from `--config FILE`, plain flags and `--set KEY=VALUE`.

Precedence, lowest first: dataclass defaults, the config file, flags given on the command line,
then `--set` overrides. Flags left at None are treated as not given, so a config file value is
never replaced by a flag's default.
"""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from minilab.config import apply_overrides, from_dict, read_config_file

T = TypeVar("T")


def config_from_args(cls: type[T], args: argparse.Namespace, flags: dict[str, Any]) -> T:
    data: dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    for key, value in flags.items():
        if value is None or value == [] or value is False:
            continue
        data[key] = value
    overrides = getattr(args, "overrides", None) or []
    data = apply_overrides(data, overrides)
    source = args.config or "command line"
    if overrides:
        source += " (with --set)"
    return from_dict(cls, data, source=source)
