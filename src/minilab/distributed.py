"""Running the same training command on several processes (torchrun / accelerate launch).

`torchrun --nproc_per_node=N -m minilab pretrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
`init()` reads them, joins the process group (NCCL on CUDA, gloo on CPU) and picks this rank's
device. Without those variables everything here is a no-op for a single process, so the loops
call it unconditionally.

Data parallelism is DistributedDataParallel: each rank holds the whole model and reads a disjoint
share of the data stream; gradients are averaged in backward. Only rank 0 writes logs,
checkpoints and the final model; every rank resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; return (info, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The module the training loop calls: the model itself, or DDP around it."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(wrapped: nn.Module, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if last_micro_step or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def all_reduce_sum(value: float | int, info: DistInfo, device: torch.device) -> float:
    """Sum a Python number over ranks (a no-op for one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
