"""Module trees of a few transformers architectures, built on `meta` without transformers' modeling code.

Why: `minilab plan phi-2/` must answer in under 3 seconds, and importing a transformers modeling
module costs ~2.5 s alone (`modeling_utils`, `masking_utils` importing torch._dynamo, the
distributed-tensor sharding helpers), before any model is built. What the planner reads from a
model (`anatomy.inspect_model`) is only its module tree: paths, module types, parameter shapes,
buffers, which module is the head and whether it is tied. For the architectures below that tree
is built here, with the same paths, shapes and buffers as transformers' own model, from the
config.json mapping itself when it holds every key without a fixed default (`raw_config`: then
transformers is not imported at all, another ~1.5 s), else from transformers' config object;
`tests/test_planner.py` holds every one equal to `AutoModelForCausalLM.from_config` on meta
(whole anatomy, linear by linear). Any other architecture is built by transformers itself.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def _tree(**children: nn.Module) -> nn.ModuleDict:
    """A container of named children (what transformers' decoder layers, attention and MLP modules
    are to the planner: their parameters live in the children)."""
    return nn.ModuleDict(children)


class RMSNormSkeleton(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), plus a bias."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))


class RotarySkeleton(nn.Module):
    """transformers' rotary embedding: `inv_freq` and `original_inv_freq`, dim / 2 entries each."""

    def __init__(self, dim: int):
        super().__init__()
        n = (dim + 1) // 2
        self.register_buffer("inv_freq", torch.empty(n), persistent=False)
        self.register_buffer("original_inv_freq", torch.empty(n), persistent=False)


class CausalLMSkeleton(nn.Module):
    def __init__(self, config: Any, body_name: str, body: nn.Module, embed: nn.Module, head: nn.Linear,
                 tied: bool):
        super().__init__()
        self.config = config
        self.add_module(body_name, body)
        self.lm_head = head
        self._embed = [embed]  # not a submodule: reached through the body
        if tied:
            head.weight = embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self._embed[0]

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _rotary_dim(c: Any) -> int:
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None) or 1.0)
    return int(_head_dim(c) * factor)


def _named(kind: str, cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of `cls` named `kind` (e.g. GemmaRMSNorm): type names are what the anatomy classifies."""
    return type(kind, (cls,), {})


def _llama_like(c: Any, prefix: str, *, qkv_bias: bool, o_bias: bool, embed_kind: str = "Embedding",
                embed_scale: bool = False) -> nn.Module:
    """Llama's tree (Mistral, Qwen2, Gemma): biases and the embedding's class as the architecture has them."""
    hd, d = _head_dim(c), c.hidden_size
    norm = _named(f"{prefix}RMSNorm", RMSNormSkeleton)
    layers = nn.ModuleList()
    for _ in range(c.num_hidden_layers):
        attn = _tree(q_proj=nn.Linear(d, c.num_attention_heads * hd, bias=qkv_bias),
                     k_proj=nn.Linear(d, c.num_key_value_heads * hd, bias=qkv_bias),
                     v_proj=nn.Linear(d, c.num_key_value_heads * hd, bias=qkv_bias),
                     o_proj=nn.Linear(c.num_attention_heads * hd, d, bias=o_bias))
        mlp = _tree(gate_proj=nn.Linear(d, c.intermediate_size, bias=False),
                    up_proj=nn.Linear(d, c.intermediate_size, bias=False),
                    down_proj=nn.Linear(c.intermediate_size, d, bias=False))
        layers.append(_tree(self_attn=attn, mlp=mlp, input_layernorm=norm(d), post_attention_layernorm=norm(d)))
    embed = _named(embed_kind, nn.Embedding)(c.vocab_size, d)
    if embed_scale:
        embed.register_buffer("embed_scale", torch.empty(()), persistent=False)
    body = _tree(embed_tokens=embed, layers=layers, norm=norm(d), rotary_emb=RotarySkeleton(_rotary_dim(c)))
    return CausalLMSkeleton(c, "model", body, embed, nn.Linear(d, c.vocab_size, bias=False), c.tie_word_embeddings)


def _mistral(c: Any) -> nn.Module:
    return _llama_like(c, "Mistral", qkv_bias=False, o_bias=False)


def _qwen2(c: Any) -> nn.Module:
    return _llama_like(c, "Qwen2", qkv_bias=True, o_bias=False)


def _gemma(c: Any) -> nn.Module:
    bias = bool(getattr(c, "attention_bias", False))
    return _llama_like(c, "Gemma", qkv_bias=bias, o_bias=bias, embed_kind="GemmaTextScaledWordEmbedding",
                       embed_scale=True)


def _phi(c: Any) -> nn.Module:
    hd, d = _head_dim(c), c.hidden_size
    layers = nn.ModuleList()
    for _ in range(c.num_hidden_layers):
        parts = dict(q_proj=nn.Linear(d, c.num_attention_heads * hd), k_proj=nn.Linear(d, c.num_key_value_heads * hd),
                     v_proj=nn.Linear(d, c.num_key_value_heads * hd), dense=nn.Linear(c.num_attention_heads * hd, d))
        if c.qk_layernorm:
            parts.update(q_layernorm=nn.LayerNorm(hd), k_layernorm=nn.LayerNorm(hd))
        mlp = _tree(fc1=nn.Linear(d, c.intermediate_size), fc2=nn.Linear(c.intermediate_size, d))
        layers.append(_tree(self_attn=_tree(**parts), mlp=mlp, input_layernorm=nn.LayerNorm(d)))
    embed = nn.Embedding(c.vocab_size, d)
    body = _tree(embed_tokens=embed, layers=layers, rotary_emb=RotarySkeleton(_rotary_dim(c)),
                 final_layernorm=nn.LayerNorm(d))
    return CausalLMSkeleton(c, "model", body, embed, nn.Linear(d, c.vocab_size, bias=True), c.tie_word_embeddings)


def _gpt2(c: Any) -> nn.Module:
    d = c.n_embd
    inner = c.n_inner if c.n_inner is not None else 4 * d
    blocks = nn.ModuleList()
    for _ in range(c.n_layer):
        attn = _tree(c_attn=Conv1D(d, 3 * d), c_proj=Conv1D(d, d))
        mlp = _tree(c_fc=Conv1D(d, inner), c_proj=Conv1D(inner, d))
        blocks.append(_tree(ln_1=nn.LayerNorm(d), attn=attn, ln_2=nn.LayerNorm(d), mlp=mlp))
    wte = nn.Embedding(c.vocab_size, d)
    body = _tree(wte=wte, wpe=nn.Embedding(c.n_positions, d), h=blocks, ln_f=nn.LayerNorm(d))
    return CausalLMSkeleton(c, "transformer", body, wte, nn.Linear(d, c.vocab_size, bias=False),
                            c.tie_word_embeddings)


# model_type -> builder of the tree transformers' AutoModelForCausalLM would build
BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "mistral": _mistral, "qwen2": _qwen2, "gemma": _gemma, "phi": _phi, "gpt2": _gpt2}


_LLAMA_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers",
               "vocab_size", "max_position_embeddings")
# model_type -> (keys config.json must hold, transformers' class defaults of the other keys read):
# a config missing a required key goes through transformers' config class for its defaults instead
RAW = {
    "mistral": (_LLAMA_KEYS + ("sliding_window",), {"tie_word_embeddings": False, "head_dim": None}),
    "qwen2": (_LLAMA_KEYS + ("use_sliding_window",), {"tie_word_embeddings": False}),
    "gemma": (_LLAMA_KEYS + ("head_dim",), {"tie_word_embeddings": True, "attention_bias": False}),
    "phi": (_LLAMA_KEYS, {"tie_word_embeddings": False, "qk_layernorm": False, "partial_rotary_factor": 0.5,
                          "head_dim": None}),
    "gpt2": (("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"),
             {"tie_word_embeddings": True, "n_inner": None, "add_cross_attention": False}),
}


def raw_config(model_type: str | None, data: dict[str, Any]) -> SimpleNamespace | None:
    """`data` (a config.json mapping) as the attributes the builders read, without transformers:
    only for a known type whose config holds every key that has no fixed default (else None, and
    transformers' config class supplies its defaults)."""
    if model_type not in RAW or any(k not in data for k in RAW[model_type][0]):
        return None
    return SimpleNamespace(**{**RAW[model_type][1], **data, "model_type": model_type})


def supported(config: Any) -> bool:
    """Whether `config` is one this module builds exactly: a known type with nothing it leaves out."""
    mt = config.model_type
    if mt not in BUILDERS:
        return False
    if mt == "gpt2":
        return not getattr(config, "add_cross_attention", False)
    return not getattr(config, "mlp_bias", False)


def build_skeleton(config: Any) -> nn.Module:
    """The module tree of `config`'s causal LM on `meta` (parameters with shapes, no storage)."""
    from minilab.model import on_meta

    with on_meta():
        return BUILDERS[config.model_type](config)
