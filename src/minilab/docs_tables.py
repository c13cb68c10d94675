"""Generated tables in the docs: config keys from the config dataclasses, flags from the CLI parser.

A Markdown page marks a region, and everything between the markers is rewritten from the code:

    <!-- config-table: minilab.data.pack:PackConfig -->
    | key | default | what it does |
    ...
    <!-- /config-table -->

    <!-- cli-flags: export -->          (a verb, or a verb and its subcommand: "models list")
    | flag | default | what it does |
    ...
    <!-- /cli-flags -->

Config tables list every dotted key `--config FILE` and `--set KEY=VALUE` accept, with the
default a run actually gets and the field's help text (`minilab.config.describe`). Flag tables
list a verb's options as `minilab VERB --help` prints them.

    python -m minilab.docs_tables            # rewrite README.md and docs/**/*.md in place
    python -m minilab.docs_tables --check    # exit 1 and name the stale pages (tests/test_docs.py)

Run it from the repository root after changing a config field, a default or a flag's help.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

# Markers stand on lines of their own (a marker quoted inside a sentence or a table is left alone).
REGION = re.compile(r"^(?P<open><!-- (?P<kind>config-table|cli-flags): *(?P<ref>[^>]*?) *-->)\n"
                    r"(?P<body>.*?)"
                    r"^(?P<close><!-- /(?P=kind) -->)$", re.S | re.M)
# Flag defaults read from the environment when the parser is built; never printed into the docs.
_ENV_DEFAULTS = ("MINILAB_API_KEY",)
_SKIP_FLAGS = {"-h", "--log-level"}  # every verb has them; the docs say so once


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped (GitHub honours `\\|` inside code spans too), one line."""
    return " ".join(str(text).replace("|", "\\|").split())


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def resolve_class(ref: str) -> type:
    """`minilab.data.pack:PackConfig` -> the class (a leading `minilab.` may be left out)."""
    module_name, sep, cls_name = ref.partition(":")
    if not sep or not cls_name:
        raise ValueError(f"config-table reference {ref!r} must be MODULE:ClassName")
    if not module_name.startswith("minilab"):
        module_name = f"minilab.{module_name}"
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"config-table reference {ref!r}: no dataclass {cls_name} in {module_name}")
    return cls


def config_table(cls: type) -> str:
    """The Markdown table of `cls`'s keys: dotted key, default, help."""
    from minilab.config import describe

    lines = ["| key | default | what it does |", "|---|---|---|"]
    for key, default, help_text in describe(cls):  # a nested key's default is the run's, not its class's
        shown = "*required*" if default == "(required)" else _code(default)
        lines.append(f"| `{key}` | {shown} | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise ValueError(f"cli-flags reference: no subcommand {name!r} in '{parser.prog}'")


def verb_parser(ref: str) -> argparse.ArgumentParser:
    """The parser of `minilab VERB [SUBCOMMAND]`, built as the CLI builds it."""
    from minilab.cli import build_parser

    words = ref.split()
    if not words:
        raise ValueError("cli-flags reference is empty (expected a verb, e.g. 'export')")
    saved = {k: os.environ.pop(k) for k in _ENV_DEFAULTS if k in os.environ}
    try:
        parser = build_parser(words[0])
    finally:
        os.environ.update(saved)
    for word in words:
        parser = _subparser(parser, word)
    return parser


def flags_table(ref: str) -> str:
    """The Markdown table of a verb's arguments: positionals first, then options."""
    parser = verb_parser(ref)
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS or _SKIP_FLAGS.intersection(action.option_strings):
            continue
        if action.option_strings:
            # every spelling but the `--output_dir` twin of `--output-dir` (the CLI takes both)
            opts = action.option_strings
            name = ", ".join(s for s in opts if not ("_" in s and s.replace("_", "-") in opts))
            if action.nargs != 0:
                metavar = action.metavar or (action.dest.upper() if not action.choices else
                                             "{" + ",".join(map(str, action.choices)) + "}")
                name += f" {metavar}" + (" ..." if action.nargs in ("+", "*") else "")
        else:
            name = action.metavar or action.dest.upper()
        default = action.default
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS
        shown = "" if unset else _code(repr(default) if isinstance(default, str) else str(default))
        if action.required:
            shown = "*required*"
        lines.append(f"| `{_cell(name)}` | {shown} | {_cell(action.help or '')} |")
    return "\n".join(lines) + "\n"


def render(kind: str, ref: str) -> str:
    return config_table(resolve_class(ref)) if kind == "config-table" else flags_table(ref)


def update_text(text: str) -> str:
    """`text` with every marked region regenerated."""
    return REGION.sub(lambda m: f"{m['open']}\n{render(m['kind'], m['ref'])}{m['close']}", text)


def markdown_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.md")) if p.is_dir() else [p]
    return out


def stale_files(paths: Iterable[str | Path]) -> list[Path]:
    """The Markdown files whose generated regions differ from what `update_text` writes."""
    return [p for p in markdown_files(paths) if update_text(p.read_text(encoding="utf-8"))
            != p.read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilab.docs_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["README.md", "docs"],
                        help="Markdown files or folders (default: README.md docs)")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = stale_files(args.paths)
    if args.check:
        for p in stale:
            print(f"{p}: generated tables are out of date")
        return 1 if stale else 0
    for p in stale:
        p.write_text(update_text(p.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"updated {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
