"""The `minilab` command: one verb per stage, each mapped to one module.

Every verb module exposes `add_arguments(parser)` and `main(args) -> int | None`. Verbs that take
a config add the shared flags with `add_config_flags`: `--config FILE` (JSON or YAML) and
`--set KEY=VALUE` (repeatable, dotted keys, e.g. `--set train.lr=3e-4`). Multi-word flags accept
both spellings, `--output-dir` and `--output_dir` (see `flag`).

A `MinilabError` (a user mistake) prints one line, `minilab: error: ...`, and exits with its code
(2 for config and usage errors); it never shows a traceback. `--log-level debug` shows one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from minilab import __version__
from minilab.errors import MinilabError

# verb -> (module, one-line help). Modules are imported only when their verb runs or --help lists them.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("minilab.demo", "run the built-in end-to-end demo on a CPU (the README's main job)"),
    "arch": ("minilab.arch", "list architecture presets with their true parameter counts and costs"),
    "models": ("minilab.registry", "list, show and remove models in the registry"),
    "corpus": ("minilab.data.corpus", "clean, filter and deduplicate raw text into corpus shards"),
    "tokenizer": ("minilab.data.tokenizer", "train (or adopt) a tokenizer and fingerprint it"),
    "pack": ("minilab.data.pack", "tokenize a corpus into packed train/val token files"),
    "eval": ("minilab.evaluate.stage",
             "perplexity, bits per byte, multiple choice with baselines, generations and a report"),
    "pretrain": ("minilab.pretrain", "pretrain a model from scratch on packed data (exact resume, torchrun)"),
    "verify-resume": ("minilab.verify_resume", "prove on your config that a killed run resumes exactly"),
}

log = logging.getLogger("minilab")


def flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kwargs):
    """Add `--some-flag` and its `--some_flag` twin as one option."""
    names = [name]
    if "-" in name[2:]:
        names.append("--" + name[2:].replace("-", "_"))
    return parser.add_argument(*names, **kwargs)


def add_config_flags(parser: argparse.ArgumentParser, config_help: str = "") -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help=f"JSON or YAML config file. {config_help}".strip())
    group.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config key, dotted (e.g. --set train.lr=3e-4); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilab",
        description="Train, fine-tune, evaluate and serve small language models on modest hardware.",
        epilog="Run 'minilab VERB --help' for a verb's options.")
    parser.add_argument("--version", action="version", version=f"minilab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        flag(p, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
             help="logging verbosity; 'debug' also shows tracebacks")
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    except KeyboardInterrupt:
        print("minilab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
