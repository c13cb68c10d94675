"""`minilab pretrain`: train a minilab model from scratch on packed token data.

The loop reads top to bottom: LR for this step -> micro-batches with token-normalised gradient
accumulation -> clip -> AdamW step -> log -> eval -> checkpoint. The eval runs before the save
of the same step, so every checkpoint's val loss (the best-checkpoint metric) is its own.
Everything that makes a run reproducible (data position, RNG states, optimizer and LR schedule)
is in each checkpoint, so `--resume auto` continues bitwise-identically on CPU.

The final model is written to `<output_dir>/final/` as a standard HF directory with a
`manifest.json`, and entered into the registry under a convention-following name.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from minilab import __version__, distributed
from minilab.arch import load_architecture
from minilab.budget import BudgetHooks, TimeBudget, check_time_budget, parse_duration, planning_steps
from minilab.cliargs import add_config_flags, config_from_args, flag
from minilab.config import DEVICE, SEED, models_dir_field, to_dict
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import format_params, human_bytes
from minilab.model import ModelConfig, Transformer, build_model
from minilab.owned import write_run_marker
from minilab.run_skeleton import TrainingRun
from minilab.stage import Stage
from minilab.training import (
    MFU,
    MetricsLog,
    OptimConfig,
    check_finite_weights,
    find_resume_checkpoint,
    make_optimizer,
    micro_batch_loss_sum,
    optimizer_step,
    resolve_device,
    throughput,
    token_step,
)

log = logging.getLogger("minilab.pretrain")


@dataclass
class PretrainConfig:
    data_dirs: list[str] = field(default_factory=list, metadata={"help": "packed datasets (minilab pack)"})
    data_weights: list[float] | None = field(default=None, metadata={
        "help": "one weight per data_dirs entry, >= 0, divided by their sum: each training (and validation) "
                "window comes from dataset i with probability w_i / sum(w), whatever the datasets' sizes (one that "
                "runs out starts another shuffled epoch; 0 leaves a dataset out); default equal weights, not "
                "proportional to size"})
    tokenizer_dir: str = field(default="", metadata={"help": "the tokenizer the data was packed with"})
    output_dir: str = field(default="", metadata={"help": "run directory (checkpoints, metrics, final/)"})
    arch: str = field(default="micro", metadata={"help": "architecture preset name or JSON file"})
    model: dict = field(default_factory=dict, metadata={"help": "architecture overrides, e.g. {n_layer: 8}"})
    seq_len: int | None = field(default=None, metadata={"help": "training sequence length; default the packed one",
                                                                "min": 1})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps (time_budget, when set, derives it)"})
    time_budget: str | float | None = field(default=None, metadata={
        "help": "train for this long instead of max_steps: 90s, 10m, 1.5h or seconds; max_steps is derived from "
                "the measured step time (setup, evals, checkpoints and the final export included), the lr schedule "
                "sized to it and saved in every checkpoint; optim.schedule=wsd re-plans it from the pace",
        "check": check_time_budget})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={
        "help": "AdamW and its warmup + cosine or wsd lr schedule (optim.lr, ...)"})
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={
        "help": "fp32, bf16 autocast (CPU or CUDA), fp16 autocast with grad scaling (CUDA)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ...", **DEVICE})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    parallel: Literal["ddp", "fsdp"] = field(default="ddp", metadata={
        "help": "under torchrun: ddp (a whole model per rank, gradients all-reduced) or fsdp (FSDP2: "
                "weights, gradients and AdamW state sharded over the ranks, for models that do not fit "
                "one device; same updates, same checkpoint format); one process ignores it"})
    eval_every: int = field(default=50, metadata={"help": "steps between validation evals"})
    eval_batches: int = field(default=8, metadata={"help": "validation micro-batches per eval", "min": 1})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept (plus the best by val loss)"})
    seed: int = field(default=1337, metadata={
        "help": "random seed: the initial weights (the same on every rank) and the order training and "
                "validation windows are read in", **SEED})
    dataset_name: str | None = field(default=None, metadata={
        "help": "dataset label in the registry name; default from the first data dir"})
    register: bool = field(default=True, metadata={"help": "enter the final model into the registry"})
    models_dir: str | None = models_dir_field()
    tensorboard: bool = field(default=True, metadata={
        "help": "also write TensorBoard events to <output_dir>/tensorboard (when tensorboard is installed)"})
    verify_data: bool = field(default=False, metadata={
        "help": "before training, re-hash every packed file and compare it with the SHA-256 in its manifest.json "
                "(reads all the data once); file sizes are checked against the token counts on every run"})
    interrupt_at_step: int | None = field(default=None, metadata={
        "help": "checkpoint after this step, then SIGKILL the process: simulates a crash "
                "(verify-resume uses it to prove exact resume on your config)"})

    def validate(self) -> None:
        if not self.data_dirs:
            raise ConfigError("at least one packed dataset is required (--data_dirs DIR)", key="data_dirs")
        if not self.tokenizer_dir:
            raise ConfigError("required (--tokenizer_dir DIR)", key="tokenizer_dir")
        if not self.output_dir:
            raise ConfigError("required (--output_dir DIR)", key="output_dir")
        if self.data_weights is not None and len(self.data_weights) != len(self.data_dirs):
            raise ConfigError(f"{len(self.data_weights)} weights for {len(self.data_dirs)} datasets",
                              key="data_weights")
        for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "ckpt_every", "keep_last"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", key=key)
        if self.parallel == "fsdp" and self.precision == "fp16":
            # GradScaler's inf check would see only this rank's gradient shard: ranks could disagree.
            raise ConfigError("fp16 grad scaling is not supported with fsdp; use bf16", key="precision")
        if self.parallel == "fsdp" and self.optim.optimizer == "muon":
            # Muon orthogonalises each whole matrix; FSDP hands every rank a shard of it.
            raise ConfigError("muon needs whole matrices and fsdp shards them; use parallel ddp or "
                              "optimizer adamw", key="optim.optimizer")


# ---- preflight (the planner will replace this one function) ------------------------------------
def estimate_resources(model: Transformer, cfg: PretrainConfig, seq_len: int, world_size: int = 1) -> dict[str, int]:
    """Peak memory and disk of this run, in bytes, from the planner (`minilab.planner`): fp32
    weights, gradients and AdamW state, activations as the model is configured (gradient
    checkpointing, batch, sequence), logits and the runtime; disk for (keep_last + best)
    checkpoints with optimizer state, the final model and logs. Under FSDP, one rank's share
    (`minilab.planner.disk.fsdp_memory`). See docs/planner.md."""
    from minilab.planner.disk import estimate_pretrain

    shards = world_size if cfg.parallel == "fsdp" else 1
    return estimate_pretrain(model, cfg.batch_size, seq_len, cfg.precision, cfg.keep_last,
                             planned_steps(cfg), cfg.ckpt_every, shards=shards)


def planned_steps(cfg: PretrainConfig) -> int:
    """The run's steps as the planner sees them before it starts (a time budget: an upper estimate)."""
    return cfg.max_steps if cfg.time_budget is None else planning_steps(parse_duration(cfg.time_budget))


def preflight(est: dict[str, int], output_dir: Path, device: torch.device) -> None:
    """Stop before the first step (and before writing anything) if the run cannot fit the free
    disk or memory; a one-line error names what to change. Free disk comes from
    `minilab.planner.machine.disk_usage`, a hook tests replace with a fake."""
    from minilab.planner.machine import preflight as planner_preflight

    planner_preflight(est, output_dir, device)


# ---- data -------------------------------------------------------------------------------------
def batches(stream, batch_size: int):
    """Stack `batch_size` (input, target) windows from a window iterator into (B, T) tensors."""
    while True:
        xs, ys = zip(*(next(stream) for _ in range(batch_size)), strict=True)
        yield (torch.as_tensor(np.stack(xs), dtype=torch.long),
               torch.as_tensor(np.stack(ys), dtype=torch.long))


@torch.no_grad()
def evaluate(model: Transformer, cfg: PretrainConfig, seq_len: int, device: torch.device) -> dict[str, float]:
    """Mean token loss on the same validation windows every time (a fresh, seeded reader)."""
    from minilab.data.mixture import WeightedMixture

    was_training = model.training
    model.eval()
    reader = WeightedMixture(cfg.data_dirs, cfg.data_weights, seq_len, seed=cfg.seed, split="val")
    total, n = 0.0, 0
    it = batches(iter(reader), cfg.batch_size)
    for _ in range(cfg.eval_batches):
        x, y = next(it)
        total += micro_batch_loss_sum(model, x.to(device), y.to(device), cfg.precision, device).item()
        n += y.numel()
    model.train(was_training)
    loss = total / n
    return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50)))}


def packed_manifest(packed_dir: str | Path) -> dict:
    from minilab.data.shards import load_manifest

    return load_manifest(packed_dir, "packed")


def dataset_tokens(data_dirs: list[str]) -> dict[str, int]:
    return {d: int(packed_manifest(d)["splits"]["train"]["tokens"]) for d in data_dirs}


# ---- the run ----------------------------------------------------------------------------------
def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    from minilab.tokenization import load_tokenizer

    return load_tokenizer(tokenizer_dir).get_vocab_size()


def build_run_model(cfg: PretrainConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    mc = load_architecture(cfg.arch, [f"{k}={v}" for k, v in cfg.model.items()], vocab_size=vocab_size)
    if mc.max_seq_len < seq_len:
        mc = mc.replace(max_seq_len=seq_len)
    return mc


def run(cfg: PretrainConfig, resume: str | None = None, dry_run: bool = False) -> dict:
    """Train (on every rank when launched by torchrun); return a summary of the final model."""
    info, device = distributed.init(resolve_device(cfg.device))
    try:
        job = PretrainRun(cfg, info, device)
        if dry_run:
            return {"plan": job.plan, "model": to_dict(job.model.config)}
        return job.fit(resume)
    finally:
        distributed.shutdown()


class PretrainRun(BudgetHooks, TrainingRun):
    """One pretraining run: the objects a checkpoint restores, and the steps of the loop."""

    final_metric = "val_ppl"

    def __init__(self, cfg: PretrainConfig, info: distributed.DistInfo, device: torch.device):
        from minilab.data.mixture import WeightedMixture
        from minilab.data.packed import check_packed, check_tokenizer_match
        from minilab.tokenization import encoding_fingerprint, tokenizer_fingerprint

        self.cfg, self.info, self.device = cfg, info, device
        # First: a budget's clock starts here, so the setup counts against it.
        self.budget = None if cfg.time_budget is None else TimeBudget(
            parse_duration(cfg.time_budget), cfg.optim, cfg.eval_every, cfg.ckpt_every, self.agree)
        self.out = Path(cfg.output_dir)
        self.tok_sha = tokenizer_fingerprint(cfg.tokenizer_dir)
        check_tokenizer_match(cfg.data_dirs, self.tok_sha, encoding_fingerprint(cfg.tokenizer_dir))
        for d in cfg.data_dirs:  # before anything is built or written: a damaged file is never trained on
            check_packed(d, verify=cfg.verify_data)
        self.seq_len = cfg.seq_len or int(packed_manifest(cfg.data_dirs[0])["seq_len"])
        model_cfg = build_run_model(cfg, tokenizer_vocab_size(cfg.tokenizer_dir), self.seq_len)
        # The same seed on every rank: identical initial weights without a broadcast.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = build_model(model_cfg, device=device)
        self.plan = estimate_resources(self.model, cfg, self.seq_len, info.world_size)
        n = self.model.num_params()
        log.info(f"model: {cfg.arch}, {n:,} params ({format_params(n)}); plan: ~{human_bytes(self.plan['memory'])} "
                 f"peak memory, ~{human_bytes(self.plan['disk'])} disk; {info.world_size} process(es) on {device}")
        preflight(self.plan, self.out, device)
        # Wrap first: FSDP replaces the parameters with sharded ones, which the optimizer must hold.
        wrapped = distributed.wrap(self.model, info, device, cfg.parallel)
        self.optimizer = make_optimizer(self.model, cfg.optim, device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.train_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.reader = WeightedMixture(cfg.data_dirs, cfg.data_weights, self.seq_len, seed=cfg.seed,
                                      split="train", rank=info.rank, world_size=info.world_size)
        self.stream = batches(iter(self.reader), cfg.batch_size)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=info.is_main,
                                  tensorboard_dir=self.out / "tensorboard" if cfg.tensorboard else None)
        self.ckpt_dir = self.out / "checkpoints"
        self.init_progress()
        self.meta = {"config": to_dict(cfg), "model_config": to_dict(model_cfg), "tokenizer_sha256": self.tok_sha,
                     "minilab_version": __version__, "seq_len": self.seq_len, "world_size": info.world_size}

    # ---- resume ---------------------------------------------------------------------------------
    def restore(self, resume: str | None) -> None:
        from minilab.checkpoint import load_checkpoint

        ckpt = find_resume_checkpoint(self.ckpt_dir, self.out, resume, self.info.is_main)
        if self.info.is_main:  # before the first checkpoint: a run killed early is still known as minilab's
            write_run_marker(self.out, "pretrain")
        if ckpt is None:
            return
        meta = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, restore_rng=True,
                               map_location=self.device, scaler=self.scaler)
        if meta.get("tokenizer_sha256") != self.tok_sha:
            raise MinilabError(f"{ckpt} was trained with tokenizer {meta.get('tokenizer_sha256')}, "
                               f"not {self.tok_sha}; resume with the run's own tokenizer")
        self.reader.load_state_dict(meta["data_state"])
        self.load_progress(meta)
        self.load_budget(meta, ckpt)
        log.info(f"resumed from {ckpt} at step {self.step}")

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, None]:
        cfg, info = self.cfg, self.info
        micro = [next(self.stream) for _ in range(cfg.grad_accum)]
        loss, tokens = token_step(self.train_model, micro, cfg.precision, self.device, self.scaler, info)
        norm = optimizer_step(self.model, self.optimizer, self.scaler, cfg.optim.grad_clip)
        self.tokens_seen += tokens
        return loss, norm, None

    def validate(self) -> dict[str, float]:
        """The val loss of the current weights (nothing recorded; the time budget's probe times it)."""
        return evaluate(self.model, self.cfg, self.seq_len, self.device)

    def run_eval(self, bar) -> None:
        """Validate the current weights, log it, and note it under the progress bar (if any)."""
        self.note_eval(self.validate())
        self.lap("eval")
        epochs = {Path(d).name: round(self.tokens_seen * float(p) / max(1, n), 4)
                  for (d, n), p in zip(dataset_tokens(self.cfg.data_dirs).items(), self.reader.probs, strict=True)}
        self.metrics.write("eval", step=self.step, tokens=self.tokens_seen, epochs=epochs, **self.last_eval)
        if self.info.is_main and bar is not None:
            bar.note(f"step {self.step}: val loss {self.last_eval['val_loss']:.4f}, "
                     f"ppl {self.last_eval['val_ppl']:.2f}, {100 * self.step / self.max_steps:.0f}% done, "
                     f"epochs {epochs}")

    def save(self) -> None:
        from minilab.checkpoint import save_checkpoint

        check_finite_weights(self.model.parameters(), self.step, self.ckpt_dir, self.info, self.device)
        # FSDP: every rank takes part in gathering the full state; rank 0 writes it in the usual format.
        model_state, optim_state = (distributed.full_state(self.model, self.optimizer)
                                    if distributed.is_fsdp(self.model) else (None, None))
        if self.info.is_main:
            val = self.val_meta()
            budget = {"time_budget": self.budget.state()} if self.budget is not None else {}
            save_checkpoint(self.ckpt_dir, self.step, model=self.model, optimizer=self.optimizer,
                            meta={**self.meta, "tokens_seen": self.tokens_seen, "data_state": self.reader.state_dict(),
                                  **val, **budget},
                            keep_last=self.cfg.keep_last, keep_best=True, metric=val["val_loss"], scaler=self.scaler,
                            model_state=model_state, optimizer_state=optim_state)
        distributed.barrier(self.info)
        self.lap("save")

    def export_model(self) -> Transformer | None:
        """The model `finish` writes: the trained one, or under FSDP a plain copy with the full
        weights gathered from every rank (None on ranks other than 0)."""
        if not distributed.is_fsdp(self.model):
            return self.model
        weights, _ = distributed.full_state(self.model)
        if not self.info.is_main:
            return None
        full = build_model(self.model.config, device="cpu")
        full.load_state_dict(weights)
        return full

    # ---- the loop's hooks (the loop: run_skeleton.TrainingRun.fit) ----------------------------------
    def before_loop(self) -> None:
        cfg = self.cfg
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        # MFU's denominator: a matmul peak measured here, in the precision the run computes in.
        self.mfu_of = MFU(self.device, torch.bfloat16 if cfg.precision == "bf16" else
                          torch.float16 if cfg.precision == "fp16" else torch.float32,
                          self.flops_per_token, self.info.world_size)
        self.start_budget()

    def log_step(self, bar, lr: float, loss: float, norm: float, extra, tokens: int) -> None:
        tok_s = throughput(tokens, self.step_seconds())
        mfu = self.mfu_of(tok_s)
        self.metrics.write("train", step=self.step, tokens=self.tokens_seen, loss=loss, lr=lr, grad_norm=norm,
                           tokens_per_s=tok_s, flops_per_s=tok_s * self.flops_per_token, mfu=mfu)
        bar.update(self.step, loss=loss, tok_s=tok_s, mfu=mfu)
        self.lap("step")

    def checkpoint_due(self) -> bool:
        return super().checkpoint_due() or self.step == self.cfg.interrupt_at_step

    def after_step(self) -> None:
        if self.step == self.cfg.interrupt_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, exactly here: nothing else runs

    def finish_run(self) -> dict:
        cfg = self.cfg
        final_eval = dict(self.last_eval)
        mix = self.reader.realised_mix()
        model = self.export_model()
        budget = self.budget.summary() if self.budget is not None else None  # in the manifest: before export
        result = (finish(model, cfg, self.out, self.meta, final_eval, mix, self.tokens_seen, budget)
                  if self.info.is_main else {"final_dir": None, "name": None, **final_eval})
        if self.budget is not None:
            self.lap("export")
            result["time_budget"] = self.budget.summary()
            self.metrics.write("time_budget", step=self.step, **result["time_budget"])
        return result


def dataset_name(cfg: PretrainConfig) -> str:
    """The registry name's dataset field: the corpus the first dataset was packed from."""
    return cfg.dataset_name or Path(packed_manifest(cfg.data_dirs[0])["corpus_dir"]).name


def finish(model: Transformer, cfg: PretrainConfig, out: Path, run_meta: dict, final_eval: dict,
           realised_mix: dict, tokens_seen: int, budget: dict | None = None) -> dict:
    """Write `<out>/final/` (HF format + manifest) and enter it into the registry."""
    from minilab import registry
    from minilab.fsutil import sha256_file
    from minilab.hf import save_hf_dir

    name = None
    if cfg.register:
        # Named before the old entry goes, so a version number is never reused for other weights.
        name = registry.make_name(model.config.architecture, model.num_params(), dataset_name(cfg), "pretrain",
                                  root=cfg.models_dir)
        registry.release_path(out / "final", cfg.models_dir)  # an extended run: the old name's weights go
    final = save_hf_dir(model, out / "final", tokenizer_dir=cfg.tokenizer_dir, overwrite=True)
    data = [{"path": str(Path(d).resolve()), "manifest_sha256": sha256_file(Path(d) / "manifest.json"),
             "corpus_dir": packed_manifest(d)["corpus_dir"],
             "corpus_manifest_sha256": packed_manifest(d)["corpus_manifest_sha256"]} for d in cfg.data_dirs]
    fields = dict(training_type="pretrain", parent=None, data=data, tokenizer_sha256=run_meta["tokenizer_sha256"],
                  config=run_meta["config"], model_config=run_meta["model_config"],
                  metrics={**final_eval, "tokens_seen": tokens_seen, "realised_mix": realised_mix,
                           **({"time_budget": budget} if budget else {})},
                  params=model.num_params(), run_dir=str(out.resolve()))
    if cfg.register:
        registry.write_manifest(final, name=name, **fields)
        registry.register(final, name, root=cfg.models_dir, link=True)
    else:
        registry.write_manifest(final, name=None, **fields)
    return {"final_dir": str(final), "name": name, **final_eval}


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, "Defaults are those of PretrainConfig; flags below override the file.")
    flag(p, "--data-dirs", nargs="+", metavar="DIR", help="packed datasets")
    flag(p, "--data-weights", nargs="+", type=float, metavar="W", help="sampling weight per dataset")
    flag(p, "--tokenizer-dir", metavar="DIR", help="tokenizer the data was packed with")
    flag(p, "--output-dir", metavar="DIR", help="run directory")
    flag(p, "--max-steps", type=int, metavar="N", help="optimizer steps")
    flag(p, "--time-budget", metavar="DURATION", help="train for this long (90s, 10m, 1.5h) instead of --max-steps")
    p.add_argument("--arch", help="architecture preset (micro, tiny, small, base) or JSON file")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint or a given one")
    flag(p, "--dry-run", action="store_true", help="print the resource plan and exit")
    flag(p, "--verify", action="store_true", dest="verify_data",
         help="re-hash the packed data against its manifest's SHA-256 before training (verify_data)")


# The flags `add_arguments` adds that are PretrainConfig keys (verify-resume reads the same ones).
CONFIG_FLAGS = ("data_dirs", "data_weights", "tokenizer_dir", "output_dir", "max_steps", "time_budget", "arch",
                "verify_data")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(PretrainConfig, args, CONFIG_FLAGS)
    result = run(cfg, resume=args.resume, dry_run=args.dry_run)
    if args.dry_run:
        plan = result["plan"]
        print(f"params {plan['params']:,}; peak memory ~{human_bytes(plan['memory'])}; "
              f"disk ~{human_bytes(plan['disk'])}")
        return 0
    if result["final_dir"] is None:  # a rank other than 0 under torchrun: rank 0 wrote and reports the model
        return 0
    print(f"final model: {result['final_dir']}")
    if result.get("name"):
        print(f"registry name: {result['name']}")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _meta_model(ctx: Any, cfg: PretrainConfig) -> Transformer:
    """The model this config trains, on the meta device, before its tokenizer or data exist."""
    seq = cfg.seq_len or ctx.packed_seq_len(cfg.data_dirs[0])
    return build_model(build_run_model(cfg, ctx.vocab_of(cfg.tokenizer_dir), seq), "meta")


def _estimate(ctx: Any, cfg: PretrainConfig) -> dict[str, Any]:
    from minilab.planner.disk import estimate_pretrain

    model = _meta_model(ctx, cfg)
    seq = cfg.seq_len or ctx.packed_seq_len(cfg.data_dirs[0])
    est = estimate_pretrain(model, cfg.batch_size, seq, cfg.precision, cfg.keep_last, planned_steps(cfg),
                            cfg.ckpt_every, target=ctx.target(cfg.device))
    return {"disk": est["disk"], "memory": est["memory"], "device": ctx.target(cfg.device),
            "note": f"{est['params'] / 1e6:.1f} M params"}


def _metric(r: dict[str, Any], cfg: PretrainConfig) -> str:
    from minilab.data.packed import unigram_entropy

    return f"val loss {r['val_loss']:.3f} (unigram entropy {unigram_entropy(cfg.data_dirs[0]):.3f})"


STAGE = Stage("pretrain", PretrainConfig, run=run, metric=_metric, output="final", trains=True,
              estimate=_estimate, meta_model=_meta_model)
