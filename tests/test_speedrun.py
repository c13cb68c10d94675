"""benchmarks/speedrun.py: the one evaluator against hand-computed values, held-out windows, the
time-to-quality interpolation, and the plumbing of both systems on a tiny run (nanoGPT's only
where a checkout is at /work/nanogpt or $NANOGPT_DIR)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_packed

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("speedrun", ROOT / "benchmarks" / "speedrun.py")
speedrun = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speedrun)

NANOGPT = Path(os.environ.get("NANOGPT_DIR", "/work/nanogpt"))


class CharTokenizer:
    """Every token decodes to one byte, except id 0 (special: nothing)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i == 0 else "a" for i in ids)


def test_uniform_logits_give_log2_vocab_bits_per_token():
    vocab = 50
    windows = np.arange(1, 3 * 9 + 1).reshape(3, 9) % (vocab - 1) + 1   # no id 0: 1 byte per target
    n_bytes = speedrun.target_bytes(CharTokenizer(), windows)
    assert n_bytes == 3 * 8
    got = speedrun.heldout_bpb(lambda x: torch.zeros(*x.shape, vocab), windows, n_bytes, batch_size=2)
    assert got["tokens"] == 24
    assert got["bits_per_byte"] == pytest.approx(math.log2(vocab), rel=1e-6)


def test_peaked_logits_against_hand_computed_bpb():
    vocab, peak = 7, 3.0
    windows = np.array([[3, 4, 5, 6, 0, 1], [5, 6, 0, 1, 2, 3]])  # next token = (x + 1) % vocab
    n_bytes = speedrun.target_bytes(CharTokenizer(), windows)
    assert n_bytes == 8  # 10 targets, two of them id 0 (no bytes), still scored

    def logits(x):
        out = torch.zeros(*x.shape, vocab)
        out.scatter_(-1, ((x + 1) % vocab)[..., None], peak)
        return out
    p = math.exp(peak) / (math.exp(peak) + vocab - 1)
    got = speedrun.heldout_bpb(logits, windows, n_bytes, batch_size=1)
    assert got["bits_per_byte"] == pytest.approx(10 * -math.log2(p) / 8, rel=1e-6)


def test_heldout_windows_are_fixed_disjoint_slices_of_val(tmp_path):
    from minilab.data.packed import open_split

    d = make_packed(tmp_path, n_docs=300, seq_len=32)
    w = speedrun.heldout_windows(d["packed"], 5, seq_len=16, seed=3)
    assert w.shape == (5, 17)
    assert (w == speedrun.heldout_windows(d["packed"], 5, seq_len=16, seed=3)).all()
    val = np.asarray(open_split(d["packed"], "val")[0], dtype=np.int64)
    starts = []
    for row in w:
        hits = [s for s in range(0, len(val) - 16, 17) if (val[s:s + 17] == row).all()]
        assert hits, "each window is a slot of the val split"
        starts.append(hits[0])
    assert len(set(starts)) == 5


def test_time_to_reach_interpolates_in_log_time():
    pts = [(60.0, 2.0), (240.0, 1.0), (600.0, 0.9)]
    assert speedrun.time_to_reach(pts, 1.5)["seconds"] == pytest.approx(120.0)
    assert speedrun.time_to_reach(pts, 2.5)["seconds"] == 60.0
    assert speedrun.time_to_reach(pts, 2.5)["how"].startswith("at_most")
    assert speedrun.time_to_reach(pts, 0.5)["seconds"] is None


def test_schedules_are_sized_from_step_time():
    # minilab sizes its own schedule from its time budget; nanoGPT's is sized here from its step time
    assert speedrun.minilab_schedule(120, 0.25) == {"time_budget": 120, "eval_every": 4800, "ckpt_every": 4800}
    nano = speedrun.NanoGPT(".", Path("."), 4096, 1).schedule(600, 0.3)
    assert nano == {"max_iters": 2000, "lr_decay_iters": 2000, "warmup_iters": 100}  # the README recipe's shape


def test_peer_problems_are_one_line_reasons(tmp_path):
    assert "no --nanogpt-dir" in speedrun.nanogpt_problem(None, {"dtype": "uint16"})
    assert "not a nanoGPT checkout" in speedrun.nanogpt_problem(str(tmp_path), {"dtype": "uint16"})
    for f in speedrun.NANOGPT_FILES:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert speedrun.nanogpt_problem(str(tmp_path), {"dtype": "uint16"}) is None
    assert "uint32" in speedrun.nanogpt_problem(str(tmp_path), {"dtype": "uint32"})


def test_minilab_tiny_run_is_scored(tmp_path):
    d = make_packed(tmp_path, n_docs=200, seq_len=32)
    system = speedrun.Minilab(d["packed"], d["tokenizer"], 1, recipe={
        "arch": "micro", "model": {"n_layer": 1}, "batch_size": 2, "seq_len": 32, "optim": {"lr": 2e-3}})
    (tmp_path / "run").mkdir()
    r = system.train(tmp_path / "run", 0, {"max_steps": 3})
    assert (r["steps"], r["tokens"]) == (3, 3 * 2 * 32)
    windows = speedrun.heldout_windows(d["packed"], 4, seq_len=32)
    got = speedrun.heldout_bpb(system.logits(r), windows, 1000)
    assert got["tokens"] == 4 * 32 and 0 < got["bits_per_byte"] < 100


@pytest.mark.skipif(not (NANOGPT / "train.py").is_file(), reason="no nanoGPT checkout (set NANOGPT_DIR)")
def test_nanogpt_tiny_run_is_scored_on_minilab_tokens(tmp_path):
    d = make_packed(tmp_path, n_docs=200, seq_len=32)
    tiny = {**speedrun.NANOGPT_RECIPE, "block_size": 32, "batch_size": 2, "n_layer": 1, "n_head": 2, "n_embd": 32}
    system = speedrun.NanoGPT(NANOGPT, d["packed"], 300, 1, recipe=tiny)
    ckpts = []
    for seed in (0, 1):
        (tmp_path / f"run{seed}").mkdir()
        r = system.train(tmp_path / f"run{seed}", seed, system.schedule(0, 1, steps=3))
        assert (r["steps"], r["tokens"]) == (3, 3 * 2 * 32)
        ckpts.append(torch.load(r["model"], map_location="cpu", weights_only=True))
        assert ckpts[-1]["iter_num"] == 3 and ckpts[-1]["model_args"]["vocab_size"] == 300
    # the seed reaches nanoGPT's fixed torch.manual_seed(1337): other initial weights
    assert not torch.equal(ckpts[0]["model"]["transformer.wte.weight"], ckpts[1]["model"]["transformer.wte.weight"])
    windows = speedrun.heldout_windows(d["packed"], 4, seq_len=32)
    got = speedrun.heldout_bpb(system.logits(r), windows, 1000)
    assert got["tokens"] == 4 * 32 and 0 < got["bits_per_byte"] < 100


def test_summary_ratios_targets_and_table(capsys):
    def row(system, budget, seed, bpb, loop):
        return {"system": system, "budget_min": budget, "seed": seed, "bpb": bpb, "loop_s": loop, "wall_s": loop + 5,
                "steps": 10, "tokens": 100, "loop_over_budget": loop / (budget * 60)}
    rows = [row("minilab", 2, 0, 1.9, 120), row("minilab", 2, 1, 2.1, 120), row("nanogpt", 2, 0, 2.5, 120),
            row("nanogpt", 2, 1, 2.5, 120), row("minilab", 10, 0, 1.0, 600), row("nanogpt", 10, 0, 1.5, 600)]
    s = speedrun.summarize_runs(rows, [2, 10], ["minilab", "nanogpt"])
    assert s["by_budget"]["2"]["minilab"]["bpb_per_seed"] == [1.9, 2.1]
    assert s["ratio"] == {"2": pytest.approx(0.8), "10": pytest.approx(1.0 / 1.5)}
    t = s["minilab_time_to_peer_bpb"]
    assert t["seconds"] == pytest.approx(math.exp(math.log(120) + 0.5 * math.log(5)))  # bpb 1.5: halfway
    assert s["targets"] == {"bpb_10pct_lower_every_budget": True, "peer_largest_budget_bpb_in_half_the_time": True}
    speedrun.print_table(s, ["minilab", "nanogpt"])
    out = capsys.readouterr().out
    assert "ratio minilab/nanoGPT 0.800 (+20.0% lower bpb)" in out and "in 4.47 min" in out


def test_vocab_variants_and_the_planners_scaling_file():
    from types import SimpleNamespace

    from minilab.arch import load_architecture
    from minilab.model import build_model
    from minilab.planner.budget_plan import plan_budget

    name, recipe = speedrun.parse_variant("v2k:vocab_size=2048,model.n_layer=2")
    assert (name, recipe["vocab_size"]) == ("v2k", 2048)
    assert recipe["model"] == {**speedrun.MINILAB_RECIPE.get("model", {}), "n_layer": 2}  # the recipe's, overridden
    with pytest.raises(SystemExit, match="re-tokenizes"):  # --data is already tokenized
        speedrun.prepare_data(SimpleNamespace(data="packed", text=None, tokenizer_dir=None), 2048)
    recipe.pop("vocab_size")

    def run(system, budget, tokens, loop, bpb):
        return {"system": system, "budget_min": budget, "seed": 0, "tokens": tokens, "loop_s": loop, "bpb": bpb}
    result = {"machine": "x86_64", "threads": 2, "gemm_gflops": 80.0, "data_label": "built-in", "seeds": 1,
              "recipes": {"minilab": speedrun.MINILAB_RECIPE, "v2k": recipe, "nanogpt": speedrun.NANOGPT_RECIPE},
              "eval": {"minilab": {"vocab_size": 4096}, "v2k": {"vocab_size": 2048}, "nanogpt": {"vocab_size": 4096}},
              "runs": [run("minilab", 1, 600_000, 60, 2.0), run("minilab", 4, 2_400_000, 240, 1.7),
                       run("v2k", 1, 900_000, 60, 2.1), run("v2k", 4, 3_000_000, 240, 1.9),
                       run("nanogpt", 1, 500_000, 60, 2.4)]}
    s = speedrun.scaling_of(result)
    assert [c["name"] for c in s["candidates"]] == ["recipe", "v2k"]  # the peer is not a candidate
    mini, v2k = s["candidates"]
    assert mini["tokens_per_s"] == pytest.approx(10_000) and mini["vocab_size"] == 4096
    assert [p["tokens"] for p in v2k["points"]] == [900_000, 3_000_000] and v2k["vocab_size"] == 2048
    cfg = load_architecture("micro", vocab_size=2048, **recipe["model"])
    assert v2k["params"] == build_model(cfg, device="meta").num_params()
    plan = plan_budget(240, s, rate=80.0)  # the measuring machine's pace: the measured points come back
    assert plan["recommended"]["name"] == "recipe" and plan["recommended"]["expected_bpb"] == pytest.approx(1.7)
