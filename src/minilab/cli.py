"""The `minilab` command: one verb per stage, each mapped to one module. This module only
dispatches; no stage imports it. Every pipeline stage kind (`minilab.stage`) is a verb too.

Every verb module exposes `add_arguments(parser)` and `main(args) -> int | None`, and declares its
flags with the helpers in `minilab.cliargs` (`flag`, `int_range`, `add_config_flags` for
`--config FILE` and `--set KEY=VALUE`, `config_from_args`). Multi-word flags accept both
spellings, `--output-dir` and `--output_dir`.

A `MinilabError` (a user mistake) prints one line, `minilab: error: ...`, and exits with its code
(2 for config and usage errors); it never shows a traceback. So does an `OSError` about a named
file (an output folder in /proc, on a read-only disk, under a file, without permission):
`minilab: error: PATH: REASON`, exit 1. `--log-level debug` shows the traceback of either.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from minilab import __version__
from minilab.cliargs import add_log_level_flag
from minilab.errors import MinilabError
from minilab.stage import STAGE_MODULES

# verb -> (module, one-line help). Modules are imported only when their verb runs or --help lists them.
# The pipeline's stage verbs come from the stage registry (`minilab.stage.STAGE_MODULES`), in pipeline order.
_FIRST: dict[str, tuple[str, str]] = {
    "run": ("minilab.recipe.runner", "run a recipe: the whole pipeline, stages cached by fingerprint, resumable"),
    "demo": ("minilab.demo", "run the built-in end-to-end demo on a CPU (the shipped recipe 'demo')"),
    "arch": ("minilab.arch", "list architecture presets with their true parameter counts and costs"),
    "models": ("minilab.models_verb", "list, show and remove models in the registry"),
}
_TOOLS: dict[str, tuple[str, str]] = {
    "plan": ("minilab.planner.cli", "will it fit: params, weights, RAM/VRAM and disk plans, with a verdict"),
    "generate": ("minilab.inference", "generate text from prompts (KV cache, sampling, stop strings, --int8)"),
    "chat": ("minilab.chat", "chat with a model in the terminal (history, the model's chat template)"),
    "serve": ("minilab.serve", "OpenAI-compatible HTTP API and web chat page (FastAPI + uvicorn)"),
    "cleanup": ("minilab.cleanup.runs", "free disk: prune checkpoints, strip optimizer state, drop failed runs"),
    "du": ("minilab.cleanup.du", "disk used by minilab data, runs, models and the HF cache, largest first"),
    "cache": ("minilab.cleanup.cache", "list, remove and prune the Hugging Face hub cache (dry run by default)"),
    "verify-resume": ("minilab.verify_resume", "prove on your config that a killed run resumes exactly"),
}
VERBS: dict[str, tuple[str, str]] = {**_FIRST, **STAGE_MODULES, **_TOOLS}

log = logging.getLogger("minilab")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `verb`'s module is imported (all of them when None), so `minilab --help`
    and each verb start fast instead of importing every stage's libraries."""
    parser = argparse.ArgumentParser(
        prog="minilab",
        description="Train, fine-tune, evaluate and serve small language models on modest hardware.",
        epilog="Run 'minilab VERB --help' for a verb's options.")
    parser.add_argument("--version", action="version", version=f"minilab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if verb is not None and name != verb:
            continue  # listed in the top-level help, its options parsed only when it runs
        add_log_level_flag(p)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def _chosen_verb(argv: list[str]) -> str:
    """The verb is the first positional argument (the top level has only --help/--version); ''
    when there is none or it is unknown: then no module is needed, argparse reports the rest."""
    first = next((a for a in argv if not a.startswith("-")), "")
    return first if first in VERBS else ""


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(message)s", stream=sys.stderr)


# The hidden sibling a stage writes into before renaming it into place (fsutil.atomic_dir/atomic_path).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def os_error_line(e: OSError) -> str:
    """`PATH: REASON` for an OSError about a file; a stage's hidden temporary sibling is reported
    as the output path it stands for (the folder the user named)."""
    paths = []
    for name in (e.filename, e.filename2):
        if name is None:
            continue
        path = os.fsdecode(name)
        head, tail = os.path.split(path)
        m = _TEMP_NAME.match(tail)
        paths.append(os.path.join(head, m["name"]) if m else path)
    reason = e.strerror or str(e)
    if isinstance(e, FileExistsError) and paths and not os.path.isdir(paths[0]):
        reason = "exists and is not a directory"  # makedirs through an ordinary file
    return f"{' -> '.join(dict.fromkeys(paths))}: {reason}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_chosen_verb(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    try:
        return int(args._main(args) or 0)
    except MinilabError as e:
        if args.log_level == "debug":
            raise
        print(f"minilab: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.filename is None or args.log_level == "debug":
            raise  # no file named: not a user's path problem, keep the traceback
        print(f"minilab: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minilab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
