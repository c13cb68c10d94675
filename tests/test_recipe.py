"""`minilab run RECIPE`: stage caching by fingerprint, downstream reruns, SIGKILL + rerun resumes,
one-line errors, the dry-run plan, and the shipped recipes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures import WORDS

from minilab.cli import main as cli_main
from minilab.recipe.spec import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "src" / "minilab" / "recipes"


def write_inputs(root: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    docs = root / "docs.jsonl"
    with docs.open("w") as f:
        for i in range(80):
            sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
                     for _ in range(rng.randint(4, 8))]
            f.write(json.dumps({"text": " ".join(sents) + f" Number {i}."}) + "\n")
    chats = root / "chats.jsonl"
    with chats.open("w") as f:
        for i in range(40):
            q = " ".join(rng.choice(WORDS) for _ in range(5))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"tell me about {q}"},
                                             {"role": "assistant", "content": f"the {q} {i}"}]}) + "\n")
    return docs, chats


def recipe_dict(root: Path, *, with_finetune: bool = True, max_steps: int = 12) -> dict:
    docs, chats = write_inputs(root)
    stages = {
        "corpus": {"sources": [{"path": str(docs)}], "quality": {"min_words": 5, "min_chars": 50}},
        "tokenizer": {"corpus_dir": "${corpus}", "vocab_size": 300, "model_max_length": 64},
        "pack": {"corpus_dir": "${corpus}", "tokenizer_dir": "${tokenizer}", "seq_len": 32, "val_fraction": 0.1,
                 "workers": 1},
        "pretrain": {"data_dirs": ["${pack}"], "tokenizer_dir": "${tokenizer}", "arch": "micro",
                     "model": {"n_layer": 2, "d_model": 64, "n_head": 2, "head_dim": 32, "intermediate_size": 128},
                     "batch_size": 4, "max_steps": max_steps, "eval_every": 6, "eval_batches": 2, "ckpt_every": 4,
                     "tensorboard": False},
    }
    if with_finetune:
        stages.update({
            "sft-data": {"sources": [str(chats)], "tokenizer_dir": "${pretrain}", "max_len": 48},
            "sft": {"base_model": "${pretrain}", "data_dirs": ["${sft-data}"], "batch_size": 4, "max_steps": 4,
                    "eval_every": 2, "ckpt_every": 2, "eval_batches": 1, "max_new_tokens": 4,
                    "eval_prompts": ["hello"]},
            "merge": {"model": "${sft}"},
            "export": {"model": "${merge}", "format": "gguf"},
        })
    return {"name": "t", "workdir": str(root / "work"), "models_dir": str(root / "models"), "stages": stages}


def write_recipe(root: Path, **kw) -> Path:
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(root, **kw), sort_keys=False))
    return path


def states(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / "work" / ".state").glob("*.json")}


def test_cached_rerun_and_a_changed_sft_setting_reruns_only_downstream(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert cli_main(["run", str(path)]) == 0
    first = states(tmp_path)
    assert set(first) == {"corpus", "tokenizer", "pack", "pretrain", "sft-data", "sft", "merge", "export"}
    assert all(s["status"] == "done" for s in first.values())
    assert (tmp_path / "work" / "export" / "model.gguf").stat().st_size > 0
    assert (tmp_path / "work" / "report.md").is_file() and (tmp_path / "work" / "report.html").is_file()
    assert (tmp_path / "work" / "report-plots" / "pretrain" / "loss.png").is_file()
    out = capsys.readouterr().out
    assert "== summary" in out and "minilab chat" in out

    # Nothing changed: nothing reruns.
    assert cli_main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    second = states(tmp_path)
    assert {k: v["run_id"] for k, v in second.items()} == {k: v["run_id"] for k, v in first.items()}
    assert "== [" not in out  # no stage header: nothing ran
    assert out.count(" cached ") >= 8

    # One SFT setting changed: SFT and what follows rerun, the rest stays cached.
    assert cli_main(["run", str(path), "--set", "stages.sft.max_steps=6"]) == 0
    third = states(tmp_path)
    changed = {k for k in third if third[k]["run_id"] != first[k]["run_id"]}
    assert changed == {"sft", "merge", "export"}
    # The rerun models got new versions; the replaced ones' names are gone, none was reused.
    names = set(json.loads((tmp_path / "models" / "registry.json").read_text())["models"])
    assert third["sft"]["registered"][0].endswith("-lora-v2") and first["sft"]["registered"][0] not in names
    assert names == {third[k]["registered"][0] for k in ("pretrain", "sft", "merge")}
    capsys.readouterr()

    # --force reruns a stage and its dependents; --until stops after a stage.
    assert cli_main(["run", str(path), "--force", "pack", "--until", "pretrain"]) == 0
    fourth = states(tmp_path)
    assert {k for k in fourth if fourth[k]["run_id"] != third[k]["run_id"]} == {"pack", "pretrain"}
    # sft now reads a rerun pretrain: the next plain run reruns it (and merge, export), not the data stages.
    capsys.readouterr()
    assert cli_main(["run", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    for stage in ("sft-data", "sft", "merge", "export"):
        assert any(line.split()[1:4:2] == [stage, "run"] for line in plan.splitlines() if line[:1].isdigit()), plan


def test_sigkill_mid_training_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
    cmd = [sys.executable, "-m", "minilab", "run"]
    p = subprocess.run(cmd + [str(write_recipe(straight, with_finetune=False, max_steps=16))],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    path = write_recipe(killed, with_finetune=False, max_steps=16)
    # A real SIGKILL of the whole `minilab run` process, right after the step-8 checkpoint.
    p = subprocess.run(cmd + [str(path), "--set", "stages.pretrain.interrupt_at_step=8"], capture_output=True,
                       text=True)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    st = states(killed)
    assert st["pretrain"]["status"] == "running" and st["pack"]["status"] == "done"
    p = subprocess.run(cmd + [str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pretrain (pretrain): resuming — was interrupted: resumes from step 8" in p.stdout
    for stage in ("corpus", "tokenizer", "pack"):
        assert any(line.startswith(stage) and " cached " in line for line in p.stdout.splitlines()), p.stdout
    a, b = states(straight)["pretrain"], states(killed)["pretrain"]
    assert b["status"] == "done" and a["result"]["val_loss"] == b["result"]["val_loss"]
    w = [(d / "work" / "pretrain" / "final" / "model.safetensors").read_bytes() for d in (straight, killed)]
    assert w[0] == w[1]  # bitwise the same final weights


def test_recipe_errors_are_one_line_and_name_the_key(tmp_path, capsys):
    base = recipe_dict(tmp_path, with_finetune=False)
    cases = [
        (lambda r: r["stages"]["pretrain"].update(max_stepz=3), "stages.pretrain.max_stepz", "did you mean"),
        (lambda r: r["stages"]["pack"].update(corpus_dir="${pretrain}"), "stages.pack", "comes later"),
        (lambda r: r["stages"].update(extra={"stage": "finetune"}), "stages.extra.stage", "unknown stage kind"),
        (lambda r: r["stages"]["pack"].update(output_dir="x"), "stages.pack.output_dir", "set by the recipe"),
        (lambda r: r.update(stagez={}), "stagez", "unknown key"),
    ]
    for i, (mutate, key, words) in enumerate(cases):
        r = json.loads(json.dumps(base))
        mutate(r)
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(r, sort_keys=False))
        assert cli_main(["run", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and key in err and words in err, err
    assert not (tmp_path / "work").exists()  # nothing ran, nothing written
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base, sort_keys=False))
    assert cli_main(["run", str(good), "--force", "nosuch"]) == 1
    assert "no such stage" in capsys.readouterr().err


def test_dry_run_prints_plan_and_estimate_and_writes_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert cli_main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "new" in out and "verdict: fits" in out and "peak memory" in out
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("name", ["demo", "tiny-23M", "qlora-hub-model"])
def test_shipped_recipes_load_and_plan(name, tmp_path, capsys):
    recipe = load_recipe(RECIPES / f"{name}.yaml", workdir=str(tmp_path / "w"))
    assert recipe.stages
    assert cli_main(["run", name, "--workdir", str(tmp_path / "w"), "--dry-run"]) == 0
    assert "verdict:" in capsys.readouterr().out


def test_a_fresh_stage_run_removes_only_dead_writers_leftovers(tmp_path):
    """The runner removed every `.STAGE.*.tmp` beside a stage, a live writer's temporary included."""
    import os
    from types import SimpleNamespace

    from fixtures import dead_pid

    from minilab.recipe.runner import Runner

    stages = tmp_path / "stages"
    (stages / "corpus").mkdir(parents=True)
    (stages / "corpus" / "old.txt").write_text("previous output")
    dead = stages / f".corpus.{dead_pid()}-ab12.tmp"
    live = stages / f".corpus.{os.getpid()}-cd34.tmp"
    other = stages / f".tokenizer.{dead_pid()}-ef56.tmp"
    for p in (dead, live, other):
        p.mkdir()
    fake = SimpleNamespace(recipe=SimpleNamespace(stage_dir=lambda name: stages / name))
    Runner._wipe(fake, SimpleNamespace(name="corpus"))
    assert not (stages / "corpus").exists() and not dead.exists()
    assert live.is_dir() and other.is_dir()
