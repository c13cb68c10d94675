"""Pretraining through the real CLI: exact resume after SIGKILL, torchrun with 2 gloo processes
(DDP, and FSDP with its resume), the final model in the registry, and the refusals (tokenizer
mismatch, occupied output dir)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import make_packed
from safetensors import safe_open
from safetensors.torch import load_file

from minilab.cli import main as cli_main

ARCH = ["--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=2",
        "--set", "model.head_dim=32", "--set", "model.intermediate_size=128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("pretrain-data"))


def pretrain_cmd(data, out, steps, *extra):
    return [sys.executable, "-m", "minilab", "pretrain", "--data_dirs", str(data["packed"]),
            "--tokenizer_dir", str(data["tokenizer"]), "--output_dir", str(out), "--max_steps", str(steps),
            "--arch", "micro", *ARCH, "--set", "batch_size=4", "--set", "eval_every=10", "--set", "eval_batches=2",
            "--set", "register=false", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sigkill_and_resume_is_bitwise_exact(data, tmp_path):
    steps = 40
    extra = ["--set", "ckpt_every=5", "--set", "keep_last=2"]
    ref = tmp_path / "ref"
    subprocess.run(pretrain_cmd(data, ref, steps, *extra), check=True, env=env(), capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(data, run, steps, *extra), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000010" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "final").exists()

    resumed = subprocess.run(pretrain_cmd(data, run, steps, *extra, "--resume", "auto"), env=env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    ref_losses, run_losses = train_losses(ref), train_losses(run)
    assert sorted(run_losses) == list(range(1, steps + 1))  # every step logged once
    assert run_losses == ref_losses  # bitwise: float equality of every step's loss
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_checkpoint_metrics_are_their_own(ref, eval_every=10)


def assert_checkpoint_metrics_are_their_own(run_dir: Path, eval_every: int) -> None:
    """Each checkpoint's val loss is the eval of its own step (None between evals), so the best
    checkpoint kept by retention is the best evaluated one, not a neighbour of it."""
    from minilab.checkpoint import list_checkpoints, read_meta

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == list(range(0, max(evals) + 1, eval_every))  # baseline at 0, then every eval_every
    kept = {int(p.name.split("-")[1]): read_meta(p)["metric"] for p in list_checkpoints(run_dir / "checkpoints")}
    assert all(metric == evals.get(step) for step, metric in kept.items()), (kept, evals)
    ckpt_evals = {s: v for s, v in evals.items() if s > 0}  # every eval step here also saved a checkpoint
    best_step = min(ckpt_evals, key=ckpt_evals.get)
    assert best_step in kept


def test_two_gloo_processes_match_one(data, tmp_path):
    steps = 6
    one = tmp_path / "one"
    subprocess.run(pretrain_cmd(data, one, steps, "--set", "batch_size=4"), check=True, env=env(),
                   capture_output=True)
    two = tmp_path / "two"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = pretrain_cmd(data, two, steps, "--set", "batch_size=2")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", *cmd[2:]], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final model: ") == 1 and "final model: None" not in proc.stdout  # rank 0 only
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l2) == list(range(1, steps + 1))
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-4, (step, l1[step], l2[step])
    a, b = final_weights(one), final_weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4



@pytest.mark.parametrize("rank_result, printed", [
    ({"final_dir": "/runs/a/final", "name": "llama-1M-x-pretrain-v1"},
     "final model: /runs/a/final\nregistry name: llama-1M-x-pretrain-v1\n"),
    ({"final_dir": None, "name": None}, ""),  # what a rank other than 0 gets back under torchrun
])
def test_only_the_rank_with_the_model_prints_the_summary(monkeypatch, capsys, rank_result, printed):
    """Was: rank 1 printed 'final model: None' after rank 0's summary."""
    monkeypatch.setattr("minilab.pretrain.run", lambda cfg, resume=None, dry_run=False: rank_result)
    assert cli_main(["pretrain", "--data_dirs", "d", "--tokenizer_dir", "t", "--output_dir", "o",
                     "--max_steps", "1"]) == 0
    assert capsys.readouterr().out == printed


# ---- FSDP (parallel: fsdp): the same run sharded over 2 gloo processes -----------------------------
FSDP_STEPS = 6
FSDP_RUN = ["--set", "ckpt_every=3", "--set", "keep_last=5"]
# 2 ranks x 1 sequence x 2 micro-batches: the same global batch as one process with batch_size=4,
# and accumulation exercises FSDP's skipped reduce-scatter (set_requires_gradient_sync).
FSDP_RANKS = ["--set", "parallel=fsdp", "--set", "batch_size=1", "--set", "grad_accum=2"]


def torchrun(cmd, **kw):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run([exe, "--standalone", "--nproc_per_node=2", "-m", *cmd[2:]], env=env(),
                          capture_output=True, text=True, timeout=300, **kw)


def train_norms(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """An uninterrupted 2-process FSDP run, shared by the tests below."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = torchrun(pretrain_cmd(data, out, FSDP_STEPS, *FSDP_RUN, *FSDP_RANKS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one(data, fsdp_run, tmp_path):
    from minilab.checkpoint import load_checkpoint, read_model_weights
    from minilab.config import from_dict
    from minilab.model import ModelConfig, build_model
    from minilab.training import OptimConfig, make_optimizer

    one = tmp_path / "one"
    assert cli_main(pretrain_cmd(data, one, FSDP_STEPS, *FSDP_RUN, "--set", "batch_size=4")[3:]) == 0
    l1, l2 = train_losses(one), train_losses(fsdp_run)
    assert sorted(l2) == list(range(1, FSDP_STEPS + 1))
    assert max(abs(l1[s] - l2[s]) for s in l1) <= 1e-4, (l1, l2)
    # Clipping acts (norm > grad_clip 1.0) on the global norm of the sharded gradients.
    n1, n2 = train_norms(one), train_norms(fsdp_run)
    assert min(n1.values()) > 1.0 and max(abs(n1[s] - n2[s]) / n1[s] for s in n1) <= 1e-4, (n1, n2)
    # final/: the full weights, as one process writes them.
    a, b = final_weights(one), final_weights(fsdp_run)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4

    # A checkpoint saved under FSDP is the one-process format: full weights (tied head stored
    # once), optimizer.state_dict() numbered by parameter; it loads into a plain model + AdamW.
    c1, c2 = one / "checkpoints" / "step-000003", fsdp_run / "checkpoints" / "step-000003"
    w1, w2 = read_model_weights(c1 / "model.safetensors"), read_model_weights(c2 / "model.safetensors")
    assert load_file(str(c2 / "model.safetensors")).keys() == load_file(str(c1 / "model.safetensors")).keys()
    model = build_model(from_dict(ModelConfig, json.loads((c2 / "meta.json").read_text())["model_config"]))
    optimizer = make_optimizer(model, OptimConfig(), torch.device("cpu"))
    load_checkpoint(c2, model=model, optimizer=optimizer, restore_rng=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert max((model.state_dict()[k] - w1[k]).abs().max().item() for k in w1) <= 1e-4
    assert all(torch.equal(model.state_dict()[k], w2[k]) for k in w2)
    o1, o2 = torch.load(c1 / "optimizer.pt", weights_only=True), optimizer.state_dict()
    assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
    assert max((o1["state"][i][k] - o2["state"][i][k]).abs().max().item()
               for i in o1["state"] for k in o1["state"][i]) <= 1e-4


@pytest.mark.slow
def test_fsdp_sigkill_and_resume_is_bitwise_exact(data, fsdp_run, tmp_path):
    run = tmp_path / "killed"
    killed = torchrun(pretrain_cmd(data, run, FSDP_STEPS, *FSDP_RUN, *FSDP_RANKS, "--set", "interrupt_at_step=3"))
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert (run / "checkpoints" / "step-000003" / "COMPLETE").is_file() and not (run / "final").exists()
    resumed = torchrun(pretrain_cmd(data, run, FSDP_STEPS, *FSDP_RUN, *FSDP_RANKS, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref_losses, run_losses = train_losses(fsdp_run), train_losses(run)
    assert sorted(run_losses) == list(range(1, FSDP_STEPS + 1))
    assert run_losses == ref_losses  # bitwise
    a, b = final_weights(fsdp_run), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



def test_fsdp_config_refusals(data, tmp_path, capsys):
    base = pretrain_cmd(data, tmp_path / "run", 2)[3:]
    assert cli_main(base + ["--set", "parallel=fsdp", "--set", "precision=fp16"]) == 2
    assert "fp16 grad scaling is not supported with fsdp" in capsys.readouterr().err
    assert cli_main(base + ["--set", "parallel=zero"]) == 2
    assert "key 'parallel': must be one of 'ddp', 'fsdp'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_final_model_is_registered_with_lineage(data, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    out = tmp_path / "run"
    rc = cli_main(pretrain_cmd(data, out, 3)[3:-2] + ["--set", "register=true", "--set", f"models_dir={models}"])
    assert rc == 0
    printed = capsys.readouterr().out
    name = printed.split("registry name: ")[1].split()[0]
    assert name.startswith("llama-") and name.endswith("-pretrain-v1")
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    packed = json.loads((data["packed"] / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == packed["tokenizer_sha256"]
    assert manifest["data"][0]["manifest_sha256"]
    assert (out / "final" / "tokenizer.json").is_file()
    assert cli_main(["models", "list", "--models-dir", str(models), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == [name]

    # Extending the finished run: final/ gets new weights and a new version; the old name, whose
    # weights are gone, is dropped instead of left pointing at the changed files.
    rc = cli_main(pretrain_cmd(data, out, 5)[3:-2] + ["--set", "register=true", "--set", f"models_dir={models}",
                                                     "--resume", "auto"])
    assert rc == 0
    name2 = capsys.readouterr().out.split("registry name: ")[1].split()[0]
    assert name2.endswith("-pretrain-v2")
    assert cli_main(["models", "list", "--models-dir", str(models), "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == [name2]


def test_qk_norm_model_trains_with_muon_registers_as_qwen3_and_transformers_agrees(data, tmp_path, capsys):
    from minilab.export.gguf import export_model, transformers_parity

    models, out = tmp_path / "models", tmp_path / "run"
    rc = cli_main(pretrain_cmd(data, out, 3)[3:-2] + ["--set", "model.qk_norm=true", "--set", "optim.optimizer=muon",
                                                     "--set", "register=true", "--set", f"models_dir={models}"])
    assert rc == 0
    name = capsys.readouterr().out.split("registry name: ")[1].split()[0]
    assert name.startswith("qwen3-") and name.endswith("-pretrain-v1")
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    with safe_open(out / "final" / "model.safetensors", "pt") as f:  # the norms trained (AdamW), off their init
        assert not torch.equal(f.get_tensor("model.layers.0.self_attn.q_norm.weight"), torch.ones(config["head_dim"]))
    assert transformers_parity(out / "final") <= 1e-4  # Qwen3ForCausalLM computes our logits
    path, _ = export_model(str(out / "final"), "gguf", tmp_path / "m.gguf")
    from gguf import GGUFReader

    assert GGUFReader(str(path)).get_field("general.architecture").contents() == "qwen3"


def test_refuses_occupied_output_and_tokenizer_mismatch(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = pretrain_cmd(data, out, 2)[3:]
    assert cli_main(base) == 0
    capsys.readouterr()
    assert cli_main(base) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--resume auto" in err
    other = make_packed(tmp_path / "other", vocab_size=280)
    mixed = pretrain_cmd(data, tmp_path / "run2", 2)[3:]
    mixed[mixed.index("--tokenizer_dir") + 1] = str(other["tokenizer"])
    assert cli_main(mixed) == 3
    err = capsys.readouterr().err.strip()
    assert "Tokenizer mismatch between datasets: " in err and not (tmp_path / "run2").exists()


def test_dry_run_prints_plan_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(pretrain_cmd(data, out, 2)[3:] + ["--dry-run"]) == 0
    assert "peak memory" in capsys.readouterr().out
    assert not out.exists()


def test_verify_resume_verb_reports_exact_resume(data, tmp_path, capsys):
    args = pretrain_cmd(data, tmp_path / "unused", 1)[4:]
    rc = cli_main(["verify-resume", *args, "--steps", "8", "--work-dir", str(tmp_path / "verify")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "exact resume: YES (bitwise, 8 steps compared)" in out
    assert (tmp_path / "verify" / "interrupted" / "checkpoints" / "step-000004").is_dir()
    for extra in (["--resume", "auto"], ["--dry-run"]):  # pretrain flags it would only ignore
        rc = cli_main(["verify-resume", *args, *extra, "--work-dir", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert rc != 0 and f"does not take {extra[0]}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()


def test_tensorboard_events_written(data, tmp_path):
    out = tmp_path / "run"
    assert cli_main(pretrain_cmd(data, out, 2)[3:] + ["--set", "tensorboard=true"]) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "eval/val_loss", "train/mfu"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def _damaged_copy(data, tmp_path, damage) -> dict:
    """A copy of the packed data (tokenizer shared) with `damage(packed_dir)` applied."""
    packed = tmp_path / "packed"
    shutil.copytree(data["packed"], packed)
    damage(packed)
    return {**data, "packed": packed}


def _flip_byte(path: Path, at: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,extra,expect", [
    (lambda p: (p / "train.bin").write_bytes((p / "train.bin").read_bytes()[:20000]), [],
     "train.bin: 20,000 bytes, but manifest.json records"),
    (lambda p: (p / "train.bin").write_bytes(b""), [], "train.bin: 0 bytes, but manifest.json records"),
    (lambda p: (p / "val.bin").unlink(), [], "val.bin: missing (manifest.json lists it)"),
    (lambda p: (p / "train.idx").unlink(), [], "train.idx: missing (manifest.json lists it)"),
    (lambda p: _flip_byte(p / "train.bin"), ["--verify"], "train.bin: SHA-256 differs from manifest.json"),
], ids=["truncated-train-bin", "empty-train-bin", "missing-val-bin", "missing-train-idx", "flipped-byte-verify"])
def test_damaged_packed_data_is_refused_before_training(data, tmp_path, capsys, damage, extra, expect):
    bad = _damaged_copy(data, tmp_path, damage)
    out = tmp_path / "run"
    assert cli_main(pretrain_cmd(bad, out, 2)[3:] + extra) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err
    assert f"minilab pack --output-dir {bad['packed']} --force" in err
    assert not out.exists()


def test_flipped_byte_trains_without_verify_but_not_with_it(data, tmp_path, capsys):
    """Sizes are checked on every run; the SHA-256 (which reads all the data) only with --verify."""
    bad = _damaged_copy(data, tmp_path, lambda p: _flip_byte(p / "train.bin"))
    assert cli_main(pretrain_cmd(bad, tmp_path / "plain", 1)[3:]) == 0
    capsys.readouterr()
    assert cli_main(pretrain_cmd(bad, tmp_path / "checked", 1)[3:] + ["--set", "verify_data=true"]) == 1
    assert "SHA-256 differs" in capsys.readouterr().err and not (tmp_path / "checked").exists()


def one_error_line(stderr: str) -> str:
    """The one `minilab: error:` line of a failed run (progress lines may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("minilab: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_exploding_lr_stops_the_run_without_a_final_model(data, tmp_path, capsys):
    """lr=1e30 (finite, so config-valid): the weights blow up; the run stops at the first save or
    loss that shows it, with no final model and nothing registered, and every checkpoint on disk
    has finite weights."""
    out, models = tmp_path / "run", tmp_path / "models"
    rc = cli_main(pretrain_cmd(data, out, 6)[3:-2] + ["--set", "optim.lr=1e30", "--set", "ckpt_every=1",
                                                     "--set", "register=true", "--set", f"models_dir={models}"])
    err = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "training diverged and stopped" in err, err
    assert "no final model written or registered" in err
    assert not (out / "final").exists() and not (models.exists() and any(models.iterdir()))
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


@pytest.mark.parametrize("where", ["train", "val"])
def test_non_finite_loss_names_the_step_and_the_kept_checkpoint(data, tmp_path, capsys, monkeypatch, where):
    from minilab import host_memory, pretrain

    memory, keep, release = [], host_memory.keep_freed_memory, host_memory.release_free_memory
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: memory.append("keep") or keep())
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: memory.append("release") or release())
    if where == "train":
        real = pretrain.PretrainRun.train_step

        def train_step(self):
            loss, norm, extra = real(self)
            return (float("inf") if self.step == 2 else loss), norm, extra  # the loss of step 3
        monkeypatch.setattr(pretrain.PretrainRun, "train_step", train_step)
    else:
        real_eval, calls = pretrain.evaluate, []

        def evaluate(*args):
            calls.append(1)  # the evals of steps 0 and 3: the second one is nan
            return {**real_eval(*args), **({"val_loss": float("nan")} if len(calls) == 2 else {})}
        monkeypatch.setattr(pretrain, "evaluate", evaluate)
    out = tmp_path / "run"
    extra = ["--set", "ckpt_every=2"] + (["--set", "eval_every=3"] if where == "val" else [])
    assert cli_main(pretrain_cmd(data, out, 5)[3:] + extra) == 1
    err = one_error_line(capsys.readouterr().err)
    what = "train loss is inf" if where == "train" else "val loss is nan"
    assert f"{what} at step 3: training diverged" in err, err
    assert f"the last good checkpoint {out / 'checkpoints' / 'step-000002'} is kept" in err
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file() and not (out / "final").exists()
    # the loop kept freed memory for reuse while it ran and handed the free memory back when it stopped
    assert memory == ["keep", "release"]


@pytest.mark.parametrize("damage", ["truncated-weights", "garbage-optimizer"])
def test_resume_from_a_damaged_checkpoint_is_one_line_naming_the_older_one(data, tmp_path, capsys, damage):
    out = tmp_path / "run"
    base = pretrain_cmd(data, out, 3)[3:] + ["--set", "ckpt_every=1", "--set", "keep_last=5"]
    assert cli_main(base) == 0
    capsys.readouterr()
    newest, older = out / "checkpoints" / "step-000003", out / "checkpoints" / "step-000002"
    if damage == "truncated-weights":
        (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:5000])
    else:
        (newest / "optimizer.pt").write_bytes(b"\x80not a torch file" * 50)
    resume = pretrain_cmd(data, out, 5)[3:] + ["--set", "ckpt_every=1", "--set", "keep_last=5"]
    assert cli_main(resume + ["--resume", "auto"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert f"step-000003/{'model.safetensors' if damage == 'truncated-weights' else 'optimizer.pt'}: " in err
    assert f"resume from the next older complete checkpoint instead: --resume {older}" in err
    assert cli_main(resume + ["--resume", str(older)]) == 0  # the named one does resume


def test_run_marker_is_written_before_the_first_checkpoint(data, tmp_path, monkeypatch, capsys):
    """A run killed before (or at) its first checkpoint is still known as minilab's: run.json is
    there, so `cleanup` may remove the failed run and `--force` may replace it."""
    from minilab import checkpoint
    from minilab.owned import output_kind

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while saving the first checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash)
    out = tmp_path / "run"
    assert cli_main(pretrain_cmd(data, out, 2, "--set", "ckpt_every=1")[3:]) != 0
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert output_kind(out) == "run"
    assert json.loads((out / "run.json").read_text())["stage"] == "pretrain"
