"""Planner accuracy: predicted vs measured peak memory of real training and inference steps.

    python benchmarks/planner_accuracy.py            # all configurations, ~2-3 minutes on 2 cores
    python benchmarks/planner_accuracy.py --only tiny-full-b4-s256
    python benchmarks/planner_accuracy.py --device cuda --jobs 7   # the CUDA table: fp32, bf16 mixed,
                                                                  # LoRA, QLoRA; 7 processes at once

Every configuration runs in a fresh subprocess (so allocator state and peaks never leak from one
to the next): import torch and peft, build a tiny warm-up model once (thread pools, autograd),
then record the resident set (VmRSS), reset the high-water mark (`echo 5 > /proc/self/clear_refs`),
build the model and run two optimizer steps (or one prefill for inference), and read VmHWM. The
measured peak is VmHWM - baseline: exactly the memory the model, its data and its steps added.
The prediction is `plan_memory(...).peak` (the runtime line, already in the baseline, excluded).

For contrast each line also shows what `accelerate estimate-memory`'s approach prints for the
same model: AutoModel (no LM head) parameters and buffers in fp32, and its "training with Adam"
row (16 B/param in fp32). Linux only (it reads /proc). One JSON line per configuration.

With `--device cuda` the configurations are `CUDA_CONFIGS` (precision per row, QLoRA through
`minilab.finetune.models.quantize_4bit`, as `minilab sft --method qlora` does) and the measurement
is `torch.cuda.max_memory_allocated()` minus `memory_allocated()` after the warm-up (the CUDA
context and cuBLAS workspace are outside both); the prediction is `plan_memory(..., target="cuda")`
.peak. Each line also gives the measured peak of each phase (forward, backward, optimizer step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# name, preset, method, batch, seq, gradient checkpointing, precision (the planner's names)
CONFIGS = [
    ("tiny-full-b4-s256", "tiny", "full", 4, 256, False, "fp32"),
    ("tiny-full-b2-s1024", "tiny", "full", 2, 1024, False, "fp32"),
    ("tiny-full-b4-s256-gc", "tiny", "full", 4, 256, True, "fp32"),
    ("tiny-full-bf16-b2-s1024", "tiny", "full", 2, 1024, False, "bf16-mixed"),
    ("tiny-lora-b2-s512", "tiny", "lora", 2, 512, False, "fp32"),
    ("small-full-b2-s256", "small", "full", 2, 256, False, "fp32"),
    ("small-full-bf16-b2-s256", "small", "full", 2, 256, False, "bf16-mixed"),
    ("small-lora-b2-s256", "small", "lora", 2, 256, False, "fp32"),
    ("small-infer-b8-s256", "small", "inference", 8, 256, False, "fp32"),
]
STEPS = 2
# the planner's precision -> the training loop's (bf16 with 16-bit weights: LoRA/QLoRA on a bf16 base)
RUN_PRECISION = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16"}
# name, preset, method, batch, seq, gradient checkpointing, precision (the planner's names)
CUDA_CONFIGS = [
    ("tiny-full-fp32-b8-s512", "tiny", "full", 8, 512, False, "fp32"),
    ("tiny-full-bf16-b8-s512", "tiny", "full", 8, 512, False, "bf16-mixed"),
    ("tiny-lora-fp32-b8-s512", "tiny", "lora", 8, 512, False, "fp32"),
    ("small-full-fp32-b4-s512", "small", "full", 4, 512, False, "fp32"),
    ("small-full-bf16-b4-s512", "small", "full", 4, 512, False, "bf16-mixed"),
    ("small-full-bf16-b4-s512-gc", "small", "full", 4, 512, True, "bf16-mixed"),
    ("small-lora-bf16-b4-s512", "small", "lora", 4, 512, False, "bf16"),
    ("small-qlora-bf16-b4-s512", "small", "qlora", 4, 512, False, "bf16"),
    ("small-qlora-bf16-b4-s512-gc", "small", "qlora", 4, 512, True, "bf16"),
    ("small-infer-bf16-b8-s512", "small", "inference", 8, 512, False, "bf16"),
    ("base-full-bf16-b8-s1024", "base", "full", 8, 1024, False, "bf16-mixed"),
    ("base-lora-bf16-b8-s1024", "base", "lora", 8, 1024, False, "bf16"),
    ("base-qlora-bf16-b8-s1024-gc", "base", "qlora", 8, 1024, True, "bf16"),
    ("base-infer-bf16-b16-s1024", "base", "inference", 16, 1024, False, "bf16"),
]


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(name: str, device: str = "cpu") -> dict:
    """Run one configuration in this (fresh) process and return the measurement."""
    if device == "cuda":
        return child_cuda(name)
    import peft  # noqa: F401 - imported before the baseline, as in a real run
    import torch

    from minilab.arch import load_architecture
    from minilab.kvcache import KVCache
    from minilab.loading import wrap_lora
    from minilab.model import build_model
    from minilab.training import accumulate_gradients, make_optimizer

    torch.set_num_threads(2)
    _, preset, method, b, s, gc, precision = next(c for c in CONFIGS if c[0] == name)
    cfg = load_architecture(preset, max_seq_len=max(s, 256), gradient_checkpointing=gc)
    # Warm-up on a toy model: thread pools, autograd engine and allocator arenas exist before the baseline.
    toy = build_model(load_architecture("micro", vocab_size=256))
    toy(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    del toy
    baseline = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (b, s))
    if method == "inference":
        model.eval()
        with torch.no_grad():
            model(x, kv_cache=KVCache(cfg, b, max_len=s))
    else:
        if method == "lora":
            model = wrap_lora(model, {"r": 8})
        model.train()
        opt = make_optimizer(model, __import__("minilab.training", fromlist=["OptimConfig"]).OptimConfig(),
                             torch.device("cpu"))
        for _ in range(STEPS):
            accumulate_gradients(model, [(x, x)], RUN_PRECISION[precision], torch.device("cpu"))
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"measured": proc_status("VmHWM") - baseline, "seconds": round(time.perf_counter() - t0, 2)}


def child_cuda(name: str) -> dict:
    """One CUDA configuration: peaks from the caching allocator, overall and per phase."""
    import peft  # noqa: F401
    import torch

    from minilab.arch import load_architecture
    from minilab.kvcache import KVCache
    from minilab.loading import wrap_lora
    from minilab.model import build_model
    from minilab.training import OptimConfig, accumulate_gradients, make_optimizer

    dev = torch.device("cuda")
    _, preset, method, b, s, gc, precision = next(c for c in CUDA_CONFIGS if c[0] == name)
    run_precision = RUN_PRECISION[precision]
    cfg = load_architecture(preset, max_seq_len=max(s, 256), gradient_checkpointing=gc)
    # Warm-up: CUDA context, cuBLAS(Lt) handles and workspaces, autograd, in both precisions.
    toy = build_model(load_architecture("micro", vocab_size=256), device=dev)
    for p in ("fp32", "bf16"):
        accumulate_gradients(toy, [(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))],
                             p, dev)
    del toy
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    phases: dict[str, int] = {}

    def mark(phase: str) -> None:
        torch.cuda.synchronize()
        phases[phase] = max(phases.get(phase, 0), torch.cuda.max_memory_allocated() - baseline)
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    # Built on the CPU and moved once in its final form (dtype, 4-bit), as minilab's stages load
    # models: the device never holds a full-precision copy that the run itself would not.
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (b, s))
    if method == "inference":
        model.to(dev, torch.bfloat16 if precision != "fp32" else torch.float32).eval()
        mark("weights")
        with torch.no_grad():
            model(x.to(dev), kv_cache=KVCache(cfg, b, max_len=s, dtype=next(model.parameters()).dtype, device=dev))
        mark("prefill")
    else:
        if method == "lora" and precision == "bf16":
            model.to(torch.bfloat16)  # the common LoRA recipe: 16-bit base, fp32 adapters (peft's autocast)
        if method == "qlora":
            from minilab.finetune.models import default_targets, quantize_4bit

            quantize_4bit(model, default_targets("llama"), dev)
        if method in ("lora", "qlora"):
            model = wrap_lora(model, {"r": 8})
        model.to(dev).train()
        mark("weights")
        opt = make_optimizer(model, OptimConfig(), dev)
        for _ in range(STEPS):
            accumulate_gradients(model, [(x, x)], run_precision, dev)
            mark("forward_backward")
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mark("optimizer_step")
    return {"measured": max(phases.values()), "phases": phases, "seconds": round(time.perf_counter() - t0, 2)}


def predict(name: str, device: str = "cpu") -> dict:
    from minilab.arch import load_architecture
    from minilab.model import build_model
    from minilab.planner import PlanRequest, accelerate_estimate, inspect_model, plan_memory

    configs = CUDA_CONFIGS if device == "cuda" else CONFIGS
    _, preset, method, b, s, gc, precision = next(c for c in configs if c[0] == name)
    cfg = load_architecture(preset, max_seq_len=max(s, 256))
    an = inspect_model(build_model(cfg, device="meta"))
    plan = plan_memory(an, PlanRequest(method=method, batch_size=b, seq_len=s, precision=precision,
                                       grad_checkpointing=gc, target=device, lora_rank=8))
    acc = accelerate_estimate(an)
    return {"params": an.params, "predicted": plan.peak, "phases": plan.phases,
            "accelerate_weights": acc["fp32"], "accelerate_train": acc["train_adam_fp32"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="configuration names")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="measure on the CPU (VmHWM) or on CUDA (max_memory_allocated)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="configurations measured at once, each in its own process (its own peak): "
                         "on a large GPU several fit side by side")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device)))
        return 0
    worst = 0.0
    names = [c[0] for c in (CUDA_CONFIGS if args.device == "cuda" else CONFIGS) if not args.only or c[0] in args.only]

    def measure(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, __file__, "--child", name, "--device", args.device],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outs = pool.map(measure, names)  # in order, each printed as soon as it and those before are done
        for name, out in zip(names, outs, strict=True):
            worst = max(worst, report(name, out, args.device))
    print(json.dumps({"worst_abs_error": round(worst, 3), "target": 0.15, "ok": worst <= 0.15}))
    return 0 if worst <= 0.15 else 1


def report(name: str, out: subprocess.CompletedProcess, device: str) -> float:
    """Print one configuration's line; return its absolute relative error (0 when it failed)."""
    if out.returncode:
        print(json.dumps({"config": name, "error": out.stderr.strip().splitlines()[-4:]}), flush=True)
        return 0.0
    m = json.loads(out.stdout.strip().splitlines()[-1])
    p = predict(name, device)
    ratio = p["predicted"] / m["measured"]
    mib = 2**20
    print(json.dumps({"config": name, "params": p["params"], "measured_mib": round(m["measured"] / mib, 1),
                      "predicted_mib": round(p["predicted"] / mib, 1), "ratio": round(ratio, 3),
                      "accelerate_weights_mib": round(p["accelerate_weights"] / mib, 1),
                      "accelerate_ratio": round(p["accelerate_weights"] / m["measured"], 3),
                      "accelerate_train_mib": round(p["accelerate_train"] / mib, 1),
                      "phases_mib": {k: round(v / mib, 1) for k, v in p["phases"].items()},
                      **({"measured_phases_mib": {k: round(v / mib, 1) for k, v in m["phases"].items()}}
                         if "phases" in m else {}),
                      "seconds": m["seconds"]}), flush=True)
    return abs(ratio - 1)


if __name__ == "__main__":
    raise SystemExit(main())
