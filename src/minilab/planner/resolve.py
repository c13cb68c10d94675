"""Model references -> a model built on the `meta` device.

`minilab plan MODEL` accepts, in this order of precedence:

1. an existing path: a minilab architecture JSON, a Hugging Face `config.json`, or a directory
   holding a `config.json` (a minilab model directory is a plain HF Llama directory);
2. a minilab preset name (`micro`, `tiny`, ...);
3. a registry name (`llama-23M-tinystories-pretrain-v1`);
4. a hub id (`org/name`), looked up in the local Hugging Face cache only (`HF_HOME` and
   `HF_HUB_CACHE` respected). Nothing is ever downloaded: a missing id is a one-line error.

Llama-architecture configs are built as our own `Transformer` (same parameter names and
counts as `LlamaForCausalLM`, and no transformers import, which alone costs seconds); Mistral with
a sliding window, Qwen2, Gemma, Phi and GPT-2 as `skeletons.py` module trees, from the config
mapping itself when it is complete, else from transformers' config class (tested equal to
transformers' own); every other architecture is built by
`transformers.AutoModelForCausalLM.from_config` under `torch.device("meta")`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilab.config import read_json_object
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import hf_hub_cache
from minilab.model import ModelConfig


@dataclass
class ModelSpec:
    """What a reference resolved to: a label, where it came from, and one of the two configs."""

    name: str
    source: str
    minilab_config: ModelConfig | None = None
    hf_config: dict[str, Any] | None = None
    # dtype the weights are stored in (config.json's `dtype`/`torch_dtype`); None for minilab presets.
    stored_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "minilab" if self.minilab_config is not None else "transformers"


def _is_hf_config(data: dict[str, Any]) -> bool:
    return "model_type" in data or "architectures" in data


def spec_from_hf_config(data: dict[str, Any], name: str, source: str) -> ModelSpec:
    """A spec for a HF config mapping; Llama-compatible ones become our own model config."""
    from minilab.hf import from_hf_config

    dtype = data.get("dtype") or data.get("torch_dtype")
    try:
        cfg = from_hf_config(data, source)
    except ConfigError:
        cfg = None  # not plain Llama math: transformers builds it
    return ModelSpec(name=name, source=source, minilab_config=cfg, hf_config=dict(data),
                     stored_dtype=str(dtype) if dtype else None)


def _from_path(path: Path, label: str) -> ModelSpec:
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise MinilabError(f"{path}: no config.json (expected a model directory)")
        return spec_from_hf_config(read_json_object(cfg_file), label, str(cfg_file))
    data = read_json_object(path) if path.suffix == ".json" else None
    if data is not None and _is_hf_config(data):
        return spec_from_hf_config(data, label, str(path))
    from minilab.arch import load_architecture

    return ModelSpec(name=label, source=str(path), minilab_config=load_architecture(path))


def _from_hub_cache(repo_id: str) -> ModelSpec:
    from huggingface_hub import try_to_load_from_cache

    cache = hf_hub_cache()  # read at call time: tests and users set HF_HOME after import
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache))
    if not isinstance(found, str):
        raise MinilabError(f"'{repo_id}' is not in the local Hugging Face cache ({cache}); minilab plan never "
                           f"downloads: run 'hf download {repo_id} config.json' or give a local config.json")
    return spec_from_hf_config(read_json_object(Path(found)), repo_id, found)


def resolve_model(ref: str | os.PathLike | dict[str, Any] | ModelConfig,
                  models_dir: str | os.PathLike | None = None) -> ModelSpec:
    """Resolve a model reference (see the module docstring) without building anything."""
    if isinstance(ref, ModelConfig):
        return ModelSpec(name="model", source="ModelConfig", minilab_config=ref)
    if isinstance(ref, dict):
        if _is_hf_config(ref):
            return spec_from_hf_config(ref, ref.get("_name_or_path") or ref.get("model_type", "model"), "mapping")
        from minilab.arch import load_architecture

        return ModelSpec(name="model", source="mapping", minilab_config=load_architecture(ref))
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(path, path.name if path.name != "config.json" else path.parent.name)
    from minilab.arch import load_architecture, preset_names

    if text in preset_names():
        return ModelSpec(name=text, source="preset", minilab_config=load_architecture(text))
    if text.count("-") == 4 and "/" not in text:
        from minilab.registry import resolve_model_dir

        return _from_path(resolve_model_dir(text, models_dir), text)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return _from_hub_cache(text)
    raise MinilabError(f"cannot resolve model '{text}': not a file or directory, a preset "
                       f"({', '.join(preset_names())}), a registry name or a cached hub id (org/name)")


def build_meta(spec: ModelSpec) -> nn.Module:
    """The model on the `meta` device: parameters with shapes and dtypes, no storage."""
    if spec.minilab_config is not None:
        from minilab.model import build_model

        return build_model(spec.minilab_config, device="meta")
    from minilab.planner import skeletons

    data = {k: v for k, v in spec.hf_config.items() if k not in ("auto_map",)}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("no model_type: cannot tell which architecture to build", source=spec.source)
    raw = skeletons.raw_config(model_type, data)
    if raw is not None and skeletons.supported(raw):  # no transformers import at all
        try:
            return skeletons.build_skeleton(raw)
        except (TypeError, ValueError, RuntimeError):
            pass  # values of the wrong kind: transformers' config class below says which, in one line
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type, **data)
    except (StrictDataclassError, ValueError, KeyError, TypeError) as e:  # transformers 5 configs are strict
        raise ConfigError(f"transformers cannot read this config: {' '.join(str(e).split())[:200]}",
                          source=spec.source) from None
    if skeletons.supported(config):  # the same tree without importing transformers' modeling code (seconds)
        return skeletons.build_skeleton(config)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
