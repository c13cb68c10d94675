"""`minilab quantize MODEL --int8`: an int8 copy of a model in the registry (`…-int8-vN`).

The quantization itself and the int8 directory format (config.json `quantization_config` with
`quant_method: minilab_int8`, int8 weights plus float32 per-row scales) live in
`minilab.quantization`, which loading and inference read without importing this verb.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilab.config import models_dir_field, recipe_output_dir_field
from minilab.errors import ConfigError, MinilabError
from minilab.quantization import is_int8_dir, quantize_int8, save_int8_dir
from minilab.stage import Stage, registered_name, weights_estimate


@dataclass
class QuantizeStageConfig:
    """`minilab quantize --int8` as a recipe stage: the int8 copy is written into the stage's folder."""

    model: str = field(default="", metadata={"help": "model to quantize to int8"})
    output_dir: str = recipe_output_dir_field()
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapters merged in before quantizing"})
    name: str | None = field(default=None, metadata={"help": "registry name (default: the parent's, type int8)"})
    models_dir: str | None = models_dir_field(
        ": where model names are looked up and the int8 copy is registered", recipe_stage=True)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("required: the model to quantize (e.g. ${merge})", key="model")


# ---- the `quantize` verb -----------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    p.add_argument("model", metavar="MODEL", help="registry name or model directory")
    p.add_argument("--int8", action="store_true", required=True,
                   help="int8 dynamic quantization (CPU); the only saved format for now")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapters merged before quantizing")
    p.add_argument("--name", help="registry name (default: the parent's fields with training type int8)")
    flag(p, "--models-dir", metavar="DIR", help="registry root (default: $MINILAB_MODELS_DIR or ./models)")


def quantize_to_registry(model_ref: str, *, adapter: str | None = None, name: str | None = None,
                         root: str | None = None, output_dir: str | Path | None = None) -> tuple[str, Path]:
    """Quantize `model_ref` to int8 and register it; returns (name, directory). The model is
    copied into the registry root, or written to `output_dir` and registered there (linked)."""
    from minilab import registry
    from minilab.loading import load_model_for_inference
    from minilab.registry import resolve_model_dir

    src = resolve_model_dir(model_ref, root)
    if is_int8_dir(src):
        raise MinilabError(f"{model_ref} is already int8")
    model = load_model_for_inference(model_ref, adapter_dir=adapter, registry_root=root, dtype="float32")
    params = model.num_params()
    quantize_int8(model)
    parent = registry.read_manifest(src)
    parent_name = parent.get("name") or (model_ref if not Path(model_ref).exists() else None)
    if name is None:
        dataset = parent.get("dataset") or "custom"
        name = registry.make_name(parent.get("architecture") or "llama", params, dataset, "int8", root)
    keep = {k: parent[k] for k in ("tokenizer_sha256", "data", "model_config", "dataset", "architecture")
            if k in parent}
    fields = dict(parent=parent_name, params=params, adapter=str(adapter) if adapter else None,
                  quantization="int8", **keep)
    if output_dir is not None:
        registry.release_path(output_dir, root)  # quantized again into the same folder: the old name goes
        out = save_int8_dir(model, src, Path(output_dir))
        return name, registry.register(out, name, root=root, link=True, **fields)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_int8_dir(model, src, Path(tmp) / "int8")
        dest = registry.register(out, name, root=root, link=False, **fields)
    return name, dest


def main(args: argparse.Namespace) -> int:
    from minilab.fsutil import dir_size, human_bytes
    from minilab.registry import resolve_model_dir

    src = resolve_model_dir(args.model, args.models_dir)
    name, dest = quantize_to_registry(args.model, adapter=args.adapter, name=args.name, root=args.models_dir)
    print(f"{name}: {dest} ({human_bytes(dir_size(dest))}, was {human_bytes(dir_size(src))})")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _run_stage(cfg: QuantizeStageConfig) -> dict[str, Any]:
    name, dest = quantize_to_registry(cfg.model, adapter=cfg.adapter, name=cfg.name, root=cfg.models_dir,
                                      output_dir=Path(cfg.output_dir))
    return {"name": name, "final_dir": str(dest)}


STAGE = Stage("quantize", QuantizeStageConfig, run=_run_stage, metric=registered_name, model_input="model",
              estimate=lambda ctx, cfg: weights_estimate(ctx, cfg.model, 1))
