"""`minilab verify-resume`: prove, on your own config, that an interrupted run resumes exactly.

It trains the config for N steps once without interruption, and once with a hard kill (SIGKILL,
right after the checkpoint at step N/2) followed by `--resume auto`, each in its own process.
Then it compares every step's training loss and the final weights: on CPU they must be bitwise
equal; on CUDA, whose kernels may reduce in a different order from run to run, within a stated
tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from minilab.cliargs import config_from_args, flag
from minilab.config import to_dict
from minilab.errors import MinilabError
from minilab.fsutil import write_json_atomic
from minilab.pretrain import CONFIG_FLAGS, PretrainConfig
from minilab.pretrain import add_arguments as add_pretrain_arguments

CUDA_TOLERANCE = 1e-3  # absolute, on losses and weights, when the run trains on CUDA


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pretrain_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="steps to train each way (default 20)")
    flag(p, "--work-dir", help="where the two runs go (default: a temporary directory, removed after)")


def _train(cfg: PretrainConfig, out: Path, resume: bool = False) -> int:
    cfg_file = out.parent / f"{out.name}.json"
    write_json_atomic(cfg_file, to_dict(dataclasses.replace(cfg, output_dir=str(out))))
    cmd = [sys.executable, "-m", "minilab", "pretrain", "--config", str(cfg_file), "--log-level", "warning"]
    proc = subprocess.run(cmd + (["--resume", "auto"] if resume else []), capture_output=True, text=True)
    if proc.returncode not in (0, -signal.SIGKILL):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MinilabError(f"training run in {out} failed (exit {proc.returncode}): {tail}")
    return proc.returncode


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def compare(ref: Path, resumed: Path, tolerance: float) -> dict:
    """Step-by-step losses and final weights of two runs; `tolerance` 0 means bitwise."""
    from safetensors.torch import load_file

    a, b = _losses(ref), _losses(resumed)
    loss_diff = max((abs(a[s] - b[s]) for s in a if s in b), default=float("inf"))
    wa = load_file(str(ref / "final" / "model.safetensors"))
    wb = load_file(str(resumed / "final" / "model.safetensors"))
    same_keys = wa.keys() == wb.keys()
    weight_diff = max(((wa[k].float() - wb[k].float()).abs().max().item() for k in wa), default=0.0) \
        if same_keys else float("inf")
    ok = sorted(a) == sorted(b) and same_keys and loss_diff <= tolerance and weight_diff <= tolerance
    return {"match": ok, "steps": len(a), "max_loss_diff": loss_diff, "max_weight_diff": weight_diff,
            "tolerance": tolerance}


def verify(cfg: PretrainConfig, steps: int, work: Path) -> dict:
    if steps < 2:
        raise MinilabError("--steps must be at least 2 (the run is interrupted at steps / 2)")
    half = steps // 2
    # A time budget's length depends on the clock: verified here as --steps steps (same lr shape).
    cfg = dataclasses.replace(cfg, max_steps=steps, register=False, tensorboard=False, interrupt_at_step=None,
                              time_budget=None)
    _train(cfg, work / "uninterrupted")
    code = _train(dataclasses.replace(cfg, interrupt_at_step=half), work / "interrupted")
    if code != -signal.SIGKILL:
        raise MinilabError(f"the run to interrupt did not stop at step {half} (exit {code})")
    _train(cfg, work / "interrupted", resume=True)
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return {**compare(work / "uninterrupted", work / "interrupted", CUDA_TOLERANCE if cuda else 0.0),
            "killed_at": half}


def main(args: argparse.Namespace) -> int:
    for flag_name, given in (("--resume", args.resume), ("--dry-run", args.dry_run)):
        if given:  # pretrain's flags that mean nothing here: refused, not silently ignored
            raise MinilabError(f"verify-resume does not take {flag_name}: it runs its own straight, killed and "
                               "resumed runs (--steps each, in --work-dir); drop it")
    args.output_dir = args.output_dir or "verify-resume"  # each run gets its own directory below
    cfg = config_from_args(PretrainConfig, args, CONFIG_FLAGS)
    if args.work_dir:
        result = verify(cfg, args.steps, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="minilab-verify-") as tmp:
            result = verify(cfg, args.steps, Path(tmp))
    how = "bitwise" if result["tolerance"] == 0 else f"within {result['tolerance']:g}"
    print(f"trained {args.steps} steps straight, and {result['killed_at']} steps + SIGKILL + resume: "
          f"max loss difference {result['max_loss_diff']:.3g}, max weight difference {result['max_weight_diff']:.3g}")
    if result["match"]:
        print(f"exact resume: YES ({how}, {result['steps']} steps compared)")
        return 0
    print(f"exact resume: NO (required {how})")
    return 1
