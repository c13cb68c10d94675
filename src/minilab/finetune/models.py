"""Base models for fine-tuning: our Llama models, any HF directory or hub id, LoRA and QLoRA.

Where the base comes from:
- a registry name or a directory holding a Llama-architecture HF model -> our `Transformer`
  (`minilab.loading`), so exports, generation and merges stay ours;
- any other HF directory, or a hub id (`TinyLlama/...`, `microsoft/phi-2`, ...) fetched through
  `huggingface_hub` (which respects HF_HOME and HF_HUB_OFFLINE) -> `transformers`'
  `AutoModelForCausalLM`; `backend="transformers"` forces this path for Llama too.

QLoRA replaces the frozen linear layers by bitsandbytes `Linear4bit` (NF4, double quantization)
before peft adds adapters; current bitsandbytes releases run these layers on the CPU as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilab.errors import ConfigError, MinilabError
from minilab.linear_ce import hf_fuses_loss, linear_cross_entropy, peft_base

log = logging.getLogger("minilab.finetune")

# Default LoRA targets per HF model_type: every projection of attention and MLP (QLoRA paper:
# adapting all linear layers matters more than the rank).
LORA_TARGETS_BY_ARCH = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
for _arch in ("mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "smollm3", "olmo2"):
    LORA_TARGETS_BY_ARCH[_arch] = LORA_TARGETS_BY_ARCH["llama"]


@dataclass
class BaseModel:
    """A loaded base: `model` computes logits from input ids; `peft` is the module peft wraps."""

    model: nn.Module
    backend: str           # "minilab" or "transformers"
    path: Path             # the directory its weights came from
    name: str              # registry name, hub id, or directory as given
    model_type: str
    tokenizer_dir: Path


class LogitsOnly(nn.Module):
    """Calls a transformers model and returns its logits, so every loop can do `model(x)`; with
    `targets` (training, where `fused_loss` holds) the loss instead, head and loss fused
    (`minilab.linear_ce`) as in `Transformer.forward`. Holds the model as `inner` (PEFT-wrapped for
    LoRA/QLoRA); adapters are saved from `inner`, so their names stay standard."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def causal_lm(self) -> nn.Module:
        """The transformers model itself; under PEFT its LoRA layers are injected in place."""
        return peft_base(self.inner)

    def fused_loss(self) -> bool:
        return hf_fuses_loss(self.causal_lm())

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "sum", **_ignored) -> torch.Tensor:
        if targets is None:
            return self.inner(input_ids=input_ids, use_cache=False).logits
        if not self.fused_loss():
            raise ValueError("targets= needs a model whose logits are its plain head's (see LogitsOnly.fused_loss)")
        lm = self.causal_lm()
        hidden = lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden, lm.get_output_embeddings().weight, targets, ignore_index, reduction,
                                    softcap=getattr(lm.config, "final_logit_softcapping", None))


def resolve_base_dir(name: str, registry_root: str | None = None) -> tuple[Path, str]:
    """(directory, how it was found): a directory, a registry name, or a hub id downloaded through
    huggingface_hub into its cache."""
    from minilab.registry import resolve_model_dir

    try:
        return resolve_model_dir(name, registry_root), "local"
    except MinilabError as local_error:
        if name.count("/") != 1 or Path(name).expanduser().exists():
            raise
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                   "*.txt", "*.jinja"])
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line for the user
            raise MinilabError(f"'{name}' is neither a local model ({local_error}) nor a downloadable hub "
                               f"model: {str(e).splitlines()[0]}") from None
        return Path(path), "hub"


def resolve_tokenizer_dir(ref: str, registry_root: str | None = None) -> Path:
    """A folder holding tokenizer.json: `ref` itself, a registry model's folder, or a hub model's
    snapshot in the Hugging Face cache (HF_HOME), so data for a hub model needs no path digging."""
    p = Path(ref).expanduser()
    if (p / "tokenizer.json").is_file():
        return p
    path, _how = resolve_base_dir(ref, registry_root)
    if not (path / "tokenizer.json").is_file():
        raise MinilabError(f"{ref}: no tokenizer.json in {path} (give the model or tokenizer folder)")
    return path


def model_type_of(path: Path) -> str:
    cfg = path / "config.json"
    if cfg.is_file():
        return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type") or "unknown")
    return "adapters"  # an adapter-only minilab directory: its base is a minilab model


def _is_ours(path: Path) -> bool:
    """A directory our loader reads: an adapter-only minilab model, or a Llama-compatible HF dir."""
    if not (path / "config.json").is_file():
        return True
    from minilab.hf import read_hf_config

    try:
        read_hf_config(path)
        return True
    except MinilabError:
        return False


def load_base(name: str, *, backend: str = "auto", device: torch.device, dtype: str | None = None,
              registry_root: str | None = None) -> BaseModel:
    """The base model in full precision (or `dtype`), on `device`, every weight still trainable.
    An adapter-only directory (a LoRA result) stands for its base with those adapters merged."""
    from minilab.loading import load_model_for_inference

    path, _ = resolve_base_dir(name, registry_root)
    if backend not in ("auto", "minilab", "transformers"):
        raise ConfigError("must be auto, minilab or transformers", key="backend")
    if backend == "minilab" or (backend == "auto" and _is_ours(path)):
        model = load_model_for_inference(path, dtype=dtype, device=device, registry_root=registry_root)
        model.requires_grad_(True)
        return BaseModel(model.train(), "minilab", path, name, model_type_of(path) if (path / "config.json")
                         .is_file() else "llama", _tokenizer_dir(path, registry_root))
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise MinilabError(f"{path}: transformers cannot load this model: {str(e).splitlines()[0]}") from None
    return BaseModel(LogitsOnly(hf.to(device)).train(), "transformers", path, name, hf.config.model_type, path)


def _tokenizer_dir(path: Path, registry_root: str | None) -> Path:
    """The directory whose tokenizer files belong to the model (adapter dirs carry their own)."""
    if (path / "tokenizer.json").is_file():
        return path
    raise MinilabError(f"{path}: no tokenizer.json (a model directory must ship its tokenizer)")


def peft_target(base: BaseModel) -> nn.Module:
    """The module adapters are attached to (their names then match the standard checkpoints)."""
    return base.model.inner if isinstance(base.model, LogitsOnly) else base.model


def enable_gradient_checkpointing(base: BaseModel) -> None:
    """Recompute each decoder block's activations during backward instead of keeping them. Works
    with frozen bases and adapters: non-reentrant checkpointing needs no input that requires grad."""
    from minilab.model import Transformer

    model = peft_target(base)
    if isinstance(model, Transformer):
        model.config.gradient_checkpointing = True
    elif getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; "
                          "set gradient_checkpointing=false", key="gradient_checkpointing")


def default_targets(model_type: str) -> list[str] | str:
    return LORA_TARGETS_BY_ARCH.get(model_type, "all-linear")


def quantize_4bit(module: nn.Module, targets: list[str] | str, device: torch.device,
                  compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace the targeted `nn.Linear` layers by bitsandbytes NF4 `Linear4bit` with double
    quantization (QLoRA), in place; returns how many were replaced."""
    from minilab.quantization import linear4bit

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MinilabError("QLoRA needs bitsandbytes (pip install bitsandbytes); or use --method lora") from None
    replaced = 0
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or (f"{parent_name}.{child_name}".endswith("lm_head")):
                continue
            if targets != "all-linear" and child_name not in targets:
                continue
            q = linear4bit(bnb, child.in_features, child.out_features, bias=child.bias is not None,
                           compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
            try:
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to(device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            except (RuntimeError, NotImplementedError, AttributeError, ValueError) as e:
                raise MinilabError(f"the installed bitsandbytes cannot run 4-bit layers on {device} "
                                   f"({str(e).splitlines()[0][:120]}); use --method lora instead") from None
            setattr(parent, child_name, q)
            replaced += 1
    if replaced == 0:
        raise ConfigError(f"no linear layer matched the LoRA targets {targets}", key="lora.target_modules")
    with contextlib.suppress(AttributeError):  # peft picks its bnb LoRA layer for 4-bit models
        module.is_loaded_in_4bit = True
    return replaced


def apply_method(base: BaseModel, method: str, lora: dict[str, Any], device: torch.device) -> nn.Module:
    """Freeze and wrap the base for `method` (lora, qlora, full); returns the module to train.
    For LoRA/QLoRA the returned module's `peft` attribute is the `PeftModel`."""
    from minilab.loading import wrap_lora

    if method == "full":
        return base.model
    if method not in ("lora", "qlora"):
        raise ConfigError("must be lora, qlora or full", key="method")
    settings = dict(lora)
    settings.setdefault("target_modules", default_targets(base.model_type))
    target = peft_target(base)
    if method == "qlora":
        n = quantize_4bit(target, settings["target_modules"], device)
        log.info("QLoRA: %d linear layers quantized to NF4 (double quantization)", n)
    peft_model = wrap_lora(target, settings)
    if method == "qlora":
        peft_model.to(device)  # the unquantized rest (embeddings, norms, head), loaded on the CPU
    if isinstance(base.model, LogitsOnly):
        base.model.inner = peft_model
        return base.model
    return peft_model


def peft_of(model: nn.Module) -> nn.Module | None:
    """The `PeftModel` inside a training module, or None for full fine-tuning."""
    from peft import PeftModel

    inner = model.inner if isinstance(model, LogitsOnly) else model
    return inner if isinstance(inner, PeftModel) else None


class TrainableView(nn.Module):
    """Only the trainable parameters of a model (shared, not copied), for compact checkpoints:
    a LoRA checkpoint then holds the adapters and their optimizer state, not the frozen base."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "__"): p for n, p in model.named_parameters()
                                        if p.requires_grad})
