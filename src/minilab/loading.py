"""The Python API for getting a model: `load_model_for_inference` and `load_model` (fine-tuning).

Both accept a directory (a minilab model directory or any Llama-architecture Hugging Face
directory) or a registry name, resolved by `minilab.registry.resolve_model_dir`:

    model = load_model_for_inference("models/tiny-shakespeare")      # eval mode
    logits = model(input_ids)                                         # (B, T, vocab)
    model = load_model("tiny-shakespeare", apply_lora=True, lora_config={"r": 4})

LoRA uses peft with `task_type=None` (a plain `PeftModel`): `PeftModelForCausalLM` (task
CAUSAL_LM) reads `prepare_inputs_for_generation` and other `PreTrainedModel` attributes in its
constructor, which our plain `nn.Module` does not have, and it adds nothing we use since
generation is ours. The adapters are the standard PEFT files either way.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilab.config import read_config_file
from minilab.errors import ConfigError, MinilabError
from minilab.hf import from_hf_config, load_weights_dir
from minilab.model import ModelConfig, Transformer
from minilab.registry import resolve_model_dir

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
# Short spellings people write in configs, mapped to peft's field names.
_LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "rank": "r"}


def _model_config(path: Path) -> tuple[ModelConfig, Path]:
    """(config, weights directory) of a model directory: minilab's are plain HF Llama directories."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MinilabError(f"{cfg_file}: not found (expected a minilab model directory or a "
                           "Hugging Face Llama directory)")
    return from_hf_config(read_config_file(cfg_file), str(cfg_file)), path


def _adapter_base(path: Path) -> str:
    """The base model of an adapter-only directory: adapter_config's base_model_name_or_path,
    else the registry manifest's parent."""
    for fname, key in (("adapter_config.json", "base_model_name_or_path"), ("manifest.json", "parent")):
        f = path / fname
        if f.is_file() and (base := read_config_file(f).get(key)):
            return str(base)
    raise MinilabError(f"{path}: adapters without a base model (set base_model_name_or_path in "
                       "adapter_config.json, or load the base and pass adapter_dir=)")


def _has_base(adapters: Path) -> bool:
    return bool(read_config_file(adapters / "adapter_config.json").get("base_model_name_or_path"))


def _load_base(path_or_name: str | Path, dtype: torch.dtype | str | None, device: torch.device | str | None,
               registry_root: str | Path | None) -> tuple[Transformer, Path, Path | None]:
    """(base model, its directory, adapters the directory implies). An adapter-only directory
    (a registered LoRA result) stands for its base model with these adapters."""
    path = resolve_model_dir(path_or_name, registry_root)
    if not (path / "config.json").is_file() and (path / "adapters" / "adapter_config.json").is_file():
        # A registered LoRA result: adapters in adapters/, base named there or in the manifest.
        base_name = _adapter_base(path / "adapters") if _has_base(path / "adapters") else _adapter_base(path)
        base, base_path, inner = _load_base(base_name, dtype, device, registry_root)
        if inner is not None:
            base = _attach_adapters(base, inner, trainable=False).merge_and_unload()
        return base, base_path, path / "adapters"
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        base_name = _adapter_base(path)
        if Path(base_name).expanduser().resolve() == path.resolve():
            raise MinilabError(f"{path}: adapter_config.json names the adapter directory itself as its base")
        base, base_path, inner = _load_base(base_name, dtype, device, registry_root)
        if inner is not None:  # adapters on an adapted model: bake the inner ones in
            base = _attach_adapters(base, inner, trainable=False).merge_and_unload()
        return base, base_path, path
    cfg, weights_dir = _model_config(path)
    from minilab.quantization import is_int8_dir, load_int8_dir  # `minilab quantize --int8` output

    if is_int8_dir(path):
        return load_int8_dir(cfg, path, device=device), path, None
    return load_weights_dir(cfg, weights_dir, dtype=dtype, device=device), path, None


def _adapter_path(model_dir: Path, adapter_dir: str | Path) -> Path:
    """`adapter_dir` as given, or relative to the model directory (so "adapters" works)."""
    given = Path(adapter_dir).expanduser()
    for cand in (given, model_dir / given):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise MinilabError(f"{adapter_dir}: no adapter_config.json there or under {model_dir} "
                       "(expected a PEFT adapter directory)")


def _attach_adapters(model: Transformer, path: Path, trainable: bool) -> nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. size mismatch: adapters of another model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MinilabError(f"{path}: cannot apply these adapters to the model: {first}") from None


def lora_settings(lora_config: dict[str, Any] | None) -> dict[str, Any]:
    """Our defaults overlaid with `lora_config` (aliases accepted); unknown keys are a ConfigError."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    settings = dict(LORA_DEFAULTS)
    for key, value in (lora_config or {}).items():
        name = _LORA_ALIASES.get(key, key)
        if name not in known:
            near = difflib.get_close_matches(key, sorted(known | set(_LORA_ALIASES)), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown LoRA setting{hint}", source="lora_config", key=key)
        if name == "task_type" and value is not None:
            raise ConfigError("must be None: minilab models are plain nn.Modules, not PreTrainedModels",
                              source="lora_config", key=key)
        settings[name] = value
    return settings


def wrap_lora(model: Transformer, lora_config: dict[str, Any] | None = None) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters (base weights frozen); returns the `PeftModel`."""
    from peft import LoraConfig, get_peft_model

    settings = lora_settings(lora_config)
    try:
        config = LoraConfig(task_type=None, **{k: v for k, v in settings.items() if k != "task_type"})
        return get_peft_model(model, config)
    except (ValueError, TypeError) as e:  # peft's own checks: r <= 0, no module matched, ...
        raise ConfigError(" ".join(str(e).split()), source="lora_config") from None


def load_model_for_inference(path_or_name: str | Path, *, dtype: torch.dtype | str | None = None,
                             device: torch.device | str | None = None, registry_root: str | Path | None = None,
                             adapter_dir: str | Path | None = None) -> Transformer:
    """A model ready to run: eval mode, no gradients needed; `model(input_ids)` gives logits.

    `adapter_dir` (a PEFT directory, absolute or relative to the model dir) is merged into the
    weights, so the result is a plain `Transformer` as fast as the base model.
    """
    model, path, implied = _load_base(path_or_name, dtype, device, registry_root)
    for adapters in (implied, _adapter_path(path, adapter_dir) if adapter_dir is not None else None):
        if adapters is not None:
            model = _attach_adapters(model, adapters, trainable=False).merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


def load_model(path_or_name: str | Path, *, apply_lora: bool = False, lora_config: dict[str, Any] | None = None,
               adapter_dir: str | Path | None = None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, registry_root: str | Path | None = None) -> nn.Module:
    """A model for fine-tuning, in train mode.

    Plain: a `Transformer` with every weight trainable. `apply_lora`: a peft `PeftModel` with new
    LoRA adapters (defaults `LORA_DEFAULTS`, overridden by `lora_config`) and frozen base weights.
    `adapter_dir`: existing PEFT adapters loaded trainable, to continue training them; an
    adapter-only directory (base named in its adapter_config.json or manifest) does the same.
    """
    if lora_config is not None and not apply_lora:
        raise ConfigError("lora_config given without apply_lora=True", source="load_model", key="lora_config")
    if apply_lora and adapter_dir is not None:
        raise ConfigError("give apply_lora (new adapters) or adapter_dir (existing ones), not both",
                          source="load_model", key="adapter_dir")
    if apply_lora:
        lora_settings(lora_config)  # fail on a bad key before spending time on the weights
    model, path, implied = _load_base(path_or_name, dtype, device, registry_root)
    adapters = _adapter_path(path, adapter_dir) if adapter_dir is not None else implied
    if apply_lora:
        if implied is not None:  # fine-tune the adapted model: bake its adapters in first
            model = _attach_adapters(model, implied, trainable=False).merge_and_unload()
        return wrap_lora(model, lora_config).train()
    if adapters is not None:
        if implied is not None and adapters != implied:
            raise ConfigError(f"{path} is itself an adapter directory; adapter_dir= cannot add more",
                              source="load_model", key="adapter_dir")
        return _attach_adapters(model, adapters, trainable=True).train()
    return model.train()
