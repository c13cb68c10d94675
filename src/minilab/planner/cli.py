"""`minilab plan MODEL`: parameters, weights by format, memory and disk plans, and a verdict.

    minilab plan tiny --method full --batch-size 8 --seq-len 512
    minilab plan TinyLlama/TinyLlama-1.1B-Chat-v1.0 --method qlora --target cuda
    minilab plan --compare tinyllama/ phi-2/ gemma-2b/ mistral/ --method qlora --gpu-memory 8GiB
    minilab plan --budget 10m      # what to pretrain in 10 minutes here (planner/budget_plan.py)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from minilab.errors import ConfigError
from minilab.fsutil import format_params, human_bytes
from minilab.planner.anatomy import accelerate_estimate, inspect_model, weight_table
from minilab.planner.disk import DiskRequest, plan_disk
from minilab.planner.machine import machine_resources, verdict, verdict_line
from minilab.planner.memory import METHODS, OPTIMIZERS, PRECISIONS, PlanRequest, plan_memory
from minilab.planner.resolve import build_meta, resolve_model

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'8GB' -> 8e9, '8GiB' -> 8 * 2**30, '512MiB', '1e9'."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read size '{text}' (e.g. 8GB, 8GiB, 512MiB)", key="gpu_memory")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def plan(model: Any, req: PlanRequest | None = None, disk: DiskRequest | None = None, *,
         output_dir: str | Path = ".", memory_budget: int | None = None,
         models_dir: str | None = None) -> dict[str, Any]:
    """The whole plan of one model as plain data (what `minilab plan --json` prints)."""
    spec = resolve_model(model, models_dir)
    an = inspect_model(build_meta(spec))
    req = (req or PlanRequest()).resolved()
    disk = disk or DiskRequest()
    if disk.stored_dtype is None:
        disk = DiskRequest(**{**disk.__dict__, "stored_dtype": spec.stored_dtype,
                              "download": disk.download and spec.stored_dtype is not None})
    mem = plan_memory(an, req)
    dplan = plan_disk(an, req, disk)
    resources = machine_resources(output_dir)
    v = verdict(an, req, mem.total, dplan["peak_bytes"], resources, memory_budget)
    return {"model": spec.name, "source": spec.source, "built_with": spec.kind,
            "params": an.params, "params_by_group": an.groups, "anatomy": an.to_dict(),
            "weights_bytes": weight_table(an), "accelerate_estimate": accelerate_estimate(an),
            "request": req.__dict__, "memory": mem.to_dict(), "disk": dplan, "machine": resources, "verdict": v}


def _fmt_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))).rstrip() for r in rows)


def render(p: dict[str, Any]) -> str:
    """A readable report of one plan."""
    r, g = p["request"], p["params_by_group"]
    out = [f"{p['model']}  ({p['source']}, built with {p['built_with']} on meta)",
           f"parameters  {p['params']:,} ({format_params(p['params'])}): "
           + ", ".join(f"{k} {v:,}" for k, v in g.items() if v)]
    w = p["weights_bytes"]
    out.append("weights     " + ", ".join(f"{k} {human_bytes(v)}" for k, v in w.items())
               + f"  (accelerate estimate-memory says fp32 {human_bytes(p['accelerate_estimate']['fp32'])})")
    what = (f"{r['method']}, batch {r['batch_size']} x seq {r['seq_len']}, {r['precision']}, {r['target']}"
            + (", grad checkpointing" if r["grad_checkpointing"] and r["method"] != "inference" else "")
            + (f", LoRA r={r['lora_rank']}" if r["method"] in ("lora", "qlora") else ""))
    out.append(f"\nmemory: {what}")
    rows = [(x["label"], human_bytes(x["bytes"]), x["note"]) for x in p["memory"]["lines"] if x["bytes"]]
    m = p["memory"]
    rows.append(("peak " + " / ".join(f"{k} {human_bytes(v)}" for k, v in m["phases"].items()),
                 human_bytes(m["peak_bytes"]), "the larger phase"))
    rows.append(("total with runtime", human_bytes(m["total_bytes"]), ""))
    out.append(_fmt_table([("  " + a, b, c) for a, b, c in rows]))
    d = p["disk"]
    out.append("\ndisk:")
    drows = [("  " + x["label"], human_bytes(x["bytes"]), "kept" if x["kept_after_cleanup"] else "cleanup frees")
             for x in d["lines"]]
    drows += [("  peak (everything at once)", human_bytes(d["peak_bytes"]), ""),
              ("  after cleanup", human_bytes(d["after_cleanup_bytes"]), "")]
    out.append(_fmt_table(drows))
    out.append("\nverdict: " + verdict_line(p["verdict"]))
    return "\n".join(out)


def render_compare(plans: list[dict[str, Any]]) -> str:
    keys = ["params", "weights nf4", "weights bf16", "peak memory", "total memory", "disk peak", "fits", "change"]
    rows = [("", *[p["model"] for p in plans])]
    for k in keys:
        vals = []
        for p in plans:
            v = p["verdict"]
            vals.append({"params": format_params(p["params"]), "weights nf4": human_bytes(p["weights_bytes"]["nf4_dq"]),
                         "weights bf16": human_bytes(p["weights_bytes"]["bf16"]),
                         "peak memory": human_bytes(p["memory"]["peak_bytes"]),
                         "total memory": human_bytes(p["memory"]["total_bytes"]),
                         "disk peak": human_bytes(p["disk"]["peak_bytes"]),
                         "fits": "yes" if v["fits"] else "no", "change": v["change"] or "-"}[k])
        rows.append((k, *vals))
    r = plans[0]["request"]
    head = (f"{r['method']}, batch {r['batch_size']} x seq {r['seq_len']}, {r['precision']}, {r['target']}, "
            f"against {plans[0]['verdict']['memory_where']}")
    return head + "\n" + _fmt_table(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    p.add_argument("model", nargs="?", help="preset, architecture JSON, config.json, model dir, registry name, "
                                            "or a hub id in the local HF cache")
    p.add_argument("--method", choices=METHODS, default="full", help="what to plan for (default full)")
    flag(p, "--batch-size", type=int, default=1, metavar="N", help="sequences per micro-batch (default 1)")
    flag(p, "--seq-len", type=int, default=512, metavar="N", help="tokens per sequence / context (default 512)")
    p.add_argument("--precision", choices=PRECISIONS, help="default fp32 on CPU, bf16(-mixed) on CUDA")
    flag(p, "--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
         help="recompute blocks in backward (default on for qlora)")
    p.add_argument("--attention", choices=("sdpa", "flash", "eager"), default="sdpa", help="attention kernel")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    flag(p, "--lora-rank", type=int, default=8, metavar="R")
    flag(p, "--lora-targets", nargs="+", metavar="NAME", help="module names, e.g. q_proj v_proj (default all)")
    p.add_argument("--quant", choices=("int8", "nf4"), help="inference weights format")
    p.add_argument("--target", choices=("cpu", "cuda", "auto"), default="auto", help="where the run happens")
    flag(p, "--gpu-memory", metavar="SIZE", help="judge against a card of this size (e.g. 8GB); implies cuda")
    flag(p, "--output-dir", default=".", metavar="DIR", help="where the run writes (free disk is checked there)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (disk plan)")
    flag(p, "--keep-last", type=int, default=2, metavar="K", help="checkpoints kept (plus the best)")
    flag(p, "--models-dir", metavar="DIR", help="registry root for registry names")
    p.add_argument("--compare", nargs="+", metavar="MODEL", help="plan several models side by side")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--budget", metavar="DURATION", help="instead: what to pretrain in this time on this machine (10m, "
                                                       "1.5h): architecture, vocabulary, batch, steps and the expected "
                                                       "held-out bits per byte, from the speedrun's measured scaling")
    p.add_argument("--scaling", metavar="FILE", help="with --budget: a scaling file written by `benchmarks/speedrun.py "
                                                     "--scaling-out` (e.g. on your own text); default the shipped one")


def plan_for_budget(args: argparse.Namespace) -> int:
    from minilab.budget import parse_duration
    from minilab.planner.budget_plan import SCALING_FILE, load_scaling, plan_budget, render_budget

    if args.model or args.compare:
        raise ConfigError("plans a pretraining run from scratch: give no MODEL or --compare with it", key="--budget")
    try:
        seconds = parse_duration(args.budget)
    except ValueError as e:
        raise ConfigError(str(e), key="--budget") from None
    p = plan_budget(seconds, load_scaling(args.scaling or SCALING_FILE))
    print(json.dumps(p, indent=2) if args.json else render_budget(p))
    return 0


def main(args: argparse.Namespace) -> int:
    import torch

    if args.budget:
        return plan_for_budget(args)
    models = args.compare or ([args.model] if args.model else [])
    if not models:
        raise ConfigError("give a MODEL, --compare MODEL ... or --budget DURATION", key="model")
    budget = parse_size(args.gpu_memory) if args.gpu_memory else None
    target = "cuda" if budget else args.target
    if target == "auto":
        target = "cuda" if torch.cuda.is_available() else "cpu"
    req = PlanRequest(method=args.method, batch_size=args.batch_size, seq_len=args.seq_len,
                      precision=args.precision, grad_checkpointing=args.grad_checkpointing,
                      attention=args.attention, optimizer=args.optimizer, lora_rank=args.lora_rank,
                      lora_targets=args.lora_targets, quant=args.quant, target=target)
    disk = DiskRequest(steps=args.steps, keep_last=args.keep_last)
    plans = [plan(m, req, disk, output_dir=args.output_dir, memory_budget=budget, models_dir=args.models_dir)
             for m in models]
    if args.json:
        print(json.dumps(plans if args.compare else plans[0], indent=2, default=str))
    elif args.compare:
        print(render_compare(plans))
    else:
        print(render(plans[0]))
    return 0
