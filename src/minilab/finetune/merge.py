"""`minilab merge MODEL_WITH_ADAPTERS`: bake LoRA/QLoRA adapters into a full-weight registry model.

    minilab merge llama-2.3M-demo-lora-v1            # -> llama-2.3M-demo-merged-v1

The base is always loaded in full precision (as stored, or `--dtype`), and the adapters are
added to those weights: adapters trained with QLoRA on a 4-bit NF4 copy are merged onto the
original weights, never onto the quantized ones (re-rounding them to 4 bits would add the
quantization error to every merged weight).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minilab.config import models_dir_field, recipe_output_dir_field
from minilab.errors import ConfigError, MinilabError
from minilab.stage import Stage, registered_name, weights_estimate

log = logging.getLogger("minilab.merge")


@dataclass
class MergeStageConfig:
    """`minilab merge` as a recipe stage: the merged model is written into the stage's folder."""

    model: str = field(default="", metadata={"help": "model with adapters: ${sft}, ${dpo}, a directory or name"})
    output_dir: str = recipe_output_dir_field()
    dtype: str | None = field(default=None, metadata={"help": "weights dtype of the merged model"})
    register: bool = field(default=True, metadata={
        "help": "enter the merged model into the registry under a generated name; false: only write it"})
    models_dir: str | None = models_dir_field(
        ": where model names are looked up and the merged model is registered", recipe_stage=True)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("required: the model whose adapters to merge (e.g. ${dpo})", key="model")


def merge(model: str, *, output_dir: str | None = None, dtype: str | None = None, register: bool = True,
          models_dir: str | None = None, force: bool = False) -> dict[str, Any]:
    """Merge the adapters of `model` (registry name or directory) and write a full model.

    The default output (beside the source) is replaced by a new merge; an `output_dir` that
    exists only with `force`."""
    from minilab import registry
    from minilab.finetune.common import write_chat_tokenizer
    from minilab.finetune.templates import ChatTemplate
    from minilab.fsutil import read_json_if_present
    from minilab.hf import save_hf_dir
    from minilab.loading import load_model_for_inference
    from minilab.registry import resolve_model_dir
    from minilab.tokenization import EOS_TOKEN

    src = resolve_model_dir(model, models_dir)
    if not (src / "adapters" / "adapter_config.json").is_file() and not (src / "adapter_config.json").is_file():
        raise MinilabError(f"{src}: no adapters to merge (expected adapters/adapter_config.json)")
    out = Path(output_dir) if output_dir else src.parent / f"{src.name}-merged"
    manifest = registry.read_manifest(src)
    base = manifest.get("base_model") or {}
    _check_output(out, src, manifest, force=force or not output_dir, models_dir=models_dir)
    if base.get("backend") == "transformers":
        return _merge_transformers(src, manifest, out, dtype, register, models_dir)
    merged = load_model_for_inference(src, dtype=dtype, device="cpu", registry_root=models_dir)
    save_hf_dir(merged, out, tokenizer_dir=src, overwrite=True)  # an existing `out` was allowed above
    chat = manifest.get("chat") or {}
    if chat:  # keep the chat template and the end-of-turn stop of the adapted model
        cfg = read_json_if_present(src / "tokenizer_config.json")
        write_chat_tokenizer(src, out, ChatTemplate(chat["template"], cfg.get("chat_template", ""),
                                                    chat["end_token"], "", str(cfg.get("eos_token") or EOS_TOKEN)))
    return _register(out, src, manifest, merged.num_params(), merged.config.architecture, register,
                     models_dir)


def _check_output(out: Path, src: Path, manifest: dict[str, Any], *, force: bool, models_dir: str | None) -> None:
    """Before loading anything: `out` may only be a new path or an earlier merge (a minilab model),
    never the adapters' own folder or one holding it (a run directory), their base model, or a
    registered model that others name as parent or base."""
    from minilab import registry
    from minilab.owned import check_output

    reading = [src]
    base = manifest.get("base_model")
    if isinstance(base, dict) and isinstance(base.get("path"), str):
        reading.append(Path(base["path"]))
    parent = manifest.get("parent")
    if isinstance(parent, str):
        with contextlib.suppress(MinilabError):
            reading.append(registry.resolve_model_dir(parent, models_dir))
    check_output(out, force, {"model"}, reading=tuple(reading))
    if out.is_dir():
        registry.refuse_if_depended_on(str(out), out, registry.models_root(models_dir),
                                        "choose another --output-dir")


def _merge_transformers(src: Path, manifest: dict[str, Any], out: Path, dtype: str | None,
                        register: bool, models_dir: str | None) -> dict[str, Any]:
    """Adapters on a model that only transformers runs: merge through peft on the HF model."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minilab.fsutil import atomic_dir

    base = manifest["base_model"]
    hf = AutoModelForCausalLM.from_pretrained(base["path"], dtype=getattr(torch, dtype) if dtype else torch.float32)
    merged = PeftModel.from_pretrained(hf, str(src / "adapters")).merge_and_unload()
    with atomic_dir(out, overwrite=True) as tmp:  # replaced whole: no file of an older merge stays
        merged.save_pretrained(str(tmp))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
    n = sum(p.numel() for p in merged.parameters())
    return _register(out, src, manifest, n, base.get("model_type") or "hf", register, models_dir)


def _register(out: Path, src: Path, manifest: dict[str, Any], params: int, arch: str, register: bool,
              models_dir: str | None) -> dict[str, Any]:
    from minilab import registry

    fields = dict(training_type="merged", parent=manifest.get("name"), base_model=manifest.get("base_model"),
                  method=manifest.get("method"), chat=manifest.get("chat"), data=manifest.get("data", []),
                  tokenizer_sha256=manifest.get("tokenizer_sha256"), metrics=manifest.get("metrics", {}),
                  params=params, merged_from=str(src.resolve()),
                  merge={"onto": "full-precision base", "quantized_training": manifest.get("method") == "qlora"})
    name = None
    if register:
        dataset = manifest.get("dataset") or "merged"
        name = registry.make_name(arch, params, dataset, "merged", root=models_dir)
        registry.release_path(out, models_dir)  # merged again into the same folder: the old name goes
        registry.write_manifest(out, name=name, **fields)
        registry.register(out, name, root=models_dir, link=True)
    else:
        registry.write_manifest(out, name=None, **fields)
    log.info("merged %s -> %s", src, out)
    return {"final_dir": str(out), "name": name}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    p.add_argument("model", metavar="MODEL_WITH_ADAPTERS", help="registry name or directory with adapters/")
    flag(p, "--output-dir", metavar="DIR", help="where to write the merged model (default beside the source)")
    p.add_argument("--dtype", help="weights dtype of the merged model (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace an existing --output-dir")
    flag(p, "--no-register", action="store_true", help="do not enter the result into the registry")
    flag(p, "--models-dir", metavar="DIR", help="registry root")


def main(args: argparse.Namespace) -> int:
    r = merge(args.model, output_dir=args.output_dir, dtype=args.dtype, register=not args.no_register,
              models_dir=args.models_dir, force=args.force)
    print(f"merged model: {r['final_dir']}")
    if r["name"]:
        print(f"registry name: {r['name']}")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _run_stage(cfg: MergeStageConfig) -> dict[str, Any]:
    return merge(cfg.model, output_dir=cfg.output_dir, dtype=cfg.dtype, register=cfg.register,
                 models_dir=cfg.models_dir)


STAGE = Stage("merge", MergeStageConfig, run=_run_stage, metric=registered_name, model_input="model",
              estimate=lambda ctx, cfg: weights_estimate(ctx, cfg.model, 4))
