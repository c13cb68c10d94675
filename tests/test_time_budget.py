"""The training time budget (`pretrain --time-budget`) and the wsd LR schedule: lr values by hand,
durations and their one-line errors, the planner's arithmetic, a budgeted run that ends on time
with its schedule finished (fixed lap times through `budget.FAKE_SECONDS`, and the real clock),
a probe that leaves no trace, and a budgeted run killed and resumed bitwise equal to an
uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import make_packed
from safetensors.torch import load_file

import minilab
from minilab import budget
from minilab.budget import Pace, count_due, fit_steps, parse_duration
from minilab.cli import main as cli_main
from minilab.training import MetricsLog, OptimConfig, Schedule, lr_at

ARCH = ["--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=2",
        "--set", "model.head_dim=32", "--set", "model.intermediate_size=128"]
# Fixed lap times (seconds): the plan is exact arithmetic, the run deterministic.
# Binary fractions: the sums are exact, so the expected step count is too.
FAKE = {"setup": 1.0, "step": 0.0625, "eval": 0.25, "save": 0.125, "export": 0.25}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("budget-data"))


def args(data, out, *extra):
    return ["pretrain", "--data_dirs", str(data["packed"]), "--tokenizer_dir", str(data["tokenizer"]),
            "--output_dir", str(out), "--arch", "micro", *ARCH, "--set", "batch_size=4", "--set", "eval_every=10",
            "--set", "eval_batches=2", "--set", "ckpt_every=20", "--set", "register=false",
            "--set", "tensorboard=false", *extra]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- the lr schedule ----------------------------------------------------------------------------
def test_wsd_lr_by_hand():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1, schedule="wsd", decay_frac=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # warmup as cosine's
    assert lrs[10:80] == [1.0] * 70                                               # stable: the peak
    assert lrs[80] == pytest.approx(1 - 0.9 / 20)                                 # decay: 20 steps
    assert lrs[89] == pytest.approx(1 - 0.9 * 10 / 20)
    assert lrs[99] == pytest.approx(0.1)                                          # the floor at the last step
    assert Schedule.of(100, cfg) == Schedule(100, 10, 80, "wsd")
    short = [lr_at(s, 3, cfg) for s in range(3)]  # 0.2 x 3 steps rounds to 0: still one decay step
    assert short == [1.0, 1.0, pytest.approx(0.1)]
    no_decay = OptimConfig(lr=1.0, warmup_frac=0.0, schedule="wsd", decay_frac=0.0)
    assert [lr_at(s, 10, no_decay) for s in range(10)] == [1.0] * 10              # constant lr


def test_cosine_is_unchanged_and_default():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1)
    assert cfg.schedule == "cosine"
    assert lr_at(55, 100, cfg) == 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5))
    assert Schedule.of(100, cfg).lr(100, cfg) == pytest.approx(0.1)


def test_wsd_fractions_must_fit(capsys, tmp_path):
    code = cli_main(["pretrain", "--data_dirs", "d", "--tokenizer_dir", "t", "--output_dir", str(tmp_path),
                     "--set", "optim.schedule=wsd", "--set", "optim.warmup_frac=0.5", "--set", "optim.decay_frac=0.6"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "key 'optim.decay_frac': warmup_frac + decay_frac must be at most 1" in err


# ---- durations ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45), (" 2 m", 120),
                                           (7.5, 7.5), (".5m", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("flag, shown", [(["--time-budget", "10x"], "'10x'"), (["--time-budget", "0s"], "'0s'"),
                                         (["--set", "time_budget=-5"], "-5"), (["--time-budget", "ten minutes"], ""),
                                         (["--set", "time_budget=true"], "")])
def test_bad_time_budget_is_one_line_naming_the_key(flag, shown, capsys, tmp_path):
    code = cli_main(["pretrain", "--data_dirs", "d", "--tokenizer_dir", "t", "--output_dir", str(tmp_path), *flag])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "key 'time_budget'" in err and shown in err
    assert "Traceback" not in err


# ---- the plan's arithmetic ----------------------------------------------------------------------
def test_count_due_and_fit_steps():
    assert count_due(0, 25, 10) == 3      # after steps 10, 20 and the last, 25
    assert count_due(0, 30, 10) == 3      # the last is also a multiple: once
    assert count_due(20, 25, 10) == 1
    pace = Pace(step=1.0, eval=0.0, save=0.0, export=0.0)
    assert fit_steps(0, 10.0, pace, 10, 10) == 10       # budget / step time
    assert fit_steps(3, 10.0, pace, 10, 10) == 13
    pace = Pace(step=1.0, eval=2.0, save=0.5, export=3.0)
    # n steps + evals (every 5 and the last) * 2 + saves (every 10 and the last) * 0.5 + 3 <= 40
    best = max(n for n in range(1, 100)
               if n + 2 * count_due(0, n, 5) + 0.5 * count_due(0, n, 10) + 3 <= 40)
    assert fit_steps(0, 40.0, pace, 5, 10) == best == 25  # 25 + 5 x 2 + 3 x 0.5 + 3 = 39.5
    assert fit_steps(0, 2.0, pace, 5, 10) == 0          # not even one step fits


def expected_steps(seconds: float) -> int:
    """Budget minus setup, the step-0 eval and the export, over the steps and their evals and saves."""
    rest = seconds - FAKE["setup"] - FAKE["eval"] - FAKE["export"]
    return max(n for n in range(1, 2000) if n * FAKE["step"] + FAKE["eval"] * count_due(0, n, 10)
               + FAKE["save"] * count_due(0, n, 20) <= rest)


# ---- budgeted runs --------------------------------------------------------------------------------
LAUNCH = ("import json, sys, minilab.budget as b; b.FAKE_SECONDS = json.loads(sys.argv[1]); "
          "from minilab.cli import main; sys.exit(main(sys.argv[2:]))")


def run_with_fake_clock(fake: dict, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(fake), *argv], env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("shape,optimizer", [("wsd", "adamw"), ("cosine", "adamw"), ("wsd", "muon")])
def test_fixed_step_time_plan_ends_on_budget_and_probe_leaves_no_trace(data, tmp_path, shape, optimizer):
    run = tmp_path / "budget"
    opt = ["--set", f"optim.optimizer={optimizer}"]
    done = run_with_fake_clock(FAKE, args(data, run, "--time-budget", "8s", "--set", f"optim.schedule={shape}", *opt))
    assert done.returncode == 0, done.stderr[-2000:]
    n = expected_steps(8.0)
    # 8 s - 1 s setup - 0.25 s step-0 eval - 0.25 s export = 6.5 s = 68 steps x 0.0625 s + 7 evals x 0.25 s
    # (every 10 steps and the last) + 4 saves x 0.125 s (every 20 and the last)
    assert n == 68
    summary = records(run, "time_budget")[-1]
    assert summary["max_steps"] == n and summary["time_budget_s"] == 8.0
    assert 0.95 * 8.0 <= summary["elapsed_s"] <= 8.0                      # on time, within 5%
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, n + 1))
    cfg = OptimConfig(schedule=shape)
    assert train[-1]["lr"] == Schedule.of(n, cfg).lr(n - 1, cfg)        # the schedule at its end
    if shape == "wsd":
        assert train[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
        assert summary["replans"] >= 1 and all(p["max_steps"] == n for p in summary["plans"])
    else:
        assert summary["replans"] == 0
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    assert manifest["metrics"]["time_budget"]["max_steps"] == n
    if shape == "cosine":
        return
    # The probe changed nothing: the same steps without a budget give the same weights, bitwise.
    plain = tmp_path / "plain"
    done = run_with_fake_clock(None, args(data, plain, "--max-steps", str(n), "--set", f"optim.schedule={shape}",
                                          *opt))
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_weights(run, plain)


def test_real_clock_run_ends_near_its_budget(data, tmp_path):
    run = tmp_path / "real"
    proc = subprocess.run([sys.executable, "-m", "minilab", *args(data, run, "--time-budget", "12s",
                                                                   "--set", "optim.schedule=wsd")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = records(run, "time_budget")[-1]
    # Within 2% here when the machine is quiet; generous because a loaded 2-core machine may change
    # pace after the last re-plan (the decay is never cut short). Setup is ~half of the 12 s.
    assert 0.75 * 12 <= summary["elapsed_s"] <= 1.3 * 12, summary
    train = records(run, "train")
    assert train[-1]["step"] == summary["max_steps"]
    assert train[-1]["lr"] == pytest.approx(1e-3 * 0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_killed_and_resumed_budgeted_run_is_bitwise_the_uninterrupted_one(data, tmp_path, optimizer):
    # The probe misjudges the step (0.05 s, really 0.0625): the wsd run re-plans shorter from the pace.
    # Muon: both halves' state (momentum buffers, AdamW moments) comes back from the checkpoint.
    fake = {**FAKE, "probe_step": 0.05}
    extra = ["--time-budget", "8s", "--set", "optim.schedule=wsd", "--set", "ckpt_every=5", "--set", "keep_last=2",
             "--set", f"optim.optimizer={optimizer}"]
    ref = tmp_path / "ref"
    done = run_with_fake_clock(fake, args(data, ref, *extra))
    assert done.returncode == 0, done.stderr[-2000:]
    plans = records(ref, "plan")
    assert len(plans) >= 3 and plans[0]["max_steps"] > plans[-1]["max_steps"]
    # Killed at a checkpoint after the first re-plan, before the last: the resume must use the
    # saved schedule and ledger, and re-plan later exactly as the uninterrupted run did.
    kill = next(s for s in range(plans[1]["step"] + 1, plans[-1]["step"]) if s % 5 == 0)
    run = tmp_path / "killed"
    killed = run_with_fake_clock(fake, args(data, run, *extra, "--set", f"interrupt_at_step={kill}"))
    assert killed.returncode == -9 and not (run / "final").exists()
    resumed = run_with_fake_clock(fake, args(data, run, *extra, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{kill:06d}'}" in resumed.stderr
    assert same_weights(ref, run)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in records(ref, "plan")]
    assert [{k: v for k, v in r.items() if k != "time"} for r in records(run, "plan")] == strip
    assert [r["loss"] for r in records(run, "train")] == [r["loss"] for r in records(ref, "train")]
    assert [r["step"] for r in records(run, "eval")] == [r["step"] for r in records(ref, "eval")]


def test_resume_with_another_budget_or_none_is_refused(tmp_path):
    from minilab.errors import MinilabError

    def fresh(seconds):
        return budget.TimeBudget(seconds, OptimConfig(schedule="wsd"), 10, 20)

    saved = fresh(8.0)
    saved.first_plan({"step": 0.0625, "eval": 0.25, "save": 0.125, "export": 0.25})
    state = json.loads(json.dumps(saved.state()))  # as meta.json keeps it
    ckpt = tmp_path / "step-000010"
    assert fresh(8.0).load(state, 0.125, ckpt) == saved.schedule  # the saved schedule, not re-derived
    with pytest.raises(MinilabError, match="planned for time_budget 8s, not 9s; resume with the run's own"):
        fresh(9.0).load(state, 0.125, ckpt)
    with pytest.raises(MinilabError, match="trained without a time budget; resume without time_budget"):
        fresh(8.0).load(None, 0.125, ckpt)


def test_too_short_budget_is_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "FAKE_SECONDS", FAKE)
    assert cli_main(args(data, tmp_path / "short", "--time-budget", "1.5s")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "time_budget 1.5s is too short" in err and "raise time_budget" in err


def test_resume_keeps_the_eval_of_its_checkpoint_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 8):
        log.write("plan", step=step - 1)  # made at the start of the step after `step - 1`
        log.write("train", step=step)
        if step % 5 == 0:
            log.write("eval", step=step)  # before the checkpoint of this step
    log.truncate_after(5)
    kept = [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert kept == [("plan", 0), ("train", 1), ("plan", 1), ("train", 2), ("plan", 2), ("train", 3),
                    ("plan", 3), ("train", 4), ("plan", 4), ("train", 5), ("eval", 5)]


def test_recipe_stage_key_is_checked_and_part_of_the_fingerprint(tmp_path):
    """`stages.pretrain.time_budget` changes what is produced: another budget reruns the stage
    (tensorboard, a runtime key, does not); a bad one is a one-line error naming the recipe key."""
    from minilab.config import ConfigError
    from minilab.recipe.spec import fingerprint, load_recipe, placeholder
    from minilab.recipe.stages import build_config

    demo = Path(minilab.__file__).parent / "recipes" / "demo.yaml"

    def pretrain_fp(*overrides):
        recipe = load_recipe(demo, workdir=str(tmp_path), overrides=list(overrides))
        stage = next(s for s in recipe.stages if s.name == "pretrain")
        cfg, fp_cfg = build_config(recipe, stage, lambda ref, attr: placeholder(recipe, ref, attr), "demo.yaml")
        return cfg, fingerprint(stage.kind, fp_cfg, {}, {})

    plain_cfg, plain = pretrain_fp()
    cfg, ten = pretrain_fp("stages.pretrain.time_budget=10m")
    assert cfg.time_budget == "10m" and plain_cfg.time_budget == "5m"  # the demo trains for five minutes
    assert len({plain, ten, pretrain_fp("stages.pretrain.time_budget=20m")[1]}) == 3
    assert pretrain_fp("stages.pretrain.time_budget=10m", "stages.pretrain.tensorboard=false")[1] == ten
    with pytest.raises(ConfigError, match=r"key 'stages\.pretrain\.time_budget': expected a duration"):
        pretrain_fp("stages.pretrain.time_budget=soon")


def test_wsd_replan_follows_a_slower_pace_and_an_exhausted_budget_still_ends_at_the_floor(monkeypatch):
    cfg = OptimConfig(schedule="wsd")

    def run_to_replan(step_s):
        monkeypatch.setattr(budget, "FAKE_SECONDS", {**FAKE, "step": step_s})  # laps slower than the probe's
        plan = budget.TimeBudget(8.0, cfg, 10, 20)
        first = plan.first_plan({k: FAKE[k] for k in ("step", "eval", "save", "export")})
        # The first re-plan comes once 8 real steps have measured the pace (the warmup is 6 steps).
        assert first == Schedule.of(68, cfg) == Schedule(68, 6, 55, "wsd") and plan.next_replan == 8
        plan.ledger.lap("eval")  # step 0
        for step in range(1, 9):
            plan.ledger.lap("step")
            if step % 10 == 0:
                plan.ledger.lap("eval")
            if step % 20 == 0:
                plan.ledger.lap("save")
        assert plan.maybe_replan(7) is None
        return plan, plan.maybe_replan(8)

    plan, second = run_to_replan(0.125)  # twice the probe's step time
    # 1 s setup + 0.25 s step-0 eval + 8 x 0.125 s = 2.25 s spent: 5.75 s left at 0.125 s a step
    assert plan.ledger.elapsed == 2.25 and plan.plans[-1]["step_s"] == 0.125
    n = fit_steps(8, 5.75, Pace(0.125, 0.25, 0.125, 0.25), 10, 20)
    assert n == 40  # 32 steps (4 s), evals after 10, 20, 30, 40 (1 s), saves after 20, 40, the export: 5.5 s
    assert second == Schedule(40, 6, 32, "wsd")  # warmup kept, decay the last 8 steps
    assert plan.next_replan == 20  # halfway to the new decay start
    plan, last = run_to_replan(1.0)  # 16 times: the budget is gone by the re-plan
    assert last == Schedule(9, 6, 8, "wsd")  # one more step, and it decays to the floor
    assert last.lr(8, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_cosine_replans_once_at_the_end_of_its_warmup(monkeypatch):
    """Cosine's warmup lr depends only on the warmup's length: the run re-plans there, once."""
    cfg = OptimConfig(schedule="cosine")
    monkeypatch.setattr(budget, "FAKE_SECONDS", {**FAKE, "step": 0.125})
    plan = budget.TimeBudget(30.0, cfg, 10, 20)
    first = plan.first_plan({k: FAKE[k] for k in ("step", "eval", "save", "export")})
    assert first == Schedule.of(first.max_steps, cfg) and plan.next_replan == first.warmup >= 8
    plan.ledger.lap("eval")
    for step in range(1, first.warmup + 1):
        plan.ledger.lap("step")
        if step % 10 == 0:
            plan.ledger.lap("eval")
        if step % 20 == 0:
            plan.ledger.lap("save")
    second = plan.maybe_replan(first.warmup)
    assert second.warmup == first.warmup and second.shape == "cosine" and second.max_steps < first.max_steps
    assert plan.next_replan is None
    # the lr of every step already trained is the same under both plans
    assert [first.lr(s, cfg) for s in range(first.warmup + 1)] == [second.lr(s, cfg) for s in range(first.warmup + 1)]
    assert second.lr(second.max_steps, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
