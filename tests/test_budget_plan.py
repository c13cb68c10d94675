"""`minilab plan --budget`: the fit, the prediction from measured scaling and this machine's pace,
the shipped scaling file, and the CLI's output and errors."""

from __future__ import annotations

import json
import math

import pytest

from minilab import cli
from minilab.config import from_dict
from minilab.errors import MinilabError
from minilab.planner import budget_plan
from minilab.pretrain import PretrainConfig


def candidate(name, tokens_per_s, points, vocab=4096, arch=None):
    recipe = {"arch": "micro", "batch_size": 16, "seq_len": 256, "optim": {"lr": 8e-3}, **(arch or {})}
    return {"name": name, "recipe": recipe, "vocab_size": vocab, "params": 1_000_000, "tokens_per_s": tokens_per_s,
            "points": [{"tokens": t, "bpb": b} for t, b in points]}


def scaling(*candidates, gemm=100.0):
    return {"machine": "x86_64", "threads": 2, "gemm_gflops": gemm, "date": "2026-12-04", "data": "built-in",
            "candidates": list(candidates)}


def test_fit_log_recovers_a_line_in_log_tokens():
    a, b = budget_plan.fit_log([(t, 3.0 - 0.2 * math.log(t)) for t in (1e5, 1e6, 4e6)])
    assert a == pytest.approx(3.0) and b == pytest.approx(-0.2)
    with pytest.raises(MinilabError, match="two or more token counts"):
        budget_plan.fit_log([(1e6, 2.0), (1e6, 1.9)])


def test_plan_predicts_from_this_machines_pace_and_picks_the_lowest_bpb():
    # fast: 10k tok/s, bpb 2.0 at 1M, 1.8 at 4M; slow: 5k tok/s, steeper (2.2 at 1M, 1.6 at 4M)
    s = scaling(candidate("fast", 10_000, [(1e6, 2.0), (4e6, 1.8)]),
                candidate("slow", 5_000, [(1e6, 2.2), (4e6, 1.6)], arch={"model": {"n_layer": 6}}))
    short = budget_plan.plan_budget(100, s, rate=100.0)  # 1M tokens for fast, 0.5M for slow
    assert [c["name"] for c in short["candidates"]] == ["fast", "slow"]
    fast = short["candidates"][0]
    assert fast["tokens"] == pytest.approx(1e6) and fast["bpb"] == pytest.approx(2.0)
    assert fast["steps"] == int(1e6 // (16 * 256)) and not fast["extrapolated"]
    assert short["recommended"]["name"] == "fast" and short["recommended"]["expected_bpb"] == pytest.approx(2.0)
    # twice this machine's matmul rate: twice the tokens in the same budget; the steeper model wins
    # (fast: 8M tokens, 1.70)
    long = budget_plan.plan_budget(400, s, rate=200.0)
    slow = next(c for c in long["candidates"] if c["name"] == "slow")
    assert slow["tokens"] == pytest.approx(4e6) and slow["bpb"] == pytest.approx(1.6)
    assert long["recommended"]["name"] == "slow" and long["recommended"]["model"] == {"n_layer": 6}
    assert long["speed_vs_measured"] == pytest.approx(2.0)
    # far beyond the measured tokens: flagged, and said so
    far = budget_plan.plan_budget(100_000, s, rate=100.0)
    assert all(c["extrapolated"] for c in far["candidates"])
    assert "extrapolated beyond the measured budgets" in budget_plan.render_budget(far)


def test_a_near_tie_goes_to_the_smaller_model():
    big = candidate("big", 10_000, [(1e6, 1.995), (4e6, 1.795)])
    small = candidate("small", 10_000, [(1e6, 2.0), (4e6, 1.8)])
    big["params"], small["params"] = 2_000_000, 1_000_000
    p = budget_plan.plan_budget(100, scaling(big, small), rate=100.0)
    assert [c["name"] for c in p["candidates"]] == ["big", "small"]  # big predicts 0.005 lower: within the tie
    assert p["recommended"]["name"] == "small"
    big["points"] = [{"tokens": 1e6, "bpb": 1.95}, {"tokens": 4e6, "bpb": 1.75}]
    assert budget_plan.plan_budget(100, scaling(big, small), rate=100.0)["recommended"]["name"] == "big"


def test_shipped_scaling_is_measured_and_every_candidate_is_a_valid_pretrain_recipe(tmp_path):
    s = budget_plan.load_scaling()
    assert s["gemm_gflops"] > 0 and len(s["candidates"]) >= 3
    assert len({c["vocab_size"] for c in s["candidates"]}) >= 2  # vocabulary sizes were measured, not assumed
    for c in s["candidates"]:
        assert len({p["tokens"] for p in c["points"]}) >= 2 and all(0 < p["bpb"] < 10 for p in c["points"])
        cfg = from_dict(PretrainConfig, {**c["recipe"], "data_dirs": ["d"], "tokenizer_dir": "t",
                                         "output_dir": str(tmp_path), "time_budget": "10m"})
        cfg.validate()
    rec = budget_plan.plan_budget(600, s, rate=s["gemm_gflops"])["recommended"]
    assert rec["expected_steps"] > 0 and 0 < rec["expected_bpb"] < 10


def test_plan_budget_cli(tmp_path, capsys):
    f = tmp_path / "scaling.json"
    f.write_text(json.dumps(scaling(candidate("only", 10_000, [(1e6, 2.0), (4e6, 1.8)]))))
    assert cli.main(["plan", "--budget", "5m", "--scaling", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget_s"] == 300 and out["recommended"]["name"] == "only" and out["gemm_gflops"] > 0
    assert cli.main(["plan", "--budget", "90s", "--scaling", str(f)]) == 0
    text = capsys.readouterr().out
    assert "recommended: only" in text and "time_budget 90s" in text and "bits/byte" in text
    assert cli.main(["plan", "--budget", "soon", "--scaling", str(f)]) != 0
    assert "--budget" in capsys.readouterr().err
    assert cli.main(["plan", "tiny", "--budget", "5m", "--scaling", str(f)]) != 0
    assert "from scratch" in capsys.readouterr().err
    f.write_text("{}")
    assert cli.main(["plan", "--budget", "5m", "--scaling", str(f)]) != 0
    err = capsys.readouterr().err
    assert "not a speedrun scaling file" in err and "Traceback" not in err


def test_the_demo_trains_the_recipe_the_speedrun_and_the_planner_measured():
    """One recipe in three places (demo.yaml's pretrain, speedrun's MINILAB_RECIPE, the planner's
    `recipe` candidate): a change to one without the others would plan and benchmark another model."""
    import importlib.util
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("speedrun", root / "benchmarks" / "speedrun.py")
    speedrun = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speedrun)
    demo = yaml.safe_load((root / "src" / "minilab" / "recipes" / "demo.yaml").read_text())["stages"]
    keys = ("arch", "batch_size", "model", "optim")
    assert {k: demo["pretrain"].get(k) for k in keys} == {k: speedrun.MINILAB_RECIPE.get(k) for k in keys}
    assert demo["pack"]["seq_len"] == speedrun.MINILAB_RECIPE["seq_len"]
    assert demo["tokenizer"]["vocab_size"] == speedrun.DEFAULT_VOCAB
    shipped = next(c for c in budget_plan.load_scaling()["candidates"] if c["name"] == "recipe")
    assert shipped["recipe"] == speedrun.MINILAB_RECIPE and shipped["vocab_size"] == speedrun.DEFAULT_VOCAB
