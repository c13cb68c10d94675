"""What to pretrain for a time budget on this machine: `minilab plan --budget 10m`.

The answer comes from measurements, not from a formula: `benchmarks/speedrun.py --scaling-out`
trains minilab's CPU recipe and its shape and vocabulary variants for two or more time budgets
on one machine and writes, for each candidate, its recipe, its training throughput (tokens per
second of training loop) and its held-out bits per byte at each number of tokens seen
(`cpu_scaling.json` beside this file, with the machine, date and data it was measured on).

Planning a budget B on this machine:

1. Pace: a short fp32 matmul probe (`gemm_rate`, ~0.5 s) at the recipe's layer shapes measures
   this machine's rate; each candidate's throughput here is its measured throughput scaled by
   this rate over the measuring machine's (a CPU step of these models is matmul-bound). On a
   shared machine the probe moves by +-20% from one second to the next, and the predicted tokens
   with it: this is a plan; the run's own `time_budget` measures its real pace and sizes itself.
2. Tokens: D = throughput here x B (the budget's training loop; a time-budgeted run spends
   ~97% of it in steps, the rest in setup, evals and export).
3. Quality: each candidate's bpb(D) is its measured points fitted as a + b ln D (held-out loss
   falls about linearly in log tokens over a few doublings); the candidate with the lowest
   predicted bpb is recommended, with the predicted figure; candidates within `TIE_BPB` of the
   best tie (two seeds of one recipe differ by up to ~0.01), and the one with the fewest
   parameters among them is recommended (cheaper to fine-tune, serve and export). A D outside
   the measured tokens (more than 1.5x beyond either end) is flagged as an extrapolation: past
   the measured range the line is optimistic, and a larger model may win, which only a
   measurement at that scale shows.

The figures are for the data the scaling was measured on (the built-in corpus unless the file
says otherwise); other text has other absolute bpb, and usually the same ranking.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError

SCALING_FILE = Path(__file__).with_name("cpu_scaling.json")
EXTRAPOLATION = 1.5  # a token count this factor beyond the measured ones is flagged
TIE_BPB = 0.01  # predicted bpb this close to the best is a tie: seed-to-seed spread in the speedrun
GEMM_SHAPE = (4096, 128, 384)  # (batch x seq, d_model, d_ff): the CPU recipe's MLP matmul


def gemm_rate(seconds: float = 0.5, rounds: int = 10) -> float:
    """This machine's fp32 matmul rate in GFLOP/s at the CPU recipe's layer shape, with the
    threads torch uses (the same a training run uses): the best of `rounds` short rounds, as other
    load and a cold thread pool only ever slow a round down."""
    import torch

    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / rounds:
            a @ b
            calls += 1
        best = max(best, 2 * m * k * n * calls / elapsed / 1e9)
    return best


def load_scaling(path: str | Path = SCALING_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not data["candidates"] or float(data["gemm_gflops"]) <= 0:
            raise ValueError("no candidates")
        return data
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MinilabError(f"{path}: not a speedrun scaling file ({e}); write one with "
                           "`python benchmarks/speedrun.py --scaling-out FILE`") from None


def fit_log(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of bpb = a + b ln(tokens) through (tokens, bpb) points (two or more
    distinct token counts)."""
    xs = [math.log(t) for t, _ in points]
    ys = [b for _, b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise MinilabError("a scaling candidate needs points at two or more token counts")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def plan_budget(budget_s: float, scaling: dict[str, Any] | None = None, rate: float | None = None) -> dict[str, Any]:
    """Every candidate's predicted tokens, steps and held-out bpb for `budget_s` seconds of
    training here, best first, and the recommended recipe."""
    scaling = scaling or load_scaling()
    rate = rate if rate is not None else gemm_rate()
    speed = rate / float(scaling["gemm_gflops"])
    rows = []
    for c in scaling["candidates"]:
        points = [(p["tokens"], p["bpb"]) for p in c["points"]]
        a, b = fit_log(points)
        tokens = c["tokens_per_s"] * speed * budget_s
        recipe = c["recipe"]
        per_step = recipe["batch_size"] * recipe["seq_len"]
        lo, hi = min(t for t, _ in points), max(t for t, _ in points)
        rows.append({"name": c["name"], "vocab_size": c["vocab_size"], "params": c.get("params"),
                     "tokens_per_s": c["tokens_per_s"] * speed, "tokens": tokens,
                     "steps": max(1, int(tokens // per_step)), "bpb": a + b * math.log(tokens),
                     "extrapolated": not lo / EXTRAPOLATION <= tokens <= hi * EXTRAPOLATION,
                     "recipe": recipe})
    rows.sort(key=lambda r: r["bpb"])
    best = min((r for r in rows if r["bpb"] <= rows[0]["bpb"] + TIE_BPB), key=lambda r: r["params"] or 0)
    return {"budget_s": budget_s, "gemm_gflops": rate, "speed_vs_measured": speed,
            "measured_on": {k: scaling.get(k) for k in ("machine", "threads", "gemm_gflops", "date", "data")},
            "candidates": rows,
            "recommended": {"name": best["name"], "vocab_size": best["vocab_size"], **best["recipe"],
                            "time_budget": budget_s, "expected_steps": best["steps"],
                            "expected_bpb": best["bpb"], "extrapolated": best["extrapolated"]}}


def render_budget(p: dict[str, Any]) -> str:
    from minilab.recipe.summary import fmt_seconds

    m, budget = p["measured_on"], fmt_seconds(p["budget_s"])
    lines = [f"time budget {budget} on this machine: fp32 matmul {p['gemm_gflops']:.1f} GFLOP/s, "
             f"{p['speed_vs_measured']:.2f}x the machine the scaling was measured on ({m['machine']}, "
             f"{m['threads']} threads, {m['date']}; data {m['data']})",
             "", f"{'candidate':12} {'vocab':>6} {'params':>8} {'tokens/s':>9} {'tokens':>11} {'steps':>6} "
                 f"{'pred. bpb':>9}"]
    for r in p["candidates"]:
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] else "-"
        flag = "  (extrapolated)" if r["extrapolated"] else ""
        lines.append(f"{r['name']:12} {r['vocab_size']:>6} {params:>8} {r['tokens_per_s']:9,.0f} {r['tokens']:11,.0f} "
                     f"{r['steps']:>6} {r['bpb']:9.3f}{flag}")
    rec = p["recommended"]
    model = "".join(f", model.{k}={v}" for k, v in rec.get("model", {}).items())
    optim = ", ".join(f"optim.{k}={v}" for k, v in rec["optim"].items())
    lines += ["", f"recommended: {rec['name']} — arch {rec['arch']}{model}, tokenizer vocab_size {rec['vocab_size']}, "
                  f"batch_size {rec['batch_size']}, seq_len {rec['seq_len']}, {optim}, "
                  f"time_budget {p['budget_s']:g}s (~{rec['expected_steps']:,} steps); "
                  f"expected held-out {rec['expected_bpb']:.3f} bits/byte on the measured data"
                  + (" (extrapolated beyond the measured budgets: a guess)" if rec["extrapolated"] else "")]
    return "\n".join(lines)
