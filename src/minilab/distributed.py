"""Running the same training command on several processes (torchrun / accelerate launch).

`torchrun --nproc_per_node=N -m minilab pretrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
`init()` reads them, joins the process group (NCCL on CUDA, gloo on CPU) and picks this rank's
device. Without those variables everything here is a no-op for a single process, so the loops
call it unconditionally.

Data parallelism is DistributedDataParallel by default: each rank holds the whole model and reads a
disjoint share of the data stream; gradients are averaged in backward. `parallel="fsdp"` shards
instead with FSDP2 (`fully_shard` on every transformer block, then the root): parameters,
gradients and AdamW state are split over the ranks and gathered one block at a time, for models
whose training state does not fit one device; the update is the same as DDP's. Only rank 0 writes
logs, checkpoints and the final model; every rank resumes from rank 0's checkpoint. Checkpoints
are full (unsharded) state dicts in either mode: `full_state` gathers them from FSDP onto rank 0's
CPU in the plain optimizer format, and `load_full_model_state`/`load_full_optimizer_state` shard
them back: a checkpoint saved under FSDP loads under FSDP, DDP or one process, and vice versa
(`--resume` itself keeps the number of ranks, which the data stream's saved position requires).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

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


def wrap(model: nn.Module, info: DistInfo, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """The module the training loop calls: the model itself (one process), DDP around it, or
    (`parallel="fsdp"`) the model sharded in place by FSDP2 and returned. Build the optimizer after
    this call: FSDP2 replaces the parameters with sharded DTensors."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        # One unit per block (its weights are gathered for its forward/backward only, then freed),
        # the root last: embeddings, final norm and the (possibly tied) head.
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if parallel != "ddp":
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', not {parallel!r}")
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # under torch.compile


def is_fsdp(model: nn.Module) -> bool:
    """True for a model sharded by `wrap(..., parallel="fsdp")` (or torch.compile around one)."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(_inner(model), FSDPModule)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(wrapped: nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
    micro-batch of an accumulated step. FSDP2 then accumulates unsharded gradients until the
    last micro-batch reduce-scatters their sum: fewer collectives, more memory."""
    if last_micro_step:
        return contextlib.nullcontext()
    if is_fsdp(wrapped):
        return _fsdp_no_sync(_inner(wrapped))
    if not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


# ---- full (unsharded) state of an FSDP model: checkpoints and the final export ------------------
def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (a tied head shares the embedding's parameter and name)."""
    names: dict[int, str] = {}
    for name, p in _inner(model).named_parameters():
        names.setdefault(id(p), name)
    return names


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Gather an FSDP model's full weights (and the optimizer's full state) onto rank 0's CPU.

    A collective: every rank calls it; rank 0 gets the tensors, the others empty dicts. The
    optimizer state comes back in `optimizer.state_dict()`'s own format (parameters numbered in
    param-group order), so the file is the one a single process writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _inner(model)
    options = _full_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights, None
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    if not osd:
        return weights, {}
    index = {name: i for i, name in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    return weights, {"state": {index[name]: s for name, s in osd["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                      for g in osd["param_groups"]]}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (every rank passes the same dict) into an FSDP model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(_inner(model), state, options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a plain `optimizer.state_dict()` (from any run: one process, DDP or FSDP) into the
    optimizer of an FSDP model; every rank passes the same dict and keeps its shard of the state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model = _inner(model)
    by_id = _param_names(model)
    names = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the saved optimizer state has a different number of parameters than this model")
    osd = {"state": {names[int(i)]: s for i, s in state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=_full_options())


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
