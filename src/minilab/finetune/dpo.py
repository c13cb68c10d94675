"""`minilab dpo`: Direct Preference Optimization (sigmoid loss) with LoRA, QLoRA or full weights.

    minilab dpo --base-model llama-2.3M-demo-lora-v1 --data-dirs data/dpo/demo --output-dir runs/dpo

Loss (Rafailov et al. 2023; trl's "sigmoid"): with summed answer log-probs under the policy
(pi) and the reference (ref),  loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).
The implicit rewards are beta * (pi - ref); metrics report their margin and how often the
chosen answer's reward is higher (reward accuracy), plus the policy's log-probs.

The reference is the base itself with the adapters switched off (`PeftModel.disable_adapter()`):
one copy of the weights in memory, not two. `precompute_ref` scores every training pair under
the reference once before training (saved in the run directory, so a resume reuses it); full
fine-tuning needs it, since no adapter can be switched off there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from minilab import distributed
from minilab.errors import ConfigError, MinilabError
from minilab.finetune.common import TuneConfig, Tuning, TuningRun, run_tuning, tuning_stage
from minilab.training import (
    OptimConfig,
    count_targets,
    model_sequence_logprobs,
    step_tokens,
    throughput,
)

log = logging.getLogger("minilab.dpo")


@dataclass
class DPOConfig(TuneConfig):
    data_dirs: list[str] = field(default_factory=list, metadata={"help": "datasets from `minilab dpo-data`"})
    beta: float = field(default=0.1, metadata={"help": "strength of the KL anchor to the reference"})
    precompute_ref: bool = field(default=False, metadata={
        "help": "score the training pairs under the reference once, before training"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.0, warmup_frac=0.1),
                               metadata={"help": "AdamW and its warmup + cosine lr schedule (optim.lr, ...)"})

    def validate(self) -> None:
        self.check_required()
        if self.beta <= 0:
            raise ConfigError("must be positive", key="beta")
        self.check_positive()


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the chosen/rejected implicit rewards (detached), each (B,)."""
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    loss = -F.logsigmoid(beta * logits)
    return loss, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def pair_logps(model, chosen: list, rejected: list, pad_id: int, precision: str, device) -> tuple:
    """Summed answer log-probs of chosen and rejected rows in one forward pass, (B,) and (B,), and
    the number of answer tokens scored (the rows' trained tokens)."""
    from minilab.finetune.rows import collate

    x, y = collate(chosen + rejected, pad_id)
    logps = model_sequence_logprobs(model, x.to(device), y.to(device), precision, device)
    return logps[: len(chosen)], logps[len(chosen):], count_targets([y])


def reference_context(model, peft_model):
    """Forward passes inside run under the reference: the adapters switched off."""
    return peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()


def run(cfg: DPOConfig, resume: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    return run_tuning(DPORun, cfg, resume, dry_run)


class DPORun(TuningRun):
    """One DPO run: setup -> restore -> (train_step, run_eval, save)* -> finish."""

    progress_label = "dpo"

    def __init__(self, cfg: DPOConfig, info: distributed.DistInfo, device: torch.device):
        from minilab.finetune.rows import Rows, WeightedSampler, load_datasets
        from minilab.tokenization import pad_id_of

        if cfg.method == "full" and not cfg.precompute_ref:
            raise ConfigError("full fine-tuning has no adapters to switch off for the reference; "
                              "set precompute_ref=true", key="precompute_ref")
        self.cfg, self.info, self.device = cfg, info, device
        self.tune = Tuning(cfg, cfg.optim, info, device, "dpo")
        self.manifests, self.template = load_datasets(cfg.data_dirs, self.tune.tokenizer_sha, kind="dpo_data")
        self.train = [(Rows(d, "train.chosen"), Rows(d, "train.rejected")) for d in cfg.data_dirs]
        self.val = [(Rows(d, "val.chosen"), Rows(d, "val.rejected")) for d in cfg.data_dirs]
        self.sampler = WeightedSampler([len(c) for c, _ in self.train], cfg.data_weights, cfg.seed,
                                       info.rank, info.world_size)
        self.pad_id = pad_id_of(self.tune.base.tokenizer_dir)
        self.plan = self.tune.preflight(max(int(m["max_len"]) for m in self.manifests),
                                        rows_per_example=STAGE.rows_per_example)
        self.ref: list[np.ndarray] | None = None  # precomputed reference log-probs, train and val
        self.ref_val: list[np.ndarray] | None = None
        self.init_progress()

    # ---- reference log-probs ----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, pairs, idx: list[int], reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.tune.model
        ctx = reference_context(model, self.tune.peft) if reference else contextlib.nullcontext()
        with ctx:
            c, r, _ = pair_logps(model, [pairs[0][i] for i in idx], [pairs[1][i] for i in idx], self.pad_id,
                                 self.cfg.precision, self.device)
        return c, r

    def precompute_reference(self) -> None:
        """Reference log-probs of every training pair and every val pair, (n, 2) per dataset, saved
        once per run (a resumed run must not score its val pairs under its trained weights)."""
        path = self.tune.out / "reference_logps.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if any(f"v{i}" not in z for i in range(len(self.val))):
                    raise MinilabError(f"{path}: no val reference in it (an older minilab wrote it); "
                                       f"start this DPO run again in a new output_dir")
                self.ref = [z[f"d{i}"] for i in range(len(self.train))]
                self.ref_val = [z[f"v{i}"] for i in range(len(self.val))]
            return
        was = self.tune.model.training
        self.tune.model.eval()  # no dropout in the reference
        self.ref = [self.score_all(pairs) for pairs in self.train]
        self.ref_val = [self.score_all(pairs) for pairs in self.val]
        self.tune.model.train(was)
        if self.info.is_main:
            from minilab.fsutil import atomic_path

            arrays = {f"d{i}": a for i, a in enumerate(self.ref)} | {f"v{i}": a for i, a in enumerate(self.ref_val)}
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        distributed.barrier(self.info)

    def score_all(self, pairs) -> np.ndarray:
        """(chosen, rejected) reference log-probs of every pair, (n, 2) float64."""
        out = np.zeros((len(pairs[0]), 2), dtype=np.float64)
        for a in range(0, len(pairs[0]), self.cfg.batch_size):
            idx = list(range(a, min(a + self.cfg.batch_size, len(pairs[0]))))
            c, r = self.score(pairs, idx, reference=True)
            out[idx, 0], out[idx, 1] = c.double().cpu().numpy(), r.double().cpu().numpy()
        return out

    # ---- steps ---------------------------------------------------------------------------------------
    def micro_batch(self) -> list[tuple[int, int]]:
        return [self.sampler.next() for _ in range(self.cfg.batch_size)]

    def batch_stats(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Per-pair loss (with grad), metrics and trained tokens of one micro-batch of (dataset, row) picks."""
        cfg, model = self.cfg, self.tune.model
        by_d: dict[int, list[int]] = {}
        for d, i in picks:
            by_d.setdefault(d, []).append(i)
        parts, tokens = [], 0
        for d, idx in by_d.items():
            pi_c, pi_r, n = pair_logps(self.tune.train_model, [self.train[d][0][i] for i in idx],
                                       [self.train[d][1][i] for i in idx], self.pad_id, cfg.precision, self.device)
            if self.ref is not None:
                ref = torch.as_tensor(self.ref[d][idx], dtype=torch.float32, device=self.device)
                ref_c, ref_r = ref[:, 0], ref[:, 1]
            else:
                was = model.training
                model.eval()  # the reference without dropout, as when precomputed
                ref_c, ref_r = self.score(self.train[d], idx, reference=True)
                model.train(was)
            parts.append((pi_c, pi_r, ref_c, ref_r))
            tokens += n
        pi_c, pi_r, ref_c, ref_r = (torch.cat(t) for t in zip(*parts, strict=True))
        loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta)
        return loss, {"chosen_rewards": rc, "rejected_rewards": rr, "logps_chosen": pi_c.detach(),
                      "logps_rejected": pi_r.detach()}, tokens

    def train_step(self) -> tuple[float, float, dict[str, float]]:
        cfg, tune, info = self.cfg, self.tune, self.info
        n_pairs = cfg.batch_size * cfg.grad_accum
        stats: list[dict[str, torch.Tensor]] = []
        total, local = 0.0, 0
        for k in range(cfg.grad_accum):
            with distributed.no_sync(tune.train_model, k == cfg.grad_accum - 1):
                loss, s, tokens = self.batch_stats(self.micro_batch())
                scaled = loss.sum() / n_pairs  # the mean over every pair of the step
                (tune.scaler.scale(scaled) if tune.scaler is not None else scaled).backward()
            total += scaled.item()
            stats.append(s)
            local += tokens
        norm = tune.optimizer_step()
        self.tokens_seen += step_tokens(local, info, self.device)
        merged = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
        metrics = summarize(torch.tensor([total]), merged)
        metrics["loss"] = distributed.all_reduce_sum(total, info, self.device) / info.world_size
        return metrics["loss"], norm, metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """DPO metrics on every dataset's val pairs (reference: see `val_reference`)."""
        model = self.tune.model
        was = model.training
        model.eval()
        losses, parts = [], []
        for d, pairs in enumerate(self.val):
            for a in range(0, min(len(pairs[0]), self.cfg.eval_batches * self.cfg.batch_size), self.cfg.batch_size):
                idx = list(range(a, min(a + self.cfg.batch_size, len(pairs[0]))))
                pi_c, pi_r = self.score(pairs, idx, reference=False)
                ref_c, ref_r = self.val_reference(d, idx)
                loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.cfg.beta)
                losses.append(loss)
                parts.append({"chosen_rewards": rc, "rejected_rewards": rr, "logps_chosen": pi_c,
                              "logps_rejected": pi_r})
        model.train(was)
        if not parts:
            return {}
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out = summarize(torch.cat(losses), merged)
        return {f"val_{k}": v for k, v in out.items()} | {"val_loss": out["loss"]}

    def val_reference(self, d: int, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of val pairs `idx` of dataset `d`: the adapters switched off, or
        (full fine-tuning) the starting weights' scores precomputed with the training pairs'."""
        if self.ref_val is None:
            return self.score(self.val[d], idx, reference=True)
        ref = torch.as_tensor(self.ref_val[d][idx], dtype=torch.float32, device=self.device)
        return ref[:, 0], ref[:, 1]

    def run_eval(self, bar) -> None:
        """Validate the current weights, log it, and note it under the progress bar (if any)."""
        self.note_eval(self.evaluate())
        self.tune.metrics.write("eval", step=self.step, tokens=self.tokens_seen, epochs=self.sampler.epochs(),
                                **self.last_eval)
        if self.info.is_main and self.last_eval and bar is not None:
            e = self.last_eval
            bar.note(f"step {self.step}: val loss {e['val_loss']:.4f}, reward accuracy "
                     f"{e['val_reward_accuracy']:.3f}, margin {e['val_reward_margin']:.4f}")

    def before_loop(self) -> None:
        if self.cfg.precompute_ref:
            self.precompute_reference()

    def log_step(self, bar, lr: float, loss: float, norm: float, metrics: dict[str, float], tokens: int) -> None:
        pairs_s = throughput(self.cfg.batch_size * self.cfg.grad_accum, time.perf_counter() - self.t_step)
        self.tune.metrics.write("train", step=self.step, tokens=self.tokens_seen, lr=lr, grad_norm=norm,
                                pairs_per_s=pairs_s, **metrics)
        bar.update(self.step, loss=loss, tok_s=pairs_s, unit="pairs/s")

    def final_metrics(self) -> dict[str, Any]:
        return {"beta": self.cfg.beta}


def summarize(loss: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean loss, reward margin and accuracy, chosen/rejected rewards and log-probs."""
    margin = s["chosen_rewards"] - s["rejected_rewards"]
    return {"loss": float(loss.float().mean()), "reward_margin": float(margin.mean()),
            "reward_accuracy": float((margin > 0).float().mean()),
            "rewards_chosen": float(s["chosen_rewards"].mean()),
            "rewards_rejected": float(s["rejected_rewards"].mean()),
            "logps_chosen": float(s["logps_chosen"].mean()), "logps_rejected": float(s["logps_rejected"].mean())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.finetune.tune_cli import add_tune_arguments

    add_tune_arguments(p)
    p.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    from minilab.cliargs import flag

    flag(p, "--precompute-ref", action="store_true", help="score the reference once before training")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args
    from minilab.finetune.tune_cli import TUNE_FLAGS, print_result

    cfg = config_from_args(DPOConfig, args, (*TUNE_FLAGS, "beta", "precompute_ref"))
    print_result(run(cfg, resume=args.resume, dry_run=args.dry_run), args.dry_run)
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _metric(r: dict[str, Any], cfg: DPOConfig) -> str:
    acc = r.get("val_reward_accuracy")
    head = f"reward acc {acc:.3f}, " if acc is not None else ""
    return f"{head}val loss {r['val_loss']:.3f}" + (f" ({r['name']})" if r.get("name") else "")


STAGE = tuning_stage("dpo", DPOConfig, run, _metric, rows_per_example=2)  # chosen and rejected
