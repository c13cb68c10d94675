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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilab import distributed
from minilab.config import to_dict
from minilab.errors import ConfigError, MinilabError
from minilab.finetune.common import TuneConfig, Tuning, TuningRun
from minilab.training import (
    OptimConfig,
    accumulate_gradients,
    autocast_context,
    count_targets,
    step_tokens,
    throughput,
    token_loss_sum,
)

log = logging.getLogger("minilab.sft")


@dataclass
class SFTConfig(TuneConfig):
    data_dirs: list[str] = field(default_factory=list, metadata={"help": "datasets from `minilab sft-data`"})
    data_weights: list[float] | None = field(default=None, metadata={
        "help": "sampling weight per dataset; default proportional to their sizes"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0, warmup_frac=0.03),
                               metadata={"help": "AdamW and its warmup + cosine lr schedule (optim.lr, ...)"})

    def validate(self) -> None:
        for key in ("base_model", "output_dir", "data_dirs"):
            if not getattr(self, key):
                raise ConfigError("required", key=key)
        if self.data_weights is not None and len(self.data_weights) != len(self.data_dirs):
            raise ConfigError(f"{len(self.data_weights)} weights for {len(self.data_dirs)} datasets",
                              key="data_weights")
        for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "ckpt_every", "keep_last"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", key=key)


def load_datasets(data_dirs: list[str], tokenizer_sha: str, kind: str = "sft_data") -> tuple[list[dict], Any]:
    """Manifests of the datasets (tokenizer checked: the blocking error) and their shared template."""
    from minilab.finetune.rows import check_data_tokenizer
    from minilab.finetune.templates import ChatTemplate
    from minilab.tokenization import EOS_TOKEN

    manifests = check_data_tokenizer(data_dirs, kind, tokenizer_sha)
    t = manifests[0]["template"]
    for d, m in zip(data_dirs[1:], manifests[1:], strict=True):
        if m["template"]["jinja"] != t["jinja"]:
            raise MinilabError(f"{d} uses chat template '{m['template']['name']}' but {data_dirs[0]} uses "
                               f"'{t['name']}'; build every dataset with one template")
    tok_cfg = Path(manifests[0].get("tokenizer_dir", "")) / "tokenizer_config.json"
    eos = EOS_TOKEN
    if tok_cfg.is_file():
        import json

        eos = json.loads(tok_cfg.read_text(encoding="utf-8")).get("eos_token") or eos
    return manifests, ChatTemplate(t["name"], t["jinja"], t["end_token"], "",
                                   eos if isinstance(eos, str) else EOS_TOKEN)


def data_records(data_dirs: list[str]) -> list[dict[str, Any]]:
    from minilab.fsutil import sha256_file

    return [{"path": str(Path(d).resolve()), "manifest_sha256": sha256_file(Path(d) / "manifest.json")}
            for d in data_dirs]


def run(cfg: SFTConfig, resume: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    from minilab.training import resolve_device

    info, device = distributed.init(resolve_device(cfg.device))
    try:
        job = SFTRun(cfg, info, device)
        if dry_run:
            return {"plan": job.plan}
        return job.fit(resume)
    finally:
        distributed.shutdown()


class SFTRun(TuningRun):
    """One SFT run: setup here, then restore -> (train_step, run_eval, save)* -> finish."""

    progress_label = "sft"

    def __init__(self, cfg: SFTConfig, info: distributed.DistInfo, device: torch.device):
        from minilab.finetune.rows import Rows, WeightedSampler
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

    # ---- resume ---------------------------------------------------------------------------------
    def restore(self, resume: str | None) -> None:
        meta = self.tune.restore(resume)
        if meta is None:
            return
        self.sampler.load_state_dict(meta["data_state"])
        self.load_progress(meta)

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, None]:
        cfg, info, tune = self.cfg, self.info, self.tune
        micro = [self.next_batch() for _ in range(cfg.grad_accum)]
        # Normalise by the trained tokens of the whole (global) step, as pretraining does.
        tokens = step_tokens(count_targets(y for _, y in micro), info, self.device)
        normalizer = tokens / info.world_size
        loss, _ = accumulate_gradients(tune.train_model, micro, cfg.precision, self.device, tune.scaler,
                                       normalizer=normalizer,
                                       sync=lambda last: distributed.no_sync(tune.train_model, last))
        loss = distributed.all_reduce_sum(loss, info, self.device) / info.world_size
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
                with autocast_context(self.cfg.precision, self.device):
                    logits = model(x.to(self.device))
                total += token_loss_sum(logits, y.to(self.device)).item()
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

    def save(self) -> None:
        val = self.val_meta()
        self.tune.save(self.step, {"config": to_dict(self.cfg), "tokens_seen": self.tokens_seen,
                                   "data_state": self.sampler.state_dict(), **val},
                       metric=val["val_loss"])

    def log_step(self, bar, lr: float, loss: float, norm: float, extra, tokens: int) -> None:
        tok_s = throughput(tokens, self.step_seconds())
        self.tune.metrics.write("train", step=self.step, tokens=self.tokens_seen, loss=loss, lr=lr,
                                grad_norm=norm, tokens_per_s=tok_s)
        bar.update(self.step, loss=loss, tok_s=tok_s)

    def finish_run(self) -> dict[str, Any]:
        cfg = self.cfg
        if not self.info.is_main:
            return {"final_dir": None, "name": None, **self.last_eval}
        dataset = cfg.dataset_name or Path(cfg.data_dirs[0]).name
        result = self.tune.finish("sft", self.template, data_records(cfg.data_dirs), dataset,
                                  {**self.last_eval, "tokens_seen": self.tokens_seen, "steps": self.step,
                                   "epochs": self.sampler.epochs()}, to_dict(cfg))
        return {**result, **self.last_eval}


# ---- CLI ----------------------------------------------------------------------------------------
def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """Flags SFT and DPO share."""
    from minilab.cliargs import add_config_flags, flag

    flag(p, "--base-model", metavar="NAME|DIR|HUB_ID", help="model to fine-tune")
    flag(p, "--data-dirs", nargs="+", metavar="DIR", help="prepared datasets")
    flag(p, "--data-weights", nargs="+", type=float, metavar="W", help="sampling weight per dataset")
    flag(p, "--output-dir", metavar="DIR", help="run directory")
    p.add_argument("--method", choices=["lora", "qlora", "full"], help="default lora")
    flag(p, "--max-steps", type=int, metavar="N", help="optimizer steps")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint or a given one")
    flag(p, "--dry-run", action="store_true", help="print the resource plan and exit")
    add_config_flags(p, "Keys: those of the verb's config (lora.r, optim.lr, batch_size, ...).")


# The flags `add_tune_arguments` adds that are config keys of SFT and DPO alike.
TUNE_FLAGS = ("base_model", "data_dirs", "data_weights", "output_dir", "method", "max_steps")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_tune_arguments(p)


def print_result(result: dict[str, Any], dry_run: bool) -> None:
    from minilab.fsutil import human_bytes

    if dry_run:
        plan = result["plan"]
        print(f"params {plan['params']:,} ({plan['trainable']:,} trainable); peak memory "
              f"~{human_bytes(plan['memory'])}; disk ~{human_bytes(plan['disk'])}")
        return
    if result["final_dir"] is None:  # a torchrun rank other than 0: rank 0 wrote and reports the model
        return
    print(f"final model: {result['final_dir']}")
    if result.get("name"):
        print(f"registry name: {result['name']}")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    cfg = config_from_args(SFTConfig, args, TUNE_FLAGS)
    print_result(run(cfg, resume=args.resume, dry_run=args.dry_run), args.dry_run)
    return 0
