"""Structure checks on the source tree: the import graph of src/minilab has no cycle.

The graph is read with ast, not by importing: module-level AND function-level
imports count, since a lazy import inside a function only hides a cycle. Imports under
`if TYPE_CHECKING:` are for annotations only (never executed) and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "minilab"

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve_from(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every minilab module that `module` imports, anywhere in its body."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, path, node)
            # `from pkg import name` where name is a submodule imports the submodule;
            # any other name is read from `pkg` itself
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
    return {t for t in found if t in modules and t != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _targets(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return sorted(component)


def test_import_graph_sees_function_level_and_submodule_imports():
    graph = import_graph()
    assert "minilab.errors" in graph
    assert all(t.startswith(PACKAGE) for targets in graph.values() for t in targets)
    # evaluate/stage.py imports these inside run(): `from minilab.evaluate import perplexity, ...`
    stage = graph["minilab.evaluate.stage"]
    assert {"minilab.evaluate.perplexity", "minilab.loading"} <= stage
    assert "minilab.evaluate" not in stage  # only submodules were named, not the package


def test_find_cycles_reports_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    message = "\n".join(" -> ".join(c) for c in cycles)  # one shortest cycle per tangle
    assert not cycles, f"import cycles in src/minilab:\n{message}"


# Modules that run stages rather than being one: they may import a stage module. The recipe goes
# through `minilab.stage.get` (no static import at all); `verify_resume` is pretrain's own proof
# (it runs pretrain's verb with pretrain's flags, straight and killed); a stage's package
# `__init__` re-exports its stage.
STAGE_DRIVERS = {"minilab.verify_resume": {"minilab.pretrain"}, "minilab.evaluate": {"minilab.evaluate.stage"}}


def stage_imports(graph: dict[str, set[str]], stages: set[str]) -> list[str]:
    """'importer -> stage' for every import of a stage module by another module, drivers aside."""
    return [f"{m} -> {t}" for m in sorted(graph) for t in sorted(graph[m] & stages)
            if t not in STAGE_DRIVERS.get(m, set())]


def test_stage_imports_reports_a_stage_importing_another():
    graph = {"minilab.finetune.dpo": {"minilab.finetune.sft", "minilab.training"},
             "minilab.verify_resume": {"minilab.pretrain"}}
    stages = {"minilab.finetune.dpo", "minilab.finetune.sft", "minilab.pretrain"}
    assert stage_imports(graph, stages) == ["minilab.finetune.dpo -> minilab.finetune.sft"]


def test_no_module_imports_a_stage_module():
    """Stages never import each other, nor does shared code import a stage: what two stages
    share lives below them (packed-data reading in data/packed.py, tokenizers in tokenization.py,
    SFT/DPO pieces in finetune/common.py, rows.py, records.py, tune_cli.py)."""
    from minilab.stage import STAGE_MODULES

    stages = {module for module, _help in STAGE_MODULES.values()}
    graph = import_graph()
    assert stages <= set(graph), "a registered stage module is missing from src/minilab"
    found = stage_imports(graph, stages)
    assert not found, "stage modules imported outside the stage registry:\n" + "\n".join(found)


MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def test_no_module_or_function_grows_past_what_a_reader_holds():
    """A file over 500 lines or a function over 80 is where a second concept has moved in: split
    it along its seam (as generate.py -> sampling.py, serve/app.py -> scheduler.py were)."""
    too_long = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(SRC)
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "over the limits:\n" + "\n".join(too_long)
