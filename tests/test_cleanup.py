"""cleanup / du / cache: dry runs delete nothing, real runs free exactly what they announced,
protected checkpoints survive, and the HF cache is handled through huggingface_hub's API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures import dead_pid

from minilab import cli
from minilab.cleanup.runs import apply, plan_cleanup
from minilab.fsutil import atomic_dir, atomic_path, dir_size, leftover_pid, stale_leftovers, write_json_atomic
from minilab.owned import write_run_marker


def make_ckpt(run: Path, step: int, metric: float, complete: bool = True) -> Path:
    d = run / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * 1000)
    (d / "optimizer.pt").write_bytes(b"o" * 2000)
    (d / "meta.json").write_text(json.dumps({"step": step, "metric": metric}))
    if complete:
        (d / "COMPLETE").write_text(f"{step}\n")
    return d


def make_run(root: Path) -> Path:
    run = root / "run1"
    for step, metric in ((100, 3.0), (200, 1.0), (300, 2.5), (400, 2.4), (500, 2.3)):
        make_ckpt(run, step, metric)
    make_ckpt(run, 600, 2.2, complete=False)                        # interrupted: no COMPLETE
    leftover = run / "checkpoints" / f".step-000700.{dead_pid()}-ab12cd.tmp"  # a save killed by SIGKILL
    leftover.mkdir()
    (leftover / "x").write_bytes(b"t" * 500)
    (run / "metrics.jsonl").write_text("{}\n")
    return run


def register_pointing_at(tmp_path: Path, target: Path) -> None:
    """A registry model whose manifest points at `target` (e.g. the checkpoint it was exported from)."""
    from minilab.registry import register

    model = tmp_path / "exported"
    model.mkdir()
    (model / "config.json").write_text("{}")
    register(model, "llama-1K-test-pretrain-v1", params=1000, source_checkpoint=str(target))


def test_dry_run_deletes_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "runs")
    before = dir_size(tmp_path)
    assert cli.main(["cleanup", str(tmp_path / "runs"), "--keep-last", "1", "--strip-optimizer"]) == 0
    out = capsys.readouterr().out
    assert "would free" in out and "--yes" in out
    assert dir_size(tmp_path) == before and (run / "checkpoints" / "step-000100").exists()


def test_real_run_frees_exactly_the_announced_bytes_and_keeps_protected(tmp_path, capsys):
    run = make_run(tmp_path / "runs")
    register_pointing_at(tmp_path, run / "checkpoints" / "step-000100")
    before = dir_size(tmp_path / "runs")
    assert cli.main(["cleanup", str(run), "--keep-last", "1", "--json"]) == 0
    announced = json.loads(capsys.readouterr().out)["bytes"]
    assert cli.main(["cleanup", str(run), "--keep-last", "1", "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == announced
    assert before - dir_size(tmp_path / "runs") == announced > 0
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    # 100: registry-referenced; 200: best metric; 500: newest complete. 300, 400, 600, .tmp gone.
    assert left == ["step-000100", "step-000200", "step-000500"]


def test_strip_optimizer_spares_the_resumable_newest(tmp_path):
    run = make_run(tmp_path / "runs")
    actions = plan_cleanup(run, keep_last=2, strip_optimizer=True, min_age_hours=0)
    stripped = {Path(a.path).parent.name for a in actions if a.kind == "strip"}
    assert stripped == {"step-000200", "step-000400"}
    freed = apply(actions)
    assert freed == sum(a.bytes for a in actions)
    assert (run / "checkpoints" / "step-000500" / "optimizer.pt").exists()
    assert not (run / "checkpoints" / "step-000400" / "optimizer.pt").exists()


def test_failed_runs_are_deleted_only_when_old(tmp_path):
    failed = tmp_path / "runs" / "crashed"
    failed.mkdir(parents=True)
    write_run_marker(failed, "pretrain")
    (failed / "metrics.jsonl").write_text("{}\n")
    assert plan_cleanup(tmp_path / "runs", min_age_hours=1) == []          # may still be running
    actions = plan_cleanup(tmp_path / "runs", min_age_hours=0)
    assert [Path(a.path).name for a in actions] == ["crashed"]
    apply(actions)
    assert not failed.exists()


def test_du_lists_categories_largest_first(tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "runs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_bytes(b"d" * 10)
    assert cli.main(["du", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["category"] for r in rows][:2] == ["runs", "data"]


# ---- the HF cache ------------------------------------------------------------------------------
def fake_repo(hub: Path, repo: str, commit: str, content: bytes, ref: str | None = "main") -> None:
    """The standard layout: models--org--name/{blobs,snapshots/<commit>,refs}."""
    base = hub / f"models--{repo.replace('/', '--')}"
    blob = base / "blobs" / f"{commit[:8]}blob"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snap), snap / "model.safetensors")
    (base / "refs").mkdir(exist_ok=True)
    if ref:
        (base / "refs" / ref).write_text(commit)


def test_cache_ls_rm_prune(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    fake_repo(hub, "org/big", "a" * 40, b"x" * 5000)
    fake_repo(hub, "org/big", "b" * 40, b"y" * 3000, ref=None)        # detached: superseded download
    fake_repo(hub, "org/small", "c" * 40, b"z" * 100)
    assert cli.main(["cache", "ls", "--json"]) == 0
    repos = json.loads(capsys.readouterr().out)["repos"]
    assert [r["repo_id"] for r in repos] == ["org/big", "org/small"]

    assert cli.main(["cache", "prune", "--json"]) == 0                 # dry run
    plan = json.loads(capsys.readouterr().out)
    assert plan["revisions"] == ["b" * 40] and plan["bytes"] == 3000 and not plan["applied"]
    assert (hub / "models--org--big" / "snapshots" / ("b" * 40)).exists()
    assert cli.main(["cache", "prune", "--yes", "--json"]) == 0
    capsys.readouterr()
    assert not (hub / "models--org--big" / "snapshots" / ("b" * 40)).exists()

    assert cli.main(["cache", "rm", "org/small", "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == 100
    assert not (hub / "models--org--small").exists()
    assert cli.main(["cache", "rm", "org/nope"]) == 1                   # one-line error
    assert "not in the cache" in capsys.readouterr().err


def test_du_reports_the_cache_where_the_default_corpus_is_cached(tmp_path, monkeypatch, capsys):
    """Without $MINILAB_CACHE the corpus is cached under ~/.cache/minilab; du looked in ROOT/.cache."""
    from minilab.data import default_corpus

    monkeypatch.delenv("MINILAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    novels = default_corpus.cache_dir()
    novels.mkdir(parents=True)
    (novels / "emma.txt").write_bytes(b"e" * 1234)
    (tmp_path / "project").mkdir()
    assert cli.main(["du", str(tmp_path / "project"), "--json"]) == 0
    rows = {r["category"]: r for r in json.loads(capsys.readouterr().out)}
    cache = rows["minilab cache"]
    assert cache["path"] == str(tmp_path / "home" / ".cache" / "minilab")
    assert novels.is_relative_to(cache["path"]) and cache["bytes"] == 1234
    assert cache["largest"] == [{"name": "default-corpus", "bytes": 1234}]
    monkeypatch.setenv("MINILAB_CACHE", str(tmp_path / "elsewhere"))  # the variable moves both alike
    assert default_corpus.cache_dir().is_relative_to(tmp_path / "elsewhere")
    assert cli.main(["du", str(tmp_path / "project"), "--json"]) == 0
    assert "minilab cache" not in {r["category"] for r in json.loads(capsys.readouterr().out)}  # nothing there yet


_LIGHT_VERBS = r"""
import json, sys
from pathlib import Path

from minilab import cli, registry

root = Path(sys.argv[1])
model = root / "exported"
model.mkdir()
(model / "config.json").write_text("{}")
registry.register(model, "llama-1K-test-pretrain-v1", params=1000)
for step in (1, 2, 3):
    ckpt = root / "runs" / "r" / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"o" * 10)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "metric": 1.0 / step}))
    (ckpt / "COMPLETE").write_text(f"{step}\n")
(root / "hf" / "hub").mkdir(parents=True)
for argv in (["models", "list"], ["models", "show", "llama-1K-test-pretrain-v1"], ["du", str(root)],
             ["cleanup", str(root / "runs"), "--keep-last", "1", "--strip-optimizer", "--yes"], ["cache", "ls"],
             ["cache", "prune"]):
    assert cli.main(argv) == 0, argv
assert len(list((root / "runs" / "r" / "checkpoints").iterdir())) == 1  # the verbs did their work
print("HEAVY", json.dumps(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)))
"""


def test_disk_and_registry_verbs_never_import_torch(tmp_path):
    """models list/show, du, cleanup and cache start in well under a second: they import neither torch
    nor transformers, at import or at run time (was ~2-3 s of `import torch` through registry -> model,
    cleanup -> checkpoint and du/cache -> planner)."""
    import subprocess
    import sys

    env = {**os.environ, "MINILAB_MODELS_DIR": str(tmp_path / "registry"), "MINILAB_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _LIGHT_VERBS, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy = json.loads(proc.stdout.rsplit("HEAVY ", 1)[1])
    assert "torch" not in heavy and "transformers" not in heavy, heavy


def test_cache_rm_revision_is_exact_or_a_unique_long_prefix(tmp_path, monkeypatch, capsys):
    """`cache rm org/a --revision a --yes` deleted every revision starting with 'a'; '' selected all."""
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    a1, a2, b = "a1234567" + "0" * 32, "a1234568" + "1" * 32, "b" * 40
    fake_repo(hub, "org/a", a1, b"x" * 10)
    fake_repo(hub, "org/a", a2, b"y" * 10, ref=None)
    fake_repo(hub, "org/a", b, b"z" * 10, ref=None)
    fake_repo(hub, "org/ab", "a" * 40, b"w" * 10)
    snaps = hub / "models--org--a" / "snapshots"
    for rev, why in (("a", "at least 7"), ("", "at least 7"), ("zzzzzzzz", "at least 7"),
                     ("a123456", f"ambiguous, it starts 2 revisions ({a1}, {a2})"), ("c000000", "no cached revision")):
        assert cli.main(["cache", "rm", "org/a", "--revision", rev, "--yes"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert sorted(p.name for p in snaps.iterdir()) == sorted([a1, a2, b])
    assert cli.main(["cache", "rm", "org/", "--yes"]) == 1 and "not in the cache" in capsys.readouterr().err
    assert cli.main(["cache", "rm", "org/a", "--revision", "a1234568", "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revisions"] == [a2]
    assert cli.main(["cache", "rm", "org/a", "--revision", b, "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revisions"] == [b]
    assert sorted(p.name for p in snaps.iterdir()) == [a1] and (hub / "models--org--ab").is_dir()


# ---- only what minilab wrote (issue 13, finding 1) ---------------------------------------------------
def _age(root: Path, hours: float = 5) -> None:
    """Make every file and folder under `root` look untouched for `hours`."""
    t = os.path.getmtime(root) - hours * 3600
    for p in [root, *root.rglob("*")]:
        os.utime(p, (t, t), follow_symlinks=False)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _project(root: Path) -> Path:
    """A user's project that happens to have checkpoints/ (Lightning names) and no minilab marker."""
    proj = root / "myproject"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "train.py").write_text("print('hi')\n")
    (proj / "paper").mkdir()
    (proj / "paper" / "main.tex").write_text("\\documentclass{article}\n")
    (proj / "checkpoints").mkdir()
    (proj / "checkpoints" / "epoch=3-step=1500.ckpt").write_bytes(b"c" * 100)
    return proj


def _hf_trainer_run(root: Path) -> Path:
    run = root / "hf-run"
    (run / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-500" / "pytorch_model.bin").write_bytes(b"w" * 100)
    (run / "checkpoints" / "checkpoint-500" / "trainer_state.json").write_text("{}")
    return run


def _logs(root: Path) -> Path:
    proj = root / "proj"
    (proj / "logs").mkdir(parents=True)
    (proj / "logs" / "metrics.jsonl").write_text('{"loss": 1}\n')
    (proj / "notes.md").write_text("mine\n")
    return proj


@pytest.mark.parametrize("make", [_project, _hf_trainer_run, _logs])
def test_foreign_folders_are_refused_and_untouched(tmp_path, capsys, make):
    """Was: `cleanup myproject --yes` removed a whole project (src/, paper/main.tex and a Lightning
    checkpoint), a Hugging Face Trainer run, and planned deleting proj/logs for its metrics.jsonl."""
    folder = make(tmp_path)
    _age(tmp_path)
    before = _tree(tmp_path)
    for path in (folder, *(p for p in folder.rglob("*") if p.is_dir())):
        assert cli.main(["cleanup", str(path), "--yes"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: holds nothing minilab wrote" in err
    assert _tree(tmp_path) == before


def test_foreign_folders_beside_runs_are_passed_over(tmp_path, capsys):
    """A root holding a minilab run and the three foreign folders: only the run's old checkpoint goes."""
    runs = tmp_path / "runs"
    run = runs / "mine"
    for step, metric in ((1, 3.0), (2, 1.0), (3, 2.0)):  # 2: the best, 3: the newest
        make_ckpt(run, step, metric)
    (run / "checkpoints" / "notes.txt").write_text("a file the user put there\n")
    (run / "checkpoints" / "checkpoint-9").mkdir()          # another tool's checkpoint inside a minilab run
    for make in (_project, _hf_trainer_run, _logs):
        make(runs)
    _age(tmp_path)
    before = _tree(tmp_path)
    assert cli.main(["cleanup", str(runs), "--keep-last", "1", "--yes", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["actions"]
    assert [a["path"] for a in plan] == [str(run / "checkpoints" / "step-000001")]
    assert before - _tree(tmp_path) == {"runs/mine/checkpoints/step-000001",
                                        *(f"runs/mine/checkpoints/step-000001/{n}" for n in
                                          ("model.safetensors", "optimizer.pt", "meta.json", "COMPLETE"))}


def test_failed_run_with_user_files_is_not_deleted_whole(tmp_path):
    """run.json alone is not a licence to delete a folder: a run started in the user's folder
    (next to their files) is not removed whole when it fails."""
    run = tmp_path / "runs" / "inproject"
    run.mkdir(parents=True)
    write_run_marker(run, "pretrain")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "thesis.tex").write_text("mine\n")
    _age(tmp_path)
    assert plan_cleanup(tmp_path / "runs", min_age_hours=1) == []
    (run / "thesis.tex").unlink()
    _age(tmp_path)
    assert [Path(a.path) for a in plan_cleanup(tmp_path / "runs", min_age_hours=1)] == [run]


def test_the_dry_run_plan_is_exactly_what_the_real_run_removes(tmp_path, capsys):
    """Everything the dry run lists goes, and nothing else: the tree before minus the tree after is
    the planned paths and what lies under them."""
    runs = tmp_path / "runs"
    make_run(runs)                                            # prunable, incomplete and leftover checkpoints
    failed = runs / "crashed"
    (failed / "checkpoints").mkdir(parents=True)
    write_run_marker(failed, "sft")
    (failed / "metrics.jsonl").write_text("{}\n")
    model = runs / "crashed-too" / "final"                    # a model with a leftover of a killed write
    model.mkdir(parents=True)
    (model / "manifest.json").write_text(json.dumps({"training_type": "sft", "files": {}, "fingerprint": "x"}))
    (model / f".manifest.json.{dead_pid()}-q1w2e3.tmp").write_text("{")
    _project(runs)
    _hf_trainer_run(runs)
    _age(tmp_path)
    before = _tree(tmp_path)
    assert cli.main(["cleanup", str(runs), "--keep-last", "1", "--strip-optimizer", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not plan["applied"] and _tree(tmp_path) == before
    planned = {str(Path(a["path"]).relative_to(tmp_path)) for a in plan["actions"]}
    assert {"runs/crashed", "runs/run1/checkpoints/step-000600"} <= planned
    assert any(p.endswith("-q1w2e3.tmp") for p in planned) and any(p.endswith("optimizer.pt") for p in planned)
    assert cli.main(["cleanup", str(runs), "--keep-last", "1", "--strip-optimizer", "--yes", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["applied"] and done["actions"] == plan["actions"] and done["bytes"] == plan["bytes"]
    removed = before - _tree(tmp_path)
    assert {p for p in removed if not any(p.startswith(q + "/") for q in planned)} == planned
    assert not any(p.startswith(("runs/myproject", "runs/hf-run")) for p in removed)


# ---- leftovers of killed writes (issue 13, finding 11) ------------------------------------------------
def test_temp_names_carry_the_writers_pid(tmp_path):
    seen = []
    with atomic_dir(tmp_path / "out") as tmp:
        seen.append(tmp.name)
    with atomic_path(tmp_path / "f.json") as tmp:
        seen.append(tmp.name)
    assert [leftover_pid(n) for n in seen] == [os.getpid()] * 2
    assert seen[0].startswith(f".out.{os.getpid()}-") and seen[1].startswith(f".f.json.{os.getpid()}-")


@pytest.fixture
def live_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _leftover(parent: Path, output: str, pid: int, size: int = 300) -> Path:
    """What a SIGKILLed atomic_dir of `parent/output` leaves: `.output.PID-xxxx.tmp/`."""
    d = parent / f".{output}.{pid}-k9x8.tmp"
    d.mkdir(parents=True)
    (d / "shard-00000.jsonl").write_bytes(b"s" * size)
    return d


def test_the_next_write_of_an_output_removes_dead_writers_leftovers(tmp_path, live_pid):
    """Was: a SIGKILLed stage left `.corpus.XXXX.tmp` forever; re-runs ignored it."""
    dead, alive = _leftover(tmp_path, "corpus", dead_pid()), _leftover(tmp_path, "corpus", live_pid)
    other = _leftover(tmp_path, "packed", dead_pid())                 # another output's: not this write's business
    old = tmp_path / f".corpus.old-{dead_pid()}"        # killed between its two renames: the last copy of corpus
    old.mkdir()
    assert stale_leftovers(tmp_path) == sorted([dead, other])       # not `old` while corpus/ is missing
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "corpus") as tmp:
        raise RuntimeError("this write fails too")
    assert old.exists() and not dead.exists()
    with atomic_dir(tmp_path / "corpus") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not dead.exists() and not old.exists()
    assert alive.exists() and other.exists() and (tmp_path / "corpus" / "manifest.json").is_file()
    report = _leftover(tmp_path, "report.json", dead_pid())
    write_json_atomic(tmp_path / "report.json", {})                   # atomic_path: the same rule
    assert not report.exists() and alive.exists()


def test_du_and_cleanup_report_and_remove_dead_writers_leftovers(tmp_path, live_pid, capsys):
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    dead = _leftover(tmp_path / "data", "corpus", dead_pid(), size=700)
    alive = _leftover(tmp_path / "data", "packed", live_pid, size=900)
    assert cli.main(["du", str(tmp_path), "--json"]) == 0
    rows = {r["category"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["leftover temp"]["bytes"] == 700
    assert rows["leftover temp"]["largest"] == [{"name": str(dead), "bytes": 700}]
    assert cli.main(["du", str(tmp_path)]) == 0
    assert "leftover temp" in capsys.readouterr().out
    assert cli.main(["cleanup", str(tmp_path / "data"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [a["path"] for a in plan["actions"]] == [str(dead)] and plan["bytes"] == 700
    assert cli.main(["cleanup", str(tmp_path / "data"), "--yes"]) == 0
    assert not dead.exists() and alive.exists()
    capsys.readouterr()
    assert cli.main(["du", str(tmp_path), "--json"]) == 0
    assert "leftover temp" not in {r["category"] for r in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize("argv, message", [
    (["cleanup", "runs", "--keep-last", "0"], "argument --keep-last/--keep_last: must be ≥ 1, got 0"),
    (["cleanup", "runs", "--keep_last", "-3"], "argument --keep-last/--keep_last: must be ≥ 1, got -3"),
    (["cleanup", "runs", "--min-age-hours", "-1"], "argument --min-age-hours/--min_age_hours: must be ≥ 0, got -1.0"),
    (["cleanup", "runs", "--min-age-hours", "nan"], "must be ≥ 0, got nan"),
    (["cache", "prune", "--unused-days", "-2"], "argument --unused-days/--unused_days: must be ≥ 0, got -2.0"),
    (["cache", "prune", "--unused-days", "soon"], "must be a number ≥ 0, got 'soon'"),
])
def test_negative_ages_and_counts_are_refused_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    """Was: --keep-last 0 reached cleanup, negative --min-age-hours made every failed run 'old',
    negative --unused-days made every cached repository 'unused'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.strip().splitlines()[-1].startswith("minilab")
