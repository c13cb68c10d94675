"""What a model built on `meta` says about itself: parameters by group, its linear layers, and
the sizes its weights take in each storage format.

Quantized sizes follow what bitsandbytes stores, as transformers applies it
(`transformers/quantizers/base.py::get_keys_to_not_convert`): only the decoder blocks' linear
layers are quantized; embeddings (never `nn.Linear`), the output head and norms stay 16-bit, and
so do the biases of quantized linears.

- int8 (LLM.int8()): int8 weight + one fp32 absmax per output row (`SCB`): `n + 4 * rows` bytes.
- nf4: two 4-bit codes per byte, one fp32 absmax per block of 64 -> 0.5625 B/param. With double
  quantization the absmax values are themselves 8-bit in blocks of 256, plus one fp32 absmax per
  256 blocks, a 256-entry fp32 code book and an fp32 offset: 0.51593 B/param for a 4096x4096
  weight, exactly what bitsandbytes 0.50 `quantize_4bit` produced (reference doc, section 2.5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from minilab.bf16 import is_plain_linear
from minilab.linear_ce import HF_FUSED_TYPES
from minilab.model import Transformer

GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "other")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BLOCK, DQ_BLOCK = 64, 256


@dataclass
class Linear:
    """One linear layer: weight (out x in), whether it has a bias, whether bnb would quantize it."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    quantized: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class Anatomy:
    """Architecture facts the memory formulas need, all read from the built model and its config."""

    params: int
    groups: dict[str, int]
    linears: list[Linear]
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool
    buffers: int                    # numel of buffers (rotary tables, GPT-2 masks): accelerate counts them
    base_params: int                # params without the LM head: what accelerate's AutoModel sees
    max_positions: int | None = None
    sliding_window: int | None = None
    fused_loss: bool = False        # training fuses head and loss (linear_ce): as training.fuses_loss
    logit_softcap: float | None = None  # Gemma 2's final_logit_softcapping
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_width(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def quantized_numel(self) -> int:
        return sum(lin.weight_numel for lin in self.linears if lin.quantized)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("linears")
        d["quantized_linear_params"] = self.quantized_numel
        return d


def _classify(path: str, module: nn.Module, embeddings: set[int], head: nn.Module | None) -> str:
    kind = type(module).__name__.lower()
    if id(module) in embeddings or isinstance(module, nn.Embedding):
        return "embeddings"
    if module is head:
        return "head"
    if "norm" in kind or kind.startswith("ln"):
        return "norms"
    lowered = path.lower()
    if any(k in lowered for k in ("attn", "attention")):
        return "attention"
    if any(k in lowered for k in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    return "other"


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of an nn.Linear or a GPT-2 style Conv1D (weight stored as in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


def _heads(model: nn.Module) -> tuple[nn.Module | None, set[int]]:
    """(output head module, ids of input-embedding modules) through the HF accessors when present."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(model, "lm_head", None)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return head, {id(emb)} if emb is not None else set()


def _config_value(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def inspect_model(model: nn.Module) -> Anatomy:
    """Read an `Anatomy` from a model (on `meta` or real): every parameter counted once."""
    head, embeddings = _heads(model)
    groups = dict.fromkeys(GROUPS, 0)
    seen: set[int] = set()
    linears: list[Linear] = []
    head_params = 0
    for path, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # a tied head: already counted with the embeddings
            seen.add(id(p))
            group = _classify(path, module, embeddings, head)
            groups[group] += p.numel()
            head_params += p.numel() if group == "head" else 0
        shape = _linear_shape(module)
        if shape is not None and module is not head:
            linears.append(Linear(path, shape[0], shape[1], getattr(module, "bias", None) is not None, True))
    buffers = sum(b.numel() for _, b in model.named_buffers(remove_duplicate=True))
    cfg = model.config
    hidden = _config_value(cfg, "d_model", "hidden_size", "n_embd")
    n_head = _config_value(cfg, "n_head", "num_attention_heads")
    head_dim = _config_value(cfg, "head_dim", default=None) or hidden // n_head
    n_kv = _config_value(cfg, "n_kv_head", "num_key_value_heads", default=n_head)
    mlp_in = [lin for lin in linears if "mlp" in lin.name.lower() and lin.in_features == hidden]
    intermediate = _config_value(cfg, "intermediate_size", "n_inner") or (mlp_in[0].out_features if mlp_in
                                                                           else 4 * hidden)
    layer0 = {lin.name.rsplit(".", 1)[-1] for lin in linears if ".0." in lin.name and "mlp" in lin.name.lower()}
    tied = _is_tied(model, head)
    window = _config_value(cfg, "sliding_window")
    use_window = _config_value(cfg, "use_sliding_window", default=window is not None)
    return Anatomy(
        params=sum(groups.values()), groups=groups, linears=linears,
        n_layer=_config_value(cfg, "n_layer", "num_hidden_layers"), hidden=hidden, n_head=n_head,
        n_kv_head=n_kv, head_dim=head_dim, intermediate=intermediate,
        vocab=_config_value(cfg, "vocab_size"), tied=tied, gated_mlp=len(layer0) >= 3,
        buffers=buffers, base_params=sum(groups.values()) - head_params,
        max_positions=_config_value(cfg, "max_seq_len", "max_position_embeddings", "n_positions"),
        sliding_window=window if use_window else None,
        fused_loss=isinstance(model, Transformer) or (_config_value(cfg, "model_type") in HF_FUSED_TYPES
                                                      and is_plain_linear(head)),
        logit_softcap=_config_value(cfg, "final_logit_softcapping", default=None))


def _is_tied(model: nn.Module, head: nn.Module | None) -> bool:
    if head is None:
        return False
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else getattr(getattr(model, "model", None), "embed_tokens", None)
    return emb is not None and getattr(emb, "weight", None) is getattr(head, "weight", None)


# ---- weight bytes ---------------------------------------------------------------------------
def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes NF4 weight (packed codes + quantization state)."""
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return packed + 4 * blocks                          # fp32 absmax per block
    nested = math.ceil(blocks / DQ_BLOCK)
    return packed + blocks + 4 * nested + 256 * 4 + 4       # uint8 absmax, fp32 nested absmax, code, offset


def int8_bytes(lin: Linear) -> int:
    """Bytes of one LLM.int8() weight: int8 values plus an fp32 scale per output row."""
    return lin.weight_numel + 4 * lin.out_features


def weight_bytes(an: Anatomy, fmt: str, double_quant: bool = True, other_bytes: int = 2) -> int:
    """Bytes of all parameters in `fmt` (fp32, bf16, fp16, int8, nf4). For the quantized formats
    the non-quantized parameters take `other_bytes` each (16-bit when loaded, 4 after PEFT's
    fp32 upcast in `prepare_model_for_kbit_training`)."""
    if fmt in DTYPE_BYTES:
        return an.params * DTYPE_BYTES[fmt]
    q = [lin for lin in an.linears if lin.quantized]
    if fmt == "int8":
        quant = sum(int8_bytes(lin) for lin in q)
    elif fmt == "nf4":
        quant = sum(nf4_bytes(lin.weight_numel, double_quant) for lin in q)
    else:
        raise ValueError(f"unknown weight format {fmt!r}")
    return quant + (an.params - an.quantized_numel) * other_bytes


def weight_table(an: Anatomy) -> dict[str, int]:
    """Bytes of the weights in every format the planner knows."""
    return {"fp32": weight_bytes(an, "fp32"), "bf16": weight_bytes(an, "bf16"),
            "int8": weight_bytes(an, "int8"), "nf4": weight_bytes(an, "nf4", double_quant=False),
            "nf4_dq": weight_bytes(an, "nf4", double_quant=True)}


def accelerate_estimate(an: Anatomy) -> dict[str, int]:
    """What `accelerate estimate-memory` prints (reference doc, section 2.1): AutoModel (no LM
    head) in fp32, parameters and buffers; int8 = fp32/4, int4 = fp32/8; "training with Adam" is
    max(model 4, grads, optimizer 8, step) per param = 16 B fp32, 8 B mixed precision."""
    fp32 = (an.base_params + an.buffers) * 4
    return {"fp32": fp32, "bf16": fp32 // 2, "int8": fp32 // 4, "int4": fp32 // 8,
            "train_adam_fp32": 4 * fp32, "train_adam_mixed": 2 * fp32}
