"""The disk plan of a run: everything it downloads and writes, at its peak and after cleanup.

Sizes are exact byte counts of what minilab writes (safetensors = tensor bytes + a small JSON
header; `optimizer.pt` = AdamW's two fp32 moments, plus the fp32 master weights when the model
trains in 16-bit) except logs, which are estimated per logged step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from minilab.planner.anatomy import DTYPE_BYTES, Anatomy, weight_bytes
from minilab.planner.memory import OPTIMIZER_STATE, PlanRequest, lora_params, plan_memory

HEADER = 64 * 1024           # safetensors JSON header, config/tokenizer/meta/rng files: KB range
LOG_LINE = 220               # one metrics.jsonl line (step, loss, lr, grad norm, throughput ...)


@dataclass
class DiskRequest:
    steps: int = 1000
    ckpt_every: int = 100
    keep_last: int = 2
    keep_best: bool = True
    dataset_tokens: int | None = None     # None: steps x batch x seq (one epoch of what the run reads)
    download: bool = True                 # the base model is fetched into the HF cache first
    stored_dtype: str | None = None       # dtype of the downloaded weights (config.json)


@dataclass
class DiskLine:
    key: str
    label: str
    bytes: int
    kept_after_cleanup: bool
    note: str = ""


def _checkpoint_sizes(an: Anatomy, req: PlanRequest) -> tuple[int, int, int]:
    """(weights part, optimizer part, trainable params) of one checkpoint."""
    if req.method == "full":
        trainable = an.params
        w16 = req.precision in ("bf16", "fp16")
        weights = an.params * (2 if w16 else 4)
        optim = int(OPTIMIZER_STATE[req.optimizer] * trainable) + (4 * trainable if w16 else 0)
    else:
        trainable = lora_params(an, req.lora_rank, req.lora_targets)
        weights = 4 * trainable                   # PEFT saves fp32 adapters
        optim = int(OPTIMIZER_STATE[req.optimizer] * trainable)
    return weights + HEADER, optim, trainable


def plan_disk(an: Anatomy, req: PlanRequest, disk: DiskRequest | None = None) -> dict[str, Any]:
    """Lines of the disk plan plus `peak_bytes` (everything at once) and `after_cleanup_bytes`."""
    req, disk = req.resolved(), disk or DiskRequest()
    lines: list[DiskLine] = []
    if disk.download and req.method != "inference" or disk.download and disk.stored_dtype:
        stored = DTYPE_BYTES.get(str(disk.stored_dtype or "bf16").removeprefix("torch."), 2)
        lines.append(DiskLine("download", "base model download (one format)", an.params * stored + HEADER, True,
                              "repos shipping .bin + .safetensors take 2-3x with a whole-repo download"))
    if req.method != "inference":
        tokens = disk.dataset_tokens or disk.steps * req.batch_size * req.seq_len
        itemsize = 2 if an.vocab <= 65536 else 4        # minilab pack: uint16 ids when the vocab fits
        lines.append(DiskLine("packed_data", f"packed data ({tokens:,} tokens)", tokens * itemsize + HEADER, True))
        weights, optim, trainable = _checkpoint_sizes(an, req)
        n_ckpt = min(disk.keep_last + (1 if disk.keep_best else 0), max(1, disk.steps // disk.ckpt_every))
        lines += [DiskLine("checkpoints", f"checkpoints x {n_ckpt}, weights", n_ckpt * weights, False,
                           f"{weights:,} B each"),
                  DiskLine("checkpoint_optimizer", f"checkpoints x {n_ckpt}, optimizer state", n_ckpt * optim, False,
                           "removed by 'minilab cleanup --strip-optimizer'"),
                  DiskLine("kept_checkpoint", "one checkpoint kept, without optimizer state", weights, True),
                  DiskLine("logs", "metrics and logs", disk.steps * LOG_LINE, True)]
        if req.method == "full":
            lines.append(DiskLine("final", "final model (bf16 safetensors)", weight_bytes(an, "bf16") + HEADER, True))
        else:
            lines += [DiskLine("adapters", "adapters (PEFT, fp32)", 4 * trainable + HEADER, True),
                      DiskLine("merged", "merged model (bf16)", weight_bytes(an, "bf16") + HEADER, True)]
    lines += [DiskLine("export_int8", "quantized export (int8)", weight_bytes(an, "int8") + HEADER, True),
              DiskLine("export_nf4", "quantized export (nf4)", weight_bytes(an, "nf4") + HEADER, True)]
    peak = sum(x.bytes for x in lines if x.key != "kept_checkpoint")
    after = sum(x.bytes for x in lines if x.kept_after_cleanup)
    return {"lines": [asdict(x) for x in lines], "peak_bytes": peak, "after_cleanup_bytes": after}


def pretrain_disk(params: int, keep_last: int, steps: int, ckpt_every: int, fp32: bool = True) -> int:
    """Bytes a `minilab pretrain` run writes: (keep_last + best) checkpoints of weights and AdamW
    state, the final model and logs (its packed data exists already)."""
    wb = 4 if fp32 else 2
    n_ckpt = min(keep_last + 1, max(1, steps // ckpt_every) + 1)
    ckpt = params * wb + 8 * params + HEADER
    return n_ckpt * ckpt + params * wb + HEADER + steps * LOG_LINE * 2


def estimate_pretrain(model: Any, batch_size: int, seq_len: int, precision: str, keep_last: int,
                      steps: int, ckpt_every: int, target: str | None = None, shards: int = 1) -> dict[str, int]:
    """`{"memory", "disk", "params"}` of a `minilab pretrain` run (its preflight estimate): the
    planner's full fine-tuning peak (fp32 weights, AdamW, activations per the model's own
    gradient-checkpointing setting) plus the runtime line, and `pretrain_disk`. `target` (cpu or
    cuda) defaults to where the model's parameters are. `shards` > 1: the memory of one FSDP
    rank (`fsdp_memory`)."""
    from minilab.planner.anatomy import inspect_model

    an = inspect_model(model)
    device = next(model.parameters()).device.type
    req = PlanRequest(method="full", batch_size=batch_size, seq_len=seq_len,
                      precision="fp32" if precision == "fp32" else f"{precision}-mixed",
                      grad_checkpointing=bool(getattr(model.config, "gradient_checkpointing", False)),
                      target=target or ("cuda" if device == "cuda" else "cpu"))
    mem = plan_memory(an, req)
    memory = mem.total if shards <= 1 else fsdp_memory(an, mem, shards)
    return {"memory": memory, "disk": pretrain_disk(an.params, keep_last, steps, ckpt_every),
            "params": an.params}


def fsdp_memory(an: Anatomy, mem: Any, shards: int) -> int:
    """Peak memory of one rank when FSDP2 shards the model as `distributed.wrap` does (one unit per
    block, the root last) over `shards` ranks. Weights, gradients, AdamW state and the fp32 master
    are split over the ranks; unsplit are the activations and logits (each rank's own batch), the
    root unit's parameters (embeddings, final norm, head: gathered for the whole forward and
    backward, as FSDP2 keeps the root unresharded after forward), two blocks gathered at once
    (the running one and the prefetched next) and one block's unsharded gradients before their
    reduce-scatter. Not calibrated against a measured FSDP run (no multi-GPU machine here)."""
    by_key = {line.key: line.bytes for line in mem.lines}
    state = sum(by_key.get(k, 0) for k in ("weights", "grads", "optimizer", "master", "step_tmp", "autocast"))
    wbytes = by_key.get("weights", 0) / max(1, an.params)  # bytes per weight as held
    root = an.groups["embeddings"] + an.groups["head"]
    block = (an.params - root) / max(1, an.n_layer)
    gathered = wbytes * (root + 2 * block) + 4 * block
    work = by_key.get("activations", 0) + by_key.get("logits", 0)
    return int(state / shards + gathered + work + mem.runtime)


def finetune_disk(trainable: int, keep_last: int, final_bytes: int) -> int:
    """Bytes a `minilab sft`/`dpo` run writes: (keep_last + best) checkpoints of the trainable
    weights with their AdamW state (fp32: 12 B a parameter), the final model or adapters, logs."""
    return (keep_last + 1) * (12 * trainable + HEADER) + final_bytes + HEADER + 16 * 2**20


def estimate_finetune(an: Any, *, method: str, batch_size: int, seq_len: int, precision: str,
                      lora_rank: int, lora_targets: list[str] | None, grad_checkpointing: bool, keep_last: int,
                      target: str, weights_held: int | None = None, trainable: int | None = None,
                      final_bytes: int | None = None) -> dict[str, int]:
    """`{"memory", "disk", ...}` of a fine-tuning run (its preflight estimate, and the recipe's):
    the planner's peak for `method` (gradients, AdamW state, activations with or without
    checkpointing, logits, QLoRA's dequantized temporaries, LoRA temporaries) plus the runtime
    line. A loaded run knows better than the planner what its weights hold: `weights_held`
    replaces the planner's weight lines, `trainable` and `final_bytes` its counts. `an` is the
    anatomy of the base before adapters; `precision` as in `PlanRequest`."""
    req = PlanRequest(method=method, batch_size=batch_size, seq_len=seq_len, precision=precision,
                      grad_checkpointing=grad_checkpointing, lora_rank=lora_rank, lora_targets=lora_targets,
                      target=target)
    mem = plan_memory(an, req)
    memory = mem.total
    if weights_held is not None:
        memory += weights_held - sum(line.bytes for line in mem.lines if line.key in ("weights", "upcast"))
    trainable = mem.trainable_params if trainable is None else trainable
    if final_bytes is None:
        final_bytes = 4 * trainable if method != "full" else 4 * an.params
    return {"memory": memory, "disk": finetune_disk(trainable, keep_last, final_bytes),
            "params": an.params, "trainable": trainable, "planned_trainable": mem.trainable_params}
