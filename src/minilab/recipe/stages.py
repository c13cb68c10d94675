"""The stage kinds a recipe can use: config class, what runs, where the output is, the key metric.

Each kind's config is the same typed dataclass its verb uses (so a recipe stage takes exactly the
keys of `minilab VERB --config`), except that the recipe owns `output_dir` (the stage's folder,
`<workdir>/<stage>`) and `force`; `models_dir` defaults to the recipe's registry.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minilab.config import ConfigError, from_dict, to_dict
from minilab.errors import MinilabError

log = logging.getLogger("minilab.recipe")

# Keys that change how a run is observed, not what it produces: outside the fingerprint.
RUNTIME_KEYS = {"interrupt_at_step", "tensorboard"}


# ---- configs of the kinds whose verbs take positional arguments -----------------------------------
@dataclass
class MergeStageConfig:
    model: str = field(default="", metadata={"help": "model with adapters: ${sft}, ${dpo}, a directory or name"})
    output_dir: str = field(default="", metadata={
        "help": "set by the recipe: the stage's folder in its workdir (a recipe may not set it)"})
    dtype: str | None = field(default=None, metadata={"help": "weights dtype of the merged model"})
    register: bool = field(default=True, metadata={
        "help": "enter the merged model into the registry under a generated name; false: only write it"})
    models_dir: str | None = field(default=None, metadata={
        "help": "registry root: where model names are looked up and the merged model is registered; default "
                "the recipe's (its models_dir, else $MINILAB_MODELS_DIR, else models/)"})

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("required: the model whose adapters to merge (e.g. ${dpo})", key="model")


@dataclass
class ExportStageConfig:
    model: str = field(default="", metadata={"help": "model to export: ${merge}, a directory or a registry name"})
    output_dir: str = field(default="", metadata={
        "help": "set by the recipe: the stage's folder in its workdir (a recipe may not set it)"})
    format: Literal["gguf", "hf"] = field(default="gguf", metadata={"help": "gguf file or transformers directory"})
    outtype: Literal["f32", "f16"] = field(default="f32", metadata={"help": "gguf: weight matrices' type"})
    dtype: str | None = field(default=None, metadata={"help": "hf: weights dtype (default as stored)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapters merged in first"})
    check: bool = field(default=True, metadata={
        "help": "hf: prove transformers loads the export with our logits; gguf: read it back with gguf's reader"})
    models_dir: str | None = field(default=None, metadata={
        "help": "registry root: where model names are looked up; default the recipe's (its models_dir, "
                "else $MINILAB_MODELS_DIR, else models/)"})

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("required: the model to export (e.g. ${merge})", key="model")


@dataclass
class QuantizeStageConfig:
    model: str = field(default="", metadata={"help": "model to quantize to int8"})
    output_dir: str = field(default="", metadata={
        "help": "set by the recipe: the stage's folder in its workdir (a recipe may not set it)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapters merged in before quantizing"})
    name: str | None = field(default=None, metadata={"help": "registry name (default: the parent's, type int8)"})
    models_dir: str | None = field(default=None, metadata={
        "help": "registry root: where model names are looked up and the int8 copy is registered; default "
                "the recipe's (its models_dir, else $MINILAB_MODELS_DIR, else models/)"})

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("required: the model to quantize (e.g. ${merge})", key="model")


@dataclass(frozen=True)
class Kind:
    name: str
    config: str             # "module:Class"
    output: str             # "dir": the stage folder; "final": <dir>/final; "file": <dir>/model.gguf or <dir>
    trains: bool = False    # a training loop with checkpoints: an interrupted run resumes
    help: str = ""

    def config_class(self) -> type:
        module, cls = self.config.split(":")
        return getattr(importlib.import_module(module), cls)

    def output_path(self, stage_dir: Path, config: dict[str, Any]) -> Path:
        if self.output == "final":
            return stage_dir / "final"
        if self.output == "file" and config.get("format", "gguf") == "gguf":
            return stage_dir / "model.gguf"
        return stage_dir


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("corpus", "minilab.data.corpus:CorpusConfig", "dir", help="raw sources -> cleaned corpus shards"),
    Kind("tokenizer", "minilab.data.tokenizer:TokenizerConfig", "dir", help="train or adopt a tokenizer"),
    Kind("pack", "minilab.data.pack:PackConfig", "dir", help="corpus -> packed token files"),
    Kind("pretrain", "minilab.pretrain:PretrainConfig", "final", trains=True, help="pretrain a model"),
    Kind("eval", "minilab.evaluate.stage:EvalConfig", "dir", help="perplexity, multiple choice, generations"),
    Kind("sft-data", "minilab.finetune.sft_data:SFTDataConfig", "dir", help="conversations -> SFT rows"),
    Kind("sft", "minilab.finetune.sft:SFTConfig", "final", trains=True, help="supervised fine-tuning"),
    Kind("dpo-data", "minilab.finetune.dpo_data:DPODataConfig", "dir", help="preference pairs -> DPO rows"),
    Kind("dpo", "minilab.finetune.dpo:DPOConfig", "final", trains=True, help="preference tuning"),
    Kind("merge", "minilab.recipe.stages:MergeStageConfig", "dir", help="adapters -> a full model"),
    Kind("export", "minilab.recipe.stages:ExportStageConfig", "file", help="GGUF file or HF directory"),
    Kind("quantize", "minilab.recipe.stages:QuantizeStageConfig", "dir", help="int8 copy of a model"),
)}


def build_config(recipe, stage, lookup, source: str) -> tuple[Any, dict[str, Any]]:
    """(the stage's typed config, its fingerprinted form): references substituted through
    `lookup(stage, attr)`, the recipe-owned keys set, every key checked by the config class."""
    from minilab.recipe.refs import substitute

    kind = KINDS[stage.kind]
    cls = kind.config_class()
    data = substitute(stage.config, lookup)
    names = {f for f in cls.__dataclass_fields__}
    for owned in ("output_dir", "force"):
        if owned in data:
            raise ConfigError(f"set by the recipe (the stage writes to {recipe.stage_dir(stage.name)}); remove it",
                              source=source, key=f"stages.{stage.name}.{owned}")
    fingerprinted = {k: v for k, v in data.items() if k not in RUNTIME_KEYS}
    data["output_dir"] = str(recipe.stage_dir(stage.name))
    if "force" in names:
        data["force"] = True  # the runner decides when a stage reruns; its folder is replaced then
    if "models_dir" in names and data.get("models_dir") is None and recipe.models_dir:
        data["models_dir"] = str(recipe.models_dir)
    if stage.kind == "eval" and "model_path" not in data:
        raise ConfigError("required: the model to evaluate (e.g. ${pretrain})", source=source,
                          key=f"stages.{stage.name}.model_path")
    return from_dict(cls, data, source=source, prefix=f"stages.{stage.name}."), fingerprinted


# ---- running a stage ----------------------------------------------------------------------------
def execute(kind: str, cfg: Any, stage_dir: Path) -> dict[str, Any]:
    """Run one stage; returns its result (the stage function's own summary)."""
    if kind == "corpus":
        from minilab.data.corpus import run
        return run(cfg)
    if kind == "tokenizer":
        from minilab.data.tokenizer import run
        return run(cfg)
    if kind == "pack":
        from minilab.data.pack import run
        return run(cfg)
    if kind == "pretrain":
        from minilab.pretrain import run
        return run(cfg, resume="auto")
    if kind == "eval":
        from minilab.evaluate.stage import run
        return run(cfg)
    if kind == "sft-data":
        from minilab.finetune.sft_data import run
        return run(cfg)
    if kind == "sft":
        from minilab.finetune.sft import run
        return run(cfg, resume="auto")
    if kind == "dpo-data":
        from minilab.finetune.dpo_data import run
        return run(cfg)
    if kind == "dpo":
        from minilab.finetune.dpo import run
        return run(cfg, resume="auto")
    if kind == "merge":
        from minilab.finetune.merge import merge
        return merge(cfg.model, output_dir=str(stage_dir), dtype=cfg.dtype, register=cfg.register,
                     models_dir=cfg.models_dir)
    if kind == "export":
        return _export(cfg, stage_dir)
    if kind == "quantize":
        from minilab.export.quantize import quantize_to_registry

        name, dest = quantize_to_registry(cfg.model, adapter=cfg.adapter, name=cfg.name, root=cfg.models_dir,
                                          output_dir=stage_dir)
        return {"name": name, "final_dir": str(dest)}
    raise MinilabError(f"unknown stage kind {kind}")


def _export(cfg: ExportStageConfig, stage_dir: Path) -> dict[str, Any]:
    from minilab.export.gguf import export_model

    out = KINDS["export"].output_path(stage_dir, {"format": cfg.format})
    stage_dir.mkdir(parents=True, exist_ok=True)
    path, size = export_model(cfg.model, cfg.format, out, adapter=cfg.adapter, outtype=cfg.outtype,
                              dtype=cfg.dtype, force=True, registry_root=cfg.models_dir)
    result: dict[str, Any] = {"format": cfg.format, "path": str(path), "bytes": size}
    if cfg.check and cfg.format == "hf":
        result["transformers_max_abs_diff"] = transformers_parity(path)
    elif cfg.check:
        from gguf import GGUFReader

        result["gguf_tensors"] = len(GGUFReader(str(path)).tensors)
    return result


def transformers_parity(model_dir: Path) -> float:
    """Max |logits difference| between our model and transformers' on the exported directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from minilab.loading import load_model_for_inference

    ours = load_model_for_inference(model_dir, dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    if diff > 1e-4:
        raise MinilabError(f"{model_dir}: transformers' logits differ from ours by {diff:.2e} (> 1e-4)")
    return diff


# ---- the key metric of each kind ------------------------------------------------------------------
def unigram_entropy(packed_dir: str | Path) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: the loss of a model that
    learned word frequencies and nothing else."""
    import numpy as np

    from minilab.data.pack import open_split

    tokens, _offsets, _manifest = open_split(packed_dir, "train")
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def metric(kind: str, result: dict[str, Any], cfg: Any) -> str:
    """One short line: the number that says whether the stage did its job."""
    r = result or {}
    try:
        if kind == "corpus":
            return f"{r['documents_kept']:,} docs, ~{r['approx_tokens']:,} tokens"
        if kind == "tokenizer":
            return f"vocab {r['vocab_size']:,}"
        if kind == "pack":
            return f"{r['splits']['train']['tokens']:,} train / {r['splits']['val']['tokens']:,} val tokens"
        if kind == "pretrain":
            return (f"val loss {r['val_loss']:.3f} (unigram entropy {unigram_entropy(cfg.data_dirs[0]):.3f})")
        if kind == "eval":
            parts = []
            for p in r.get("perplexity", [])[:1]:
                parts.append(f"ppl {p['perplexity']:.2f}")
                if p.get("bits_per_byte") is not None:
                    parts.append(f"{p['bits_per_byte']:.3f} bits/byte")
            for m in r.get("multiple_choice", [])[:1]:
                parts.append(f"mc acc {m['accuracy']['per_byte']['accuracy']:.3f}")
            if r.get("preference"):
                pref = r["preference"]
                win = pref.get("win_rate") if isinstance(pref, dict) else None
                if win is not None:
                    parts.append(f"win rate {win:.3f}")
            items = (r.get("generations") or {}).get("items") or []
            if items and not parts:
                stopped = sum(bool(it.get("greedy_stopped")) for it in items)
                parts.append(f"{stopped}/{len(items)} greedy answers end at a stop token")
            return ", ".join(parts) or "report written"
        if kind == "sft-data":
            sp = r["splits"]
            return f"{sp['train']['rows']:,} train / {sp['val']['rows']:,} val rows"
        if kind == "dpo-data":
            sp = r["splits"]
            return f"{sp['train']['chosen']['rows']:,} train / {sp['val']['chosen']['rows']:,} val pairs"
        if kind == "sft":
            return f"val loss {r['val_loss']:.3f}" + (f" ({r['name']})" if r.get("name") else "")
        if kind == "dpo":
            acc = r.get("val_reward_accuracy")
            head = f"reward acc {acc:.3f}, " if acc is not None else ""
            return f"{head}val loss {r['val_loss']:.3f}" + (f" ({r['name']})" if r.get("name") else "")
        if kind in ("merge", "quantize"):
            return r.get("name") or "done"
        if kind == "export":
            from minilab.fsutil import human_bytes

            extra = ""
            if "transformers_max_abs_diff" in r:
                extra = f", transformers parity {r['transformers_max_abs_diff']:.1e}"
            elif "gguf_tensors" in r:
                extra = f", {r['gguf_tensors']} tensors read back"
            return f"{r['format']} {human_bytes(r['bytes'])}{extra}"
    except (KeyError, TypeError, IndexError, ValueError) as e:
        log.debug("no metric for %s: %r", kind, e)
    return ""


def jsonable(result: Any) -> Any:
    """The result, trimmed to what a state file should keep (numbers, short strings, small dicts)."""
    if isinstance(result, dict):
        return {k: jsonable(v) for k, v in result.items() if k not in ("config", "shards", "sources", "template")}
    if isinstance(result, (list, tuple)):
        return [jsonable(v) for v in result[:50]]
    if isinstance(result, float) and not math.isfinite(result):
        return None
    if isinstance(result, (str, int, float, bool)) or result is None:
        return result if not isinstance(result, str) or len(result) < 2000 else result[:2000]
    return str(to_dict(result))
