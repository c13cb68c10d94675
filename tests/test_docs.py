"""The docs stay true: their generated tables match the code, and their runnable examples run.

Runnable examples are fenced blocks whose info string is `bash runnable` (GitHub highlights them
as bash). They run in this order, each with `bash -euo pipefail`, all in ONE temporary working
directory, so a later page uses what an earlier one produced:

    README.md, then docs/stages/*.md (sorted: corpus -> tokenizer -> pack -> pretrain -> eval ->
    sft -> dpo -> merge/export -> serve -> registry and disk), then the other docs/*.md (sorted).

`.venv/bin` (the directory of this Python) comes first on PATH, MINILAB_MODELS_DIR, HF_HOME
and MINILAB_CACHE point into the temporary directory, HF_HUB_OFFLINE=1, and OMP_NUM_THREADS=1
(robust timings on a busy machine). The built-in default corpus is copied from
the cache `minilab corpus --source default` filled on this machine (~/.cache/minilab, or
$MINILAB_CACHE), so nothing is fetched twice. A failing block is reported with its file and line
and its output. Keep examples at CPU-test scale (micro model, small vocab, tens of steps): the
whole file should stay under about two minutes on two cores.

    .venv/bin/python -m pytest -q tests/test_docs.py       # -s prints each block's time
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minilab import docs_tables
from minilab.data import default_corpus
from minilab.errors import MinilabError

REPO = Path(__file__).resolve().parents[1]
STAGE_PAGES = ["01-corpus.md", "02-tokenizer.md", "03-pack.md", "04-pretrain.md", "05-eval.md", "06-sft.md",
               "07-dpo.md", "08-merge-export-quantize.md", "09-serve.md", "10-registry-and-disk.md"]
OTHER_PAGES = ["distributed.md", "troubleshooting.md"]
FIX_TABLES = ".venv/bin/python -m minilab.docs_tables"
# Read at import, before the autouse fixture points MINILAB_CACHE at each test's tmp_path.
USER_CORPUS_CACHE = default_corpus.cache_dir()
_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")


def doc_files() -> list[Path]:
    """README.md, docs/stages/*.md, then the other docs/*.md: the order the blocks run in."""
    return ([REPO / "README.md"] + sorted((REPO / "docs" / "stages").glob("*.md"))
            + sorted((REPO / "docs").glob("*.md")))


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```bash runnable block in `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m["fence"], i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)
                    and not lines[j].strip().strip(fence[0])), None)
        if end is None:
            raise AssertionError(f"{path.relative_to(REPO)}:{start + 1}: code fence is never closed")
        if m["info"].split() == ["bash", "runnable"]:
            indent = len(m["indent"])
            blocks.append((start + 1, "\n".join(line[indent:] for line in lines[start + 1:end]) + "\n"))
        i = end + 1
    return blocks


def seed_default_corpus(cache_root: Path) -> None:
    """Put the built-in corpus into the test's MINILAB_CACHE: a copy of this machine's cache, or
    one fetch into the temporary cache (skipped with a reason when it cannot be fetched)."""
    target = cache_root / "default-corpus" / "janeaustenr"
    if (USER_CORPUS_CACHE / "provenance.json").is_file():
        shutil.copytree(USER_CORPUS_CACHE, target)
        return
    try:
        default_corpus.ensure_cached()  # MINILAB_CACHE is cache_root here (conftest)
    except MinilabError as e:
        pytest.skip(f"the built-in default corpus is not cached and cannot be fetched ({e}); run "
                    "`minilab corpus --source default --output-dir /tmp/c` once where apt-get works")


def test_generated_tables_are_current():
    stale = [str(p.relative_to(REPO)) for p in docs_tables.stale_files([REPO / "README.md", REPO / "docs"])]
    assert not stale, (f"generated config/flag tables are out of date in {', '.join(stale)}; "
                       f"regenerate them with `{FIX_TABLES}` from the repository root")


def test_every_page_exists_and_shows_a_runnable_example():
    for name in STAGE_PAGES:
        page = REPO / "docs" / "stages" / name
        assert page.is_file(), f"docs/stages/{name} is missing"
        assert runnable_blocks(page), f"docs/stages/{name} has no ```bash runnable example"
    for name in OTHER_PAGES:
        assert (REPO / "docs" / name).is_file(), f"docs/{name} is missing"


def test_table_regions_are_regenerated_from_the_code():
    text = ("Quoted: `<!-- config-table: x:Y -->` stays.\n"
            "<!-- config-table: minilab.finetune.sft:SFTConfig -->\nstale\n<!-- /config-table -->\n"
            "<!-- cli-flags: models rm -->\n<!-- /cli-flags -->\n")
    out = docs_tables.update_text(text)
    assert out.startswith("Quoted: `<!-- config-table: x:Y -->` stays.\n") and "stale" not in out
    assert "| `optim.lr` | `0.0002` | peak learning rate |" in out  # SFT's own default, not OptimConfig's
    assert "| `--yes, -y` |" in out and "| `NAME` | *required* | registry name |" in out
    assert docs_tables.update_text(out) == out
    with pytest.raises(ValueError, match="no dataclass Nope"):
        docs_tables.update_text("<!-- config-table: minilab.config:Nope -->\n<!-- /config-table -->\n")


def test_fence_parser(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```bash\nnot run\n```\n\n  ```bash runnable\n  echo a\n  echo b\n  ```\n"
                    "````text\n```bash runnable\n````\n", encoding="utf-8")
    assert runnable_blocks(page) == [(6, "echo a\necho b\n")]


def test_runnable_blocks_run_in_order(tmp_path):
    blocks = [(path, line, code) for path in doc_files() for line, code in runnable_blocks(path)]
    assert blocks, "no ```bash runnable blocks found"
    seed_default_corpus(Path(os.environ["MINILAB_CACHE"]))
    work, scripts = tmp_path / "work", tmp_path / "blocks"
    work.mkdir()
    scripts.mkdir()
    env = {**os.environ,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "MINILAB_MODELS_DIR": str(work / "models"), "HF_HOME": str(tmp_path / "hf"),
           "MINILAB_CACHE": os.environ["MINILAB_CACHE"], "HF_HUB_OFFLINE": "1",
           # One OpenMP thread per process: on a shared 2-core machine two spinning threads made a
           # 20-step pretraining 10x slower (190 s against 20 s, see docs/troubleshooting.md).
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    total = time.perf_counter()
    for n, (path, line, code) in enumerate(blocks):
        where = f"{path.relative_to(REPO)}:{line}"
        script = scripts / f"{n:02d}.sh"
        script.write_text(code, encoding="utf-8")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=work, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{where}: runnable block timed out after 600 s\n{code}\n--- output ---\n"
                        f"{(e.output or '')[-8000:]}", pytrace=False)
        print(f"{time.perf_counter() - t0:6.1f} s  {where}")
        if proc.returncode != 0:
            pytest.fail(f"{where}: runnable block failed with exit code {proc.returncode} (its line k is "
                        f"line {line}+k of the page)\n{code}--- output ---\n{proc.stdout[-8000:]}", pytrace=False)
    print(f"{time.perf_counter() - total:6.1f} s  all {len(blocks)} runnable blocks")
