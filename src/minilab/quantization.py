"""Quantized models: int8 (torch, CPU) in memory and on disk, bitsandbytes 8-bit / 4-bit NF4 as load options.

- **int8 (CPU, torch)**: every linear layer of the transformer blocks becomes
  `torch.ao.nn.quantized.dynamic.Linear`: int8 weights with one scale per output row (symmetric,
  zero point 0), activations quantized on the fly per batch. The embeddings, the norms and the
  output head stay in floating point: the head sets every logit, and on small models it shares
  its weight with the embedding, so quantizing it costs the most quality for the least memory.
- **8-bit / 4-bit NF4 (bitsandbytes)**: the same layers swapped for `bnb.nn.Linear8bitLt` /
  `Linear4bit`; bitsandbytes is imported only when asked for, and a missing install is a one-line
  error. Such models are not saved (bitsandbytes has its own formats); they are a load option.

The int8 directory format (written by `minilab quantize --int8`, see `minilab.export.quantize`):
config.json with a `quantization_config` (`quant_method: minilab_int8`), a model.safetensors
holding each quantized weight as int8 `NAME.weight` plus float32 `NAME.weight_scale` (out,), the
other tensors as they were, and the tokenizer. It loads with `load_model_for_inference` (exactly
the model that was quantized in memory, scales included) but not with transformers, which knows
no such method. This module sits below `loading` and `inference`, which read it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilab.errors import MinilabError

QUANT_METHOD = "minilab_int8"
_SKIP_FILES = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "manifest.json",
               "config.json"}


def _block_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the transformer blocks (what gets quantized)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _dynamic_linear(qweight: torch.Tensor) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    out_f, in_f = qweight.shape
    layer = DynLinear(in_f, out_f, bias_=False, dtype=torch.qint8)
    layer.set_weight_bias(qweight, None)
    return layer


def quantize_int8(model: nn.Module) -> nn.Module:
    """Block linears -> dynamic int8 (per-row symmetric scales); in place, returns the model (CPU only)."""
    from torch.ao.quantization.observer import default_per_channel_weight_observer

    if next(model.parameters()).device.type != "cpu":
        raise MinilabError("--int8 is torch's CPU dynamic quantization; use --load-in-8bit on a GPU")
    model = model.float()
    for name in _block_linears(model):
        w = model.get_submodule(name).weight.detach()
        observer = default_per_channel_weight_observer()  # per output row, symmetric qint8
        observer(w)
        scale, zero = observer.calculate_qparams()
        with warnings.catch_warnings():  # torch 2.13 flags its quantized tensors as deprecated; pinned, so fine
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale.double(), zero.long(), 0, torch.qint8)
        _set_module(model, name, _dynamic_linear(qweight))
    model.quantization = "int8"
    return model


def linear4bit(bnb: Any, in_features: int, out_features: int, **kwargs: Any) -> nn.Module:
    """A bitsandbytes NF4 `Linear4bit`. On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the
    weight for its own kernel on the first no-grad forward; that repacking needs out_features % 32 == 0
    and in_features % 64 (the 4-bit block size) == 0 and otherwise fails ("shape '[32, 0]' is
    invalid"), so it is switched off for layers of other shapes (they take the generic path)."""
    q = bnb.nn.Linear4bit(in_features, out_features, **kwargs)
    if out_features % 32 or in_features % 64:
        q.support_avx512bf16_for_cpu = False
    return q


def quantize_bnb(model: nn.Module, kind: str) -> nn.Module:
    """Block linears -> bitsandbytes 8-bit (`bnb8`) or 4-bit NF4 (`nf4`) layers, on the model's device."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        flag = "--load-in-4bit" if kind == "nf4" else "--load-in-8bit"
        raise MinilabError(f"{flag} needs bitsandbytes: pip install bitsandbytes (or use --int8 on a CPU)") from None
    device = next(model.parameters()).device
    compute = next(model.parameters()).dtype
    for name in _block_linears(model):
        old = model.get_submodule(name)
        w = old.weight.detach()
        if kind == "nf4":
            new = linear4bit(bnb, old.in_features, old.out_features, bias=False, compute_dtype=compute,
                             quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=False, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        _set_module(model, name, new.to(device))  # moving to the device is what quantizes the weights
    model.quantization = kind
    return model


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """`kind`: int8 (torch, CPU), bnb8 or nf4 (bitsandbytes)."""
    if kind == "int8":
        return quantize_int8(model)
    if kind in ("bnb8", "nf4"):
        return quantize_bnb(model, kind)
    raise MinilabError(f"unknown quantization {kind!r} (int8, bnb8, nf4)")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every weight, quantized ones included; a tied weight counted once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            q = module.weight()  # torch dynamic quantized linear: int8 + per-row scales
            total += q.numel() * q.element_size() + q.q_per_channel_scales().numel() * 4
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ---- int8 directories -----------------------------------------------------------------------------
def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to store: int8 weights + scales for quantized layers, the rest as is (tied head once)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, DynLinear):
            q = module.weight()
            if bool((q.q_per_channel_zero_points() != 0).any()):
                raise AssertionError("symmetric int8 expected (zero points 0)")
            tensors[f"{name}.weight"] = q.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = q.q_per_channel_scales().float().contiguous()
        else:
            for pname, p in module.named_parameters(recurse=False):
                tensors[f"{name}.{pname}" if name else pname] = p.detach().contiguous()
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def is_int8_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def load_int8_dir(cfg: Any, path: Path, device: Any = None) -> nn.Module:
    """The quantized model stored in `path` (CPU; the int8 kernels are CPU kernels)."""
    from safetensors.torch import load_file

    from minilab.model import build_model

    if device not in (None, "cpu") and torch.device(device).type != "cpu":
        raise MinilabError(f"{path}: int8 models run on the CPU only")
    tensors = load_file(str(path / "model.safetensors"))
    model = build_model(cfg, device="meta")
    for name in _block_linears(model):
        try:
            w, s = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale")
        except KeyError:
            raise MinilabError(f"{path}: missing int8 tensors for {name}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(w, s.double(), torch.zeros_like(s, dtype=torch.long), 0)
        _set_module(model, name, _dynamic_linear(q))
    # The float tensors are assigned one by one: load_state_dict would ask the quantized layers
    # for a state of their own (scale, zero point) that this format does not store.
    expected = {n for n, _ in model.named_parameters()} - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[:3]
        raise MinilabError(f"{path}: int8 weights do not match config.json (e.g. {', '.join(odd)})")
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(t, requires_grad=False))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from minilab.model import rope_inv_freq

    model.inv_freq = rope_inv_freq(cfg)
    model.quantization = "int8"
    return model


def save_int8_dir(model: nn.Module, source_dir: Path, out: Path) -> Path:
    """Write the quantized `model` as a directory next to the files (tokenizer ...) of `source_dir`."""
    from safetensors.torch import save_file

    from minilab.fsutil import atomic_dir, write_json_atomic

    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "bits": 8, "weights": "int8, one symmetric scale per output row",
        "activations": "int8, dynamic per batch (torch.ao dynamic quantization, CPU)",
        "modules": "linear layers of model.layers.*; embeddings, norms and lm_head in float32"}
    config["dtype"] = "float32"
    with atomic_dir(out) as tmp:
        save_file(int8_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", config)
        for f in sorted(source_dir.iterdir()):
            if f.is_file() and f.name not in _SKIP_FILES and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
    return out
