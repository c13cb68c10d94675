"""minilab.cliargs: the one home of the flags verbs share and of `config_from_args`; minilab.cli
only dispatches (no stage imports it)."""

import argparse
import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import minilab
from minilab.cli import main
from minilab.cliargs import add_config_flags, config_from_args, flag

SRC = Path(minilab.__file__).parent
DISPATCHER_USERS = {"__main__.py", "docs_tables.py"}  # the entry point, and the tables of every verb's flags


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def test_no_stage_imports_the_dispatcher():
    importers = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "minilab.cli" and name not in DISPATCHER_USERS:
                importers.append(name)
            if isinstance(node, ast.Import) and any(a.name == "minilab.cli" for a in node.names):
                importers.append(name)
    assert importers == []


def test_config_from_args_is_defined_once():
    defined = [name for name, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name == "config_from_args"]
    assert defined == ["cliargs.py"]


@dataclass
class _Cfg:
    name: str = "default"
    steps: int = 1
    tags: list[str] | None = None
    strict: bool = False


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    flag(p, "--name")
    flag(p, "--steps", type=int)
    p.add_argument("--strict", action="store_true")
    add_config_flags(p)
    return p.parse_args(argv)


def test_precedence_defaults_file_flags_set(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"name": "file", "steps": 5, "strict": True}))
    cfg = config_from_args(_Cfg, _args(["--config", str(cfg_file), "--steps", "7", "--set", "name=over"]),
                           ("name", "steps", "strict"), flags={"tags": None})
    # --set beats the file; a flag beats the file; a flag left unset (None, False) keeps the file's value
    assert (cfg.name, cfg.steps, cfg.strict, cfg.tags) == ("over", 7, True, None)
    assert config_from_args(_Cfg, _args([]), ("name", "steps"), flags={"tags": ["a"]}) == _Cfg(tags=["a"])


@pytest.mark.parametrize("verb", ["pretrain", "eval", "sft", "dpo"])
def test_every_verb_names_set_in_a_config_error(verb, capsys):
    # pretrain and eval had their own config_from_args, which left "(with --set)" out
    assert main([verb, "--set", "device=tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["minilab: error: command line (with --set): key 'device': unknown device 'tpu': "
                   "use auto, cpu, cuda, cuda:N (a GPU index) or mps"]
