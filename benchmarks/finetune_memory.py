"""Fine-tuning a transformers model: the fused head + loss (`minilab.linear_ce`) against the logits path.

    python benchmarks/finetune_memory.py [--runs sft dpo] [--precision fp32 bf16] [--rounds 2]

The peer is what PEFT + transformers do by default and what minilab did before: the model's
logits (tokens x vocab), then the loss over them. Both paths run minilab's own training code on the
same model and batch, the logits path with `linear_ce.FUSE = False`. The model: a transformers
Llama (vocab 32,000, d 256, 4 layers, random weights) with LoRA r 8 on q/k/v/o, wrapped as
`minilab sft` / `minilab dpo` wrap a hub model (`LogitsOnly`). SFT: one micro-batch of 4 x 512
tokens through `accumulate_gradients`; DPO: 2 pairs x 512 tokens through `pair_logps` (reference
pass with the adapters off, then the policy) and `dpo_loss`. Each (run, precision, path) runs in a
fresh process, fused and logits alternating over `--rounds`: one warm-up step, then the peak
resident memory above the steady state (VmHWM after resetting it) and the median step time of 3.
Prints a table and one JSON line; ratios are logits / fused (memory: how many times more the
logits path needs; time: above 1, fused is faster). Linux only (it reads /proc). ~2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from planner_accuracy import proc_status  # this folder is on sys.path: run as a script

VOCAB, SEQ = 32_000, 512


def child(run: str, precision: str, fused: bool) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from minilab import linear_ce
    from minilab.finetune.dpo import dpo_loss, pair_logps, reference_context
    from minilab.finetune.models import LogitsOnly
    from minilab.training import accumulate_gradients

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    linear_ce.FUSE = fused
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4))
    peft_model = get_peft_model(hf, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model = LogitsOnly(peft_model).train()
    dev = torch.device("cpu")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, VOCAB, (4, SEQ + 1)))
    pairs = [[(rng.integers(0, VOCAB, SEQ), np.arange(SEQ) >= 100) for _ in range(2)] for _ in range(2)]

    def step() -> float:
        if run == "sft":
            loss, _ = accumulate_gradients(model, [(x[:, :-1], x[:, 1:])], precision, dev)
        else:
            with torch.no_grad(), reference_context(model, peft_model):
                ref_c, ref_r, _ = pair_logps(model, *pairs, 0, precision, dev)
            pi_c, pi_r, _ = pair_logps(model, *pairs, 0, precision, dev)
            loss_t = dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1)[0].mean()
            loss_t.backward()
            loss = loss_t.item()
        model.zero_grad(set_to_none=True)
        return loss

    step()
    baseline = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1000, "peak_mib": (proc_status("VmHWM") - baseline) / 2**20, "loss": loss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=["sft", "dpo"], default=["sft", "dpo"])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=2, help="fused / logits alternations per row")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run, precision, fused = args.child
        print(json.dumps(child(run, precision, fused == "fused")))
        return 0
    rows = {}
    for run in args.runs:
        for precision in args.precision:
            got = {"fused": [], "logits": []}
            for r in range(args.rounds):
                for path in ("fused", "logits") if r % 2 == 0 else ("logits", "fused"):
                    out = subprocess.run([sys.executable, __file__, "--child", run, precision, path],
                                         capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-2000:], file=sys.stderr)
                        return 1
                    got[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {p: {k: statistics.median(m[k] for m in got[p]) for k in ("ms", "peak_mib")} for p in got}
            rows[f"{run}-{precision}"] = {
                **{f"{p}_{k}": round(v, 1) for p in med for k, v in med[p].items()},
                "same_loss": abs(got["fused"][0]["loss"] - got["logits"][0]["loss"]) < 1e-3,
                "memory_ratio": round(med["logits"]["peak_mib"] / max(med["fused"]["peak_mib"], 1e-6), 2),
                "speed_ratio": round(med["logits"]["ms"] / med["fused"]["ms"], 2)}
    print(f"{'run':<10} {'fused ms':>9} {'MiB':>7} {'logits ms':>10} {'MiB':>7} {'memory x':>9} {'speed x':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['fused_ms']:>9,.0f} {r['fused_peak_mib']:>7,.0f} {r['logits_ms']:>10,.0f} "
              f"{r['logits_peak_mib']:>7,.0f} {r['memory_ratio']:>9.2f} {r['speed_ratio']:>8.2f}")
    print(json.dumps({"benchmark": "finetune_memory", "vocab": VOCAB, "seq_len": SEQ, "rounds": args.rounds,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
