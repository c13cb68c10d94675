"""The stage contract (`minilab.stage`): every registered kind is one module exporting its STAGE,
and the recipe and the CLI reach stages only through the registry, never by naming a kind."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from minilab import stage

SRC = Path(__file__).resolve().parent.parent / "src" / "minilab"


@pytest.mark.parametrize("kind", stage.kinds())
def test_every_kind_module_exports_its_stage(kind):
    st = stage.get(kind)
    assert isinstance(st, stage.Stage) and st.kind == kind
    assert dataclasses.is_dataclass(st.config)
    names = {f.name for f in dataclasses.fields(st.config)}
    assert "output_dir" in names  # the recipe sets it to the stage's folder
    assert st.model_input is None or st.model_input in names
    assert set(st.output_facts) <= names and set(st.required) <= names
    assert callable(st.run) and callable(st.metric)
    assert st.output in ("dir", "final") or callable(st.output)
    assert st.help == stage.STAGE_MODULES[kind][1]


def test_the_cli_lists_every_stage_kind_as_a_verb():
    from minilab.cli import VERBS

    for kind, (module, help_text) in stage.STAGE_MODULES.items():
        assert VERBS[kind] == (module, help_text)


def test_the_registry_imports_no_stage_module():
    """`minilab --help` stays fast: the CLI and the registry load no stage (nor torch)."""
    code = ("import sys, minilab.cli, minilab.stage; "
            "mods = [m for m, _ in minilab.stage.STAGE_MODULES.values()] + ['torch']; "
            "print([m for m in mods if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _kind_expr(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "kind") or (isinstance(node, ast.Attribute)
                                                                  and node.attr == "kind")


def _string_constants(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_string_constants(e) for e in node.elts)
    return False


def kind_dispatch(source: str) -> list[int]:
    """Lines comparing a `kind` (or `x.kind`) with a string constant or a collection of them."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_kind_expr(s) for s in sides) and any(_string_constants(s) for s in sides):
                lines.append(node.lineno)
    return lines


def test_kind_dispatch_scan_finds_string_comparisons():
    assert kind_dispatch('if s.kind == "pretrain":\n    pass\nx = kind in ("sft", "dpo")\n') == [1, 3]
    assert kind_dispatch("if s.kind == kind:\n    pass\n") == []


def test_the_recipe_dispatches_no_kind_by_string():
    found = {f"{p.relative_to(SRC)}:{line}" for p in sorted((SRC / "recipe").glob("*.py"))
             for line in kind_dispatch(p.read_text(encoding="utf-8"))}
    assert not found, f"stage kinds named in the recipe (use a Stage attribute): {sorted(found)}"
