"""The stage contract: what a pipeline stage is, and the registry of stage kinds.

A stage kind (corpus, tokenizer, ..., quantize) is one module that exports `STAGE = Stage(...)`:
its config class (the same typed dataclass its verb uses), what runs, where its output lies, its
dry-run estimate and its key metric. `minilab run` and the CLI go through this registry instead of
naming kinds, so adding a stage is one module with a `STAGE` plus one line in `STAGE_MODULES`.

The registry names modules without importing them: `minilab --help` lists every verb from the
one-line help kept here, and a stage's libraries (torch, tokenizers, ...) load only when
`get(kind)` is asked for it. Stage modules never import the recipe (`minilab.recipe`): what an
estimate needs to know about the rest of a recipe comes in through its `ctx` argument.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("minilab.recipe")

# kind (= its verb) -> (module exporting STAGE, one-line help), in pipeline order.
STAGE_MODULES: dict[str, tuple[str, str]] = {
    "corpus": ("minilab.data.corpus", "clean, filter and deduplicate raw text into corpus shards"),
    "tokenizer": ("minilab.data.tokenizer", "train (or adopt) a tokenizer and fingerprint it"),
    "pack": ("minilab.data.pack", "tokenize a corpus into packed train/val token files"),
    "pretrain": ("minilab.pretrain", "pretrain a model from scratch on packed data (exact resume, torchrun)"),
    "eval": ("minilab.evaluate.stage",
             "perplexity, bits per byte, multiple choice with baselines, generations and a report"),
    "sft-data": ("minilab.finetune.sft_data", "template and tokenize conversations for SFT (loss masks, manifest)"),
    "sft": ("minilab.finetune.sft", "supervised fine-tuning: LoRA (default), QLoRA or full; exact resume"),
    "dpo-data": ("minilab.finetune.dpo_data", "template and tokenize preference pairs for DPO"),
    "dpo": ("minilab.finetune.dpo", "preference tuning with DPO; the reference is the base with adapters off"),
    "merge": ("minilab.finetune.merge", "merge LoRA/QLoRA adapters into a full-weight registry model"),
    "export": ("minilab.export.gguf", "export a model as GGUF (llama.cpp, Ollama) or a transformers directory"),
    "quantize": ("minilab.export.quantize", "write an int8 copy of a model into the registry (…-int8-vN)"),
}

NO_ESTIMATE: dict[str, Any] = {"disk": None, "memory": None, "note": ""}


@dataclass(frozen=True)
class Stage:
    """One stage kind. A recipe stage's folder is its config's `output_dir` (the recipe sets it)."""

    kind: str
    config: type                                  # the config dataclass (the verb's own)
    run: Callable[..., dict[str, Any]]            # run(cfg); a training stage: run(cfg, resume="auto")
    metric: Callable[[dict[str, Any], Any], str]  # metric(result, cfg): one line, the number that matters
    output: str | Callable[[Path, dict[str, Any]], Path] = "dir"  # "dir", "final" (<dir>/final) or a rule
    trains: bool = False      # a training loop with checkpoints: an interrupted run resumes
    # estimate(ctx, cfg) -> {"disk", "memory", "note", optional "device"}: the dry run's line, before
    # anything ran; ctx answers what the rest of the recipe will hold (recipe.estimate.Context)
    estimate: Callable[[Any, Any], dict[str, Any]] | None = None
    # meta_model(ctx, cfg): the model the stage writes, built on the meta device (a stage that
    # creates a model); a stage that copies or tunes one names the config key of its input instead
    meta_model: Callable[[Any, Any], Any] | None = None
    model_input: str | None = None
    # config keys that describe the output and can be read before the stage ran (a tokenizer's
    # vocab_size, a packed seq_len, rows' max_len): what an estimate of a later stage asks for
    output_facts: tuple[str, ...] = ()
    # report(stage_dir) -> {"links", "plots", "text"}: what the recipe report shows of a finished
    # stage beyond its metric (a training stage's curves are drawn from its metrics.jsonl)
    report: Callable[[Path], dict[str, Any]] | None = None
    rows_per_example: int = 1  # sequences per batch example in memory (DPO: chosen and rejected)
    # keys a recipe must give (the verb may take them as flags): key -> what, for the error
    required: dict[str, str] = field(default_factory=dict)

    @property
    def help(self) -> str:
        """The verb's one-line help (kept in the registry, so `minilab --help` imports no stage)."""
        return STAGE_MODULES[self.kind][1]

    def output_path(self, stage_dir: Path, config: dict[str, Any]) -> Path:
        """Where the stage's output lies, from its folder and its config as written."""
        if callable(self.output):
            return self.output(stage_dir, config)
        return stage_dir / "final" if self.output == "final" else stage_dir

    def execute(self, cfg: Any) -> dict[str, Any]:
        """Run the stage for a recipe; returns its result (the stage function's own summary)."""
        return self.run(cfg, resume="auto") if self.trains else self.run(cfg)

    def key_metric(self, result: dict[str, Any], cfg: Any) -> str:
        """The metric line, or "" when the result lacks what it reads."""
        try:
            return self.metric(result or {}, cfg)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            log.debug("no metric for %s: %r", self.kind, e)
        return ""

    def plan(self, ctx: Any, cfg: Any) -> dict[str, Any]:
        """The dry-run estimate (unknown where the stage has none)."""
        return self.estimate(ctx, cfg) if self.estimate is not None else dict(NO_ESTIMATE)


def kinds() -> list[str]:
    return list(STAGE_MODULES)


def get(kind: str) -> Stage:
    """The Stage of `kind` (its module imported now)."""
    stage = importlib.import_module(STAGE_MODULES[kind][0]).STAGE
    if stage.kind != kind:
        raise RuntimeError(f"{STAGE_MODULES[kind][0]}.STAGE is {stage.kind!r}, registered as {kind!r}")
    return stage


# ---- shared pieces of stage definitions ---------------------------------------------------------
def registered_name(result: dict[str, Any], cfg: Any) -> str:
    """The metric of a stage that writes a registry model: its name."""
    return result.get("name") or "done"


def weights_estimate(ctx: Any, model_ref: str, bytes_per_param: int) -> dict[str, Any]:
    """A stage that writes a copy of a model's weights: bytes per parameter on disk, the fp32
    model twice in memory."""
    model = ctx.meta_model(model_ref)
    if model is None:
        return dict(NO_ESTIMATE)
    params = sum(p.numel() for p in model.parameters())
    return {"disk": params * bytes_per_param, "memory": params * 4 * 2, "note": f"{params / 1e6:.1f} M params"}
