"""Small, numerically sensitive helpers shared by every training loop (pretrain, SFT, DPO).

Kept in one place so the loops cannot drift apart: the LR schedule, AdamW parameter groups,
token-normalised gradient accumulation, precision contexts, device choice, and the metrics
log. Each loop stays explicit and readable; only these pieces are shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minilab import linear_ce
from minilab.errors import ConfigError, MinilabError


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "muon"] = field(default="adamw", metadata={
        "help": "adamw; muon: Muon on the blocks' matrices, AdamW on embeddings, head and norms, one lr "
                "(minilab.optimizers)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "the final lr (cosine floor, end of the wsd decay) as a fraction of lr"})
    warmup_frac: float = field(default=0.1, metadata={"help": "linear warmup, as a fraction of max_steps"})
    schedule: Literal["cosine", "wsd"] = field(default="cosine", metadata={
        "help": "lr shape after warmup: cosine (down to min_lr_ratio * lr over the remaining steps) or wsd "
                "(warmup-stable-decay, a trapezoid: lr held until the last decay_frac of the steps, then a "
                "straight line down to min_lr_ratio * lr at the last step)"})
    decay_frac: float = field(default=0.2, metadata={
        "help": "wsd: the final linear decay, as a fraction of max_steps (cosine ignores it)", "min": 0, "max": 1})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (never on norms/embeddings)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW decay rate of the gradient's running mean"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW decay rate of the squared gradient's running mean"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon added to the update's denominator (stability)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables clipping"})

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("must be positive", key="lr")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("must be within [0, 1]", key="min_lr_ratio")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError("must be within [0, 1)", key="warmup_frac")
        if self.schedule == "wsd" and self.warmup_frac + self.decay_frac > 1:
            raise ConfigError(f"warmup_frac + decay_frac must be at most 1 with the wsd schedule, got "
                              f"{self.warmup_frac} + {self.decay_frac}", key="decay_frac")


@dataclass(frozen=True)
class Schedule:
    """A run's LR schedule as explicit step counts: `warmup` steps of linear warmup, then (cosine)
    a cosine down to the floor at `max_steps`, or (wsd) the peak held until `decay_start` and a
    straight line down to the floor at the last step, `max_steps - 1`.

    `Schedule.of(max_steps, optim)` derives the counts from the fractions; a time-budgeted run
    keeps its own (the warmup fixed at the first plan, `decay_start` and `max_steps` re-planned
    during the stable phase) and saves them in every checkpoint, so a resume never re-derives them.
    """

    max_steps: int
    warmup: int
    decay_start: int  # wsd: the first step of the final decay; cosine: unused (= max_steps)
    shape: str = "cosine"

    @classmethod
    def of(cls, max_steps: int, cfg: OptimConfig) -> Schedule:
        warmup = int(cfg.warmup_frac * max_steps)
        decay = cls.decay_steps(max_steps, cfg) if cfg.schedule == "wsd" else 0
        return cls(max_steps, warmup, max(warmup, max_steps - decay), cfg.schedule)

    @staticmethod
    def decay_steps(max_steps: int, cfg: OptimConfig) -> int:
        """wsd's final decay: `decay_frac` of the steps, at least one unless decay_frac is 0 (so
        the last step is at the floor however short the run)."""
        return max(1, int(cfg.decay_frac * max_steps)) if cfg.decay_frac > 0 else 0

    def lr(self, step: int, cfg: OptimConfig) -> float:
        if step < self.warmup:
            return cfg.lr * (step + 1) / (self.warmup + 1)
        floor = cfg.lr * cfg.min_lr_ratio
        if self.shape == "wsd":
            if step < self.decay_start:
                return cfg.lr
            decay = max(1, self.max_steps - self.decay_start)  # step decay_start - 1 is the last at the peak
            return max(floor, cfg.lr - (cfg.lr - floor) * (step - self.decay_start + 1) / decay)
        progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return {"max_steps": self.max_steps, "warmup": self.warmup, "decay_start": self.decay_start,
                "shape": self.shape}


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """The lr of optimizer step `step` (counted from 0) in a run of `max_steps`: linear warmup to
    `lr` over `warmup_frac * max_steps` steps, then `cfg.schedule`'s shape (see `Schedule`).

    Warmup reaches the peak at step `warmup` (not before), so step 0 trains with a small but
    non-zero rate. Cosine reaches `lr * min_lr_ratio` at `max_steps` (one past the last step);
    wsd reaches it at the last step, `max_steps - 1`.
    """
    return Schedule.of(max_steps, cfg).lr(step, cfg)


def eval_due(step: int, eval_every: int, max_steps: int) -> bool:
    """Whether validation follows optimizer step `step` (steps done so far): every `eval_every`
    steps and after the last. It runs before that step's checkpoint is saved, so the checkpoint
    carries the val loss of its own weights (see `checkpoint_val_meta`)."""
    return step % eval_every == 0 or step == max_steps


def checkpoint_val_meta(last_eval: dict, eval_step: int, step: int, best: float) -> dict:
    """The val fields of a checkpoint's meta at `step`. Its val loss (also the retention metric
    that keeps the best checkpoint) only when `last_eval` measured these very weights; a checkpoint
    between evals gets none, and can never be ranked by a neighbour's loss."""
    val = last_eval.get("val_loss") if eval_step == step else None
    return {"best_val_loss": best, "val_loss": val, "val_step": step if val is not None else -1}


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D+ weights except embeddings; none on norms and embeddings
    (`optimizer: muon`: the blocks' matrices go to Muon instead, `minilab.optimizers`).

    The fused kernel on CUDA and on CPU too: on CPU it is one pass over each tensor, measured 6x
    faster than the foreach implementation here (7 ms against 45 ms a step for the `tiny` shape on
    one thread), whose dozen elementwise ops per step each pay a thread barrier (with a busy
    second core, 0.4 s against 2.9 s).
    """
    from minilab.optimizers import MuonAdamW, adamw_groups, trainable

    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "muon":
        return MuonAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                         eps=cfg.eps, fused=fused)
    groups = adamw_groups(trainable(model), cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MinilabError("device 'cuda' asked for but CUDA is not available here; use --set device=cpu")
    return dev


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CPU and CUDA, fp16 autocast on CUDA (with a GradScaler), fp32 none."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise MinilabError("precision fp16 needs CUDA (it needs a grad scaler); use bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 (divide by the accumulated token count, not per micro-batch)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def fuses_loss(model: nn.Module) -> bool:
    """Whether `model(x, targets=y)` gives the loss (summed, or per token with `reduction="none"`)
    with the head fused (`minilab.linear_ce`): minilab's Transformer, also under DDP, FSDP or PEFT's
    LoRA wrapper, and transformers models of the architectures `linear_ce.hf_fuses_loss` knows
    (`LogitsOnly`); not under torch.compile, nor with `linear_ce.FUSE` off."""
    if not linear_ce.FUSE:
        return False
    inner = linear_ce.peft_base(getattr(model, "module", model))  # DDP; FSDP2 keeps the class (a subclass)
    return callable(getattr(type(inner), "fused_loss", None)) and inner.fused_loss()


def micro_batch_loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
                         device: torch.device, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token loss of one micro-batch (training, and evaluation under no_grad), under
    `precision`'s autocast: head and loss fused where `fuses_loss`, else the logits, then
    `token_loss_sum`."""
    with autocast_context(precision, device):
        if fuses_loss(model):
            return model(x, targets=y, ignore_index=ignore_index)
        logits = model(x)
    return token_loss_sum(logits, y, ignore_index)


def count_targets(targets, ignore_index: int = -100) -> int:
    """Trained tokens of target tensors: the positions not at `ignore_index`. What token-normalised
    accumulation divides by and what every loop's `tokens_seen` counts."""
    return sum(int((y != ignore_index).sum()) for y in targets)


def step_tokens(local: int, info, device: torch.device) -> int:
    """The trained tokens of one optimizer step over every rank, from this rank's `local` count:
    one all-reduce, whose sum advances `tokens_seen` and (divided by the ranks) normalises the
    gradients of `accumulate_gradients`."""
    from minilab import distributed

    return int(distributed.all_reduce_sum(local, info, device))


def throughput(count: float, seconds: float) -> float:
    """Items (tokens, pairs) per second of a step: the one formula behind every loop's
    `tokens_per_s` / `pairs_per_s` metric and progress bar."""
    return count / max(seconds, 1e-9)


def accumulate_gradients(model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         precision: str, device: torch.device, scaler=None, ignore_index: int = -100,
                         normalizer: float | None = None, sync=None) -> tuple[float, int]:
    """Forward/backward every micro-batch, normalising by the tokens of the whole step.

    Dividing each micro-batch's summed loss by the step's total target count makes
    batch 8 x accumulation 1 and batch 2 x accumulation 4 the same update (up to float
    rounding), also when micro-batches hold different numbers of valid targets. Under DDP the
    caller passes `normalizer` (global tokens / ranks) and `sync(last)`, a context that skips the
    gradient all-reduce on all but the last micro-batch. Returns (loss per token, local tokens).
    """
    n_tokens = count_targets((y for _, y in micro_batches), ignore_index)
    denom = normalizer if normalizer is not None else n_tokens
    if denom == 0:
        raise MinilabError("a training step has no target tokens (every label is masked)")
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with sync(i == len(micro_batches) - 1) if sync is not None else contextlib.nullcontext():
            loss = micro_batch_loss_sum(model, x, y, precision, device, ignore_index) / denom
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    return total, n_tokens


def token_step(model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
               device: torch.device, scaler, info) -> tuple[float, int]:
    """Forward/backward of one optimizer step's micro-batches (pretrain and SFT alike), before the
    optimizer step; returns (loss per token averaged over ranks, the step's trained tokens over
    every rank). DDP and FSDP average gradients over ranks; dividing by (global tokens / ranks)
    makes the result the mean over every token of the global batch, as one process would compute."""
    from minilab import distributed

    tokens = step_tokens(count_targets(y for _, y in micro_batches), info, device)
    loss, _ = accumulate_gradients(model, micro_batches, precision, device, scaler,
                                   normalizer=tokens / info.world_size,
                                   sync=lambda last: distributed.no_sync(model, last))
    return distributed.all_reduce_sum(loss, info, device) / info.world_size, tokens


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, grad_clip: float) -> float:
    """Unscale (fp16), clip the global grad norm of the trainable parameters, step, zero the
    grads; returns the norm before clipping. Shared so every loop clips and steps alike."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed log-probability of each row's target tokens, (B, T, V) x (B, T) -> (B,), in fp32.
    The quantity DPO compares between policy and reference (positions at ignore_index add 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != ignore_index
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def model_sequence_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
                            device: torch.device) -> torch.Tensor:
    """`sequence_logprobs` of `model` on inputs x (B, T), under `precision`'s autocast: the head
    fused with the loss, per token, where `fuses_loss` (no logits), else through the logits."""
    fused = fuses_loss(model)
    with autocast_context(precision, device):
        out = model(x, targets=y, reduction="none") if fused else model(x)
    return -out.sum(-1) if fused else sequence_logprobs(out, y)


class DivergedError(MinilabError):
    """A loss or the weights became nan/inf: the run stops, no final model, nothing registered."""


def _diverged(what: str, step: int, ckpt_dir: Path) -> DivergedError:
    from minilab.checkpoint_index import latest_checkpoint

    last = latest_checkpoint(ckpt_dir)
    kept = (f"the last good checkpoint {last} is kept (lower optim.lr, then --resume {last})" if last
            else "no checkpoint had been written (lower optim.lr and start again)")
    return DivergedError(f"{what} at step {step}: training diverged and stopped; no final model written or "
                         f"registered; {kept}")


def check_finite_loss(value: float | None, what: str, step: int, ckpt_dir: Path) -> None:
    """Stop the run with a one-line `DivergedError` when a train or val loss is nan or inf.

    Every rank computes the same (all-reduced or identically evaluated) loss, so every rank stops."""
    if value is not None and not math.isfinite(value):
        raise _diverged(f"{what} is {value}", step, ckpt_dir)


def check_finite_weights(params, step: int, ckpt_dir: Path, info=None, device: torch.device | None = None) -> None:
    """Before a checkpoint is written: refuse to save nan/inf weights, so every checkpoint on disk
    is a good one to resume from. `info`/`device`: agree over ranks (FSDP ranks hold shards)."""
    bad = 0.0
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p  # an FSDP DTensor: this rank's shard
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad = 1.0
            break
    if info is not None:
        from minilab import distributed

        bad = distributed.all_reduce_sum(bad, info, device)
    if bad:
        raise _diverged("the weights are nan or inf", step, ckpt_dir)


def find_resume_checkpoint(ckpt_dir: Path, out: Path, resume: str | None, is_main: bool = True) -> Path | None:
    """The checkpoint `--resume auto|PATH` names, or None for a fresh run. A fresh run into a
    directory that already holds checkpoints or a final model is refused, never overwritten."""
    from minilab.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(ckpt_dir) if resume == "auto" else Path(resume) if resume else None
    if ckpt is None:
        if resume and resume != "auto":
            raise MinilabError(f"--resume {resume}: no such checkpoint")
        if is_main and ((ckpt_dir.exists() and any(ckpt_dir.iterdir())) or (out / "final").exists()):
            raise MinilabError(f"{out} already holds a run; use --resume auto to continue it "
                               "or choose another --output_dir")
    return ckpt


class MetricsLog:
    """Append-only JSON lines (`metrics.jsonl`), one object per event; rank 0 writes.

    JSON lines survive a crash (every line is complete or absent) and load with one line of
    pandas: `pd.read_json(path, lines=True)`. With `tensorboard_dir`, numeric values are also
    written as TensorBoard scalars (`train/loss`, `eval/val_loss`, ...) against the step.
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._tb_dir = tensorboard_dir if enabled else None
        self._tb = None

    def _tensorboard(self):
        if self._tb is None and self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional for library users; metrics.jsonl is always there
                self._tb_dir = None
                return None
            self._tb = SummaryWriter(str(self._tb_dir))
        return self._tb

    def write(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tb = self._tensorboard()
        if tb is not None and "step" in values:
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tb.add_scalar(f"{kind}/{key}", value, values["step"])
            tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint taken after `step` steps, drop what the killed run logged
        later: train and eval records past `step` (the eval of `step` ran before its checkpoint and
        is not repeated), time-budget plans at `step` or later (made at the start of the next step,
        which the resumed run repeats)."""
        if not (self.enabled and self.path.exists()):
            return

        def before(record: dict) -> bool:
            s = record.get("step", 0)
            return s < step if record.get("kind") == "plan" else s <= step

        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and before(json.loads(line))]
        from minilab.fsutil import write_text_atomic
        write_text_atomic(self.path, "".join(k + "\n" for k in keep))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None) -> float:
    """Measured peak of square matmuls (FLOP/s), the denominator of MFU on this machine: the best
    single product over a few tries, at each size, in this process (so with the thread count the
    run trains with).

    CUDA times 4096 x 4096: a 1024 x 1024 product is only 64 output tiles of 128 x 128, fewer than
    the SMs of a data-centre GPU (132 on an H100), so it measures a fraction of the peak. CPUs time
    1024 and 1536 and keep the faster: one batch of 1024 products under-measured a 2-core EPYC (33
    GFLOP/s where 2048 reached 50), which printed MFU above 100%; 2048 would cost seconds per run
    on a small CPU, so `MFU` measures it only when a step beats this peak. `n` times that one size.
    bf16 on a CPU without a bf16 GEMM is timed the way the model multiplies there
    (`bf16.emulate_bf16`: fp32 kernels), not torch's reference kernel (~1 GFLOP/s)."""
    sizes = [n] if n else [4096] if device.type == "cuda" else [1024, 1536]
    return max(_matmul_flops(device, dtype, size) for size in sizes)


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    from minilab.bf16 import emulate_bf16, linear_w

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    emulate = dtype is torch.bfloat16 and emulate_bf16(a, n)

    def mm():
        return linear_w(a, b) if emulate else a @ b
    cuda = device.type == "cuda"
    for _ in range(2 if cuda else 1):
        mm()
    # CUDA: kernels are short and queued, so time a batch of 5 between syncs; a CPU product is
    # timed alone (1-300 ms), best of 4 (3 above 1024): the try least disturbed by other processes.
    reps, best = (5, float("inf")) if cuda else (1, float("inf"))
    for _ in range(3 if cuda or n > 1024 else 4):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            mm()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best


class MFU:
    """Model FLOPs utilisation of a run: the FLOP/s one device achieves (`flops_per_token` x tokens
    per second, divided among `world_size` processes) over its measured matmul peak; never above 1.

    The peak is measured once, up front. Should a step still beat it (the measurement was
    disturbed, or the run's shapes suit the hardware better), the peak is measured again at twice
    the size and the larger kept; what the run achieved is itself a lower bound of the peak, so
    beyond that MFU is 1."""

    def __init__(self, device: torch.device, dtype: torch.dtype, flops_per_token: int, world_size: int = 1):
        self.device, self.dtype = device, dtype
        self.flops_per_token, self.world_size = flops_per_token, world_size
        self.peak = matmul_peak_flops(device, dtype)
        self.remeasured = False

    def __call__(self, tokens_per_s: float) -> float:
        achieved = tokens_per_s * self.flops_per_token / self.world_size
        if achieved > self.peak and not self.remeasured:
            self.remeasured = True
            larger = 2 * (4096 if self.device.type == "cuda" else 1024)
            self.peak = max(self.peak, matmul_peak_flops(self.device, self.dtype, n=larger))
        self.peak = max(self.peak, achieved)
        return achieved / self.peak
