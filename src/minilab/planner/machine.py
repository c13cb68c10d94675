"""What this machine has (free disk on the target path, RAM, VRAM) and the verdict against a plan.

`disk_usage` is a module-level hook (default `shutil.disk_usage`) so tests and the preflight can
be exercised against a fake small disk without filling a real one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from minilab.errors import MinilabError
from minilab.fsutil import human_bytes

disk_usage: Callable[[str], Any] = shutil.disk_usage


def existing_parent(path: str | Path) -> Path:
    """`path` or its nearest existing ancestor (a run directory usually does not exist yet)."""
    p = Path(path).expanduser().absolute()
    return p if p.exists() else next(q for q in p.parents if q.exists())


def free_disk(path: str | Path) -> tuple[Path, int]:
    probe = existing_parent(path)
    return probe, int(disk_usage(str(probe)).free)


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else psutil."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def free_vram(device: torch.device | str | None = None) -> int | None:
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def machine_resources(path: str | Path = ".") -> dict[str, Any]:
    probe, disk = free_disk(path)
    return {"disk_path": str(probe), "free_disk": disk, "available_ram": available_ram(),
            "free_vram": free_vram(), "cuda": torch.cuda.is_available()}


# ---- verdict ------------------------------------------------------------------------------------
# Changes tried in order, cheapest for the user first; the first one that fits is reported.
def _candidates(req) -> list[tuple[str, Any]]:
    out = []
    if req.method != "inference" and not req.grad_checkpointing:
        out.append(("--grad-checkpointing", replace(req, grad_checkpointing=True)))
    b = req.batch_size
    while b > 1:
        b //= 2
        out.append((f"--batch-size {b} (+ gradient accumulation)",
                    replace(req, batch_size=b, grad_checkpointing=req.grad_checkpointing or req.method != "inference")))
    if req.method == "full" and req.optimizer == "adamw":
        out.append(("--optimizer adamw-8bit", replace(req, optimizer="adamw-8bit", batch_size=1,
                                                       grad_checkpointing=True)))
    if req.method == "full":
        out.append(("--method lora", replace(req, method="lora", batch_size=1, grad_checkpointing=True)))
    if req.method in ("full", "lora"):
        out.append(("--method qlora (4-bit base)", replace(req, method="qlora", batch_size=1,
                                                            grad_checkpointing=True, precision=None)))
    if req.method == "inference" and req.quant != "nf4":
        out.append(("--quant nf4", replace(req, quant="nf4")))
    s = req.seq_len
    while s > 256:
        s //= 2
        out.append((f"--seq-len {s}", replace(req, seq_len=s, batch_size=1, grad_checkpointing=True)))
    return out


def verdict(an, req, memory_total: int, disk_total: int, resources: dict[str, Any],
            memory_budget: int | None = None) -> dict[str, Any]:
    """Does the plan fit? If not, the first change that makes memory fit, and where disk fails."""
    from minilab.planner.memory import plan_memory

    if memory_budget is not None:
        have, where = memory_budget, "memory budget"
    elif req.target == "cuda":
        have, where = resources.get("free_vram"), "free GPU memory"
    else:
        have, where = resources.get("available_ram"), "available RAM"
    result: dict[str, Any] = {"memory_needed": memory_total, "memory_available": have, "memory_where": where,
                              "disk_needed": disk_total, "disk_free": resources.get("free_disk"),
                              "disk_path": resources.get("disk_path")}
    mem_ok = have is None or memory_total <= have
    disk_ok = resources.get("free_disk") is None or disk_total <= resources["free_disk"]
    result.update(memory_fits=mem_ok, disk_fits=disk_ok, fits=mem_ok and disk_ok, change=None)
    if not mem_ok:
        for flag, changed in _candidates(req.resolved()):
            total = plan_memory(an, changed).total
            if total <= have:
                result["change"] = f"{flag}: about {human_bytes(total)}"
                break
        else:
            result["change"] = "a smaller model, or a machine with more memory"
    elif not disk_ok:
        result["change"] = "another output directory on a bigger disk, or fewer kept checkpoints (--keep-last)"
    return result


def verdict_line(v: dict[str, Any]) -> str:
    if v["fits"]:
        have = f"{human_bytes(v['memory_available'])} {v['memory_where']}" if v["memory_available"] else "unknown"
        return f"fits: needs {human_bytes(v['memory_needed'])} of {have}; disk {human_bytes(v['disk_needed'])}"
    if not v["memory_fits"]:
        return (f"does not fit: needs {human_bytes(v['memory_needed'])}, {human_bytes(v['memory_available'])} "
                f"{v['memory_where']}; first change: {v['change']}")
    return (f"does not fit on disk: writes {human_bytes(v['disk_needed'])}, {human_bytes(v['disk_free'])} free at "
            f"{v['disk_path']}; first change: {v['change']}")


# ---- preflight (training stages) ------------------------------------------------------------------
def preflight(est: dict[str, int], output_dir: str | Path, device: torch.device,
              hint: str = "lower batch_size (raise grad_accum) or enable model.gradient_checkpointing") -> None:
    """Stop before a run writes anything if it cannot fit the free disk or memory (one line
    ending with `hint`, what to change)."""
    probe, free = free_disk(output_dir)
    if est["disk"] > free:
        raise MinilabError(f"not enough disk at {probe}: the run writes about {human_bytes(est['disk'])}, "
                           f"{human_bytes(free)} free; lower keep_last or choose another output_dir")
    if device.type == "cuda":
        free_mem, where = free_vram(device), "GPU memory"
    else:
        free_mem, where = available_ram(), "RAM"
    if free_mem is not None and est["memory"] > free_mem:
        raise MinilabError(f"not enough {where}: the run needs about {human_bytes(est['memory'])}, "
                           f"{human_bytes(free_mem)} free; {hint}")
