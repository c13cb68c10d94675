"""`minilab sft`: supervised fine-tuning with LoRA (default), QLoRA or every weight.

    minilab sft --base-model llama-2.3M-austen-pretrain-v1 --data-dirs data/sft/demo \\
        --output-dir runs/sft-demo [--method lora|qlora|full] [--max-steps 200] [--resume auto]

The loop has the shape of pretraining's (setup -> restore -> train_step -> run_eval -> save ->
fit) and shares its numerics through `minilab.training`: the LR schedule, token-normalised
gradient accumulation over the trained (unmasked) tokens, clipping, precision, checkpoints with
RNG and data position (so `--resume auto` continues exactly), metrics and progress. Each eval
answers a fixed list of prompts in the chat format, so a person can watch answers improve.

The result lands in `<output_dir>/final/` and the registry: `...-lora-vN` holding PEFT adapters
in `adapters/` (QLoRA too: its adapters apply to the full-precision base), or a full model
(`...-sft-vN`) for `--method full`; the manifest names the base model and its fingerprint.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minilab import distributed
from minilab.errors import ConfigError
from minilab.finetune.common import TuneConfig, Tuning, TuningRun, run_tuning, tuning_stage
from minilab.training import OptimConfig, micro_batch_loss_sum, throughput, token_step

log = logging.getLogger("minilab.sft")


@dataclass
class SFTConfig(TuneConfig):
    data_dirs: list[str] = field(default_factory=list, metadata={"help": "datasets from `minilab sft-data`"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0, warmup_frac=0.03),
                               metadata={"help": "AdamW and its warmup + cosine lr schedule (optim.lr, ...)"})

    def validate(self) -> None:
        self.check_required()
        if self.data_weights is not None and len(self.data_weights) != len(self.data_dirs):
            raise ConfigError(f"{len(self.data_weights)} weights for {len(self.data_dirs)} datasets",
                              key="data_weights")
        self.check_positive()


def run(cfg: SFTConfig, resume: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    return run_tuning(SFTRun, cfg, resume, dry_run)


class SFTRun(TuningRun):
    """One SFT run: setup here, then restore -> (train_step, run_eval, save)* -> finish."""

    progress_label = "sft"

    def __init__(self, cfg: SFTConfig, info: distributed.DistInfo, device: torch.device):
        from minilab.finetune.rows import Rows, WeightedSampler, load_datasets
        from minilab.tokenization import pad_id_of

        self.cfg, self.info, self.device = cfg, info, device
        self.tune = Tuning(cfg, cfg.optim, info, device, "sft")
        self.manifests, self.template = load_datasets(cfg.data_dirs, self.tune.tokenizer_sha)
        self.train_rows = [Rows(d, "train") for d in cfg.data_dirs]
        self.val_rows = [Rows(d, "val") for d in cfg.data_dirs]
        self.sampler = WeightedSampler([len(r) for r in self.train_rows], cfg.data_weights, cfg.seed,
                                       info.rank, info.world_size)
        self.pad_id = pad_id_of(self.tune.base.tokenizer_dir)
        self.seq_len = max(int(m["max_len"]) for m in self.manifests)
        self.plan = self.tune.preflight(self.seq_len)
        self.init_progress()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        from minilab.finetune.rows import collate

        picks = [self.sampler.next() for _ in range(self.cfg.batch_size)]
        return collate([self.train_rows[d][i] for d, i in picks], self.pad_id)

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, None]:
        cfg, info, tune = self.cfg, self.info, self.tune
        micro = [self.next_batch() for _ in range(cfg.grad_accum)]
        # Normalised by the trained tokens of the whole (global) step, as pretraining does.
        loss, tokens = token_step(tune.train_model, micro, cfg.precision, self.device, tune.scaler, info)
        norm = tune.optimizer_step()
        self.tokens_seen += tokens
        return loss, norm, None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token loss on the first `eval_batches` batches of every dataset's val split (same rows
        each time), and greedy answers to the eval prompts."""
        from minilab.finetune.rows import collate

        model = self.tune.model
        was = model.training
        model.eval()
        total, n = 0.0, 0
        for rows in self.val_rows:
            for b in range(self.cfg.eval_batches):
                idx = range(b * self.cfg.batch_size, min(len(rows), (b + 1) * self.cfg.batch_size))
                if not idx:
                    break
                x, y = collate([rows[i] for i in idx], self.pad_id)
                total += micro_batch_loss_sum(model, x.to(self.device), y.to(self.device), self.cfg.precision,
                                              self.device).item()
                n += int((y != -100).sum())
        model.train(was)
        if n == 0:
            return {}
        return {"val_loss": total / n, "val_ppl": float(np.exp(min(total / n, 50)))}

    def run_eval(self, bar) -> None:
        """Validate the current weights, log it, and note it under the progress bar (if any)."""
        self.note_eval(self.evaluate())
        answers = self.tune.answer(self.template, self.cfg.eval_prompts, self.cfg.max_new_tokens) \
            if self.info.is_main and self.cfg.eval_prompts else []
        self.tune.metrics.write("eval", step=self.step, tokens=self.tokens_seen, epochs=self.sampler.epochs(),
                                **self.last_eval)
        if answers:
            self.tune.metrics.write("generations", step=self.step, items=answers)
        if self.info.is_main and bar is not None:
            loss = self.last_eval.get("val_loss")
            bar.note(f"step {self.step}: val loss {loss:.4f}" if loss is not None else f"step {self.step}")
            for a in answers[:3]:
                bar.note(f"  {a['prompt']!r} -> {a['answer']!r}")

    def log_step(self, bar, lr: float, loss: float, norm: float, extra, tokens: int) -> None:
        tok_s = throughput(tokens, self.step_seconds())
        self.tune.metrics.write("train", step=self.step, tokens=self.tokens_seen, loss=loss, lr=lr,
                                grad_norm=norm, tokens_per_s=tok_s)
        bar.update(self.step, loss=loss, tok_s=tok_s)

    def final_metrics(self) -> dict[str, Any]:
        return {"epochs": self.sampler.epochs()}


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.finetune.tune_cli import add_tune_arguments

    add_tune_arguments(p)


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args
    from minilab.finetune.tune_cli import TUNE_FLAGS, print_result

    cfg = config_from_args(SFTConfig, args, TUNE_FLAGS)
    print_result(run(cfg, resume=args.resume, dry_run=args.dry_run), args.dry_run)
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _metric(r: dict[str, Any], cfg: SFTConfig) -> str:
    return f"val loss {r['val_loss']:.3f}" + (f" ({r['name']})" if r.get("name") else "")


STAGE = tuning_stage("sft", SFTConfig, run, _metric)
