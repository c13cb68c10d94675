"""The flags verbs share, and one way to turn them into a stage's typed config.

`minilab.cli` only dispatches: it maps each verb to a module and calls its `add_arguments(parser)`
and `main(args)`. What those modules need to declare their flags lives here, so no stage imports
the dispatcher:

- `flag`: `--some-flag` and its `--some_flag` twin as one option;
- `int_range`, `float_range`: argparse `type=`s that reject out-of-range values in one line;
- `add_log_level_flag`: `--log-level`, which the dispatcher adds to every verb;
- `add_config_flags`: `--config FILE` (JSON or YAML) and `--set KEY=VALUE` (repeatable, dotted);
- `config_from_args`: the config a verb runs with. Precedence, lowest first: dataclass defaults,
  the config file, flags given on the command line, then `--set` overrides. Flags left at None
  (or an empty list, or False) are treated as not given, so a config file value is never replaced
  by a flag's default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from minilab.config import apply_overrides, from_dict, read_config_file

T = TypeVar("T")


def flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kwargs):
    """Add `--some-flag` and its `--some_flag` twin as one option."""
    names = [name]
    if "-" in name[2:]:
        names.append("--" + name[2:].replace("-", "_"))
    return parser.add_argument(*names, **kwargs)


def _range(kind: type, noun: str, lo: float | None, hi: float | None):
    span = f"≥ {lo}" if hi is None else f"≤ {hi}" if lo is None else f"in {lo}..{hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {span}, got {text!r}") from None
        if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):  # nan too
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = noun.split()[-1]  # argparse's name for it in messages
    return parse


def int_range(lo: int | None = None, hi: int | None = None):
    """An argparse `type=` for an integer in lo..hi (either end open when None): out of range is
    argparse's one-line usage error naming the flag, e.g. `--port: must be in 0..65535, got 99999`."""
    return _range(int, "an integer", lo, hi)


def float_range(lo: float | None = None, hi: float | None = None):
    """`int_range` for a number: out of range (or nan) is argparse's one-line usage error naming
    the flag, e.g. `--min-age-hours: must be ≥ 0, got -1.0`."""
    return _range(float, "a number", lo, hi)


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
         help="logging verbosity; 'debug' also shows tracebacks")


def add_config_flags(parser: argparse.ArgumentParser, config_help: str = "") -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help=f"JSON or YAML config file. {config_help}".strip())
    group.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config key, dotted (e.g. --set train.lr=3e-4); repeatable")


def config_from_args(cls: type[T], args: argparse.Namespace, keys: Iterable[str] = (),
                     flags: Mapping[str, Any] | None = None) -> T:
    """`cls` built from `--config`, then the flags (`keys`: config keys read from `args` under
    the same name; `flags`: values a verb computed itself), then `--set`."""
    config = getattr(args, "config", None)
    data: dict[str, Any] = read_config_file(config) if config else {}
    given = {key: getattr(args, key, None) for key in keys} | dict(flags or {})
    for key, value in given.items():
        if value is None or value == [] or value is False:
            continue
        data[key] = value
    overrides = getattr(args, "overrides", None) or []
    data = apply_overrides(data, overrides)
    source = config or "command line"
    if overrides:
        source += " (with --set)"
    return from_dict(cls, data, source=source)
