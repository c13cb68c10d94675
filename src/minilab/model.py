"""The minilab model: a LLaMA-style decoder in one readable file.

RMSNorm, SwiGLU MLP, rotary position embeddings (RoPE, configurable theta), no biases, optional
grouped-query attention, optional QK-norm (Qwen3's per-head RMSNorm of queries and keys), tied or
untied embeddings, attention through `torch.nn.functional.scaled_dot_product_attention`
(FlashAttention/memory-efficient kernels where the device has them), optional gradient
checkpointing and a KV cache for incremental decoding.

What is not the model lives beside it: the KV cache with its left-padded masks and per-row
positions (`minilab.kvcache`), the bf16 matmul emulation for CPUs without a bf16 GEMM that
`linear` and `attention` route through (`minilab.bf16`), and the weight layout for fast CPU
decoding (`minilab.decode_layout`).

Module and parameter names are exactly those of `transformers.LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE uses the same rotate-half layout, so
a state dict moves between the two without renaming or permuting anything: export is lossless
and the parity tests compare logits directly. Shapes in comments: B batch, T new tokens,
S cached + new tokens, nh query heads, nkv key/value heads, hd head_dim, C d_model.

The model also reports its own costs (parameters by group, FLOPs per token, KV-cache bytes per
token) so the planner can ask a model built on the `meta` device instead of re-deriving them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from minilab.bf16 import attention, is_plain_linear, linear
from minilab.errors import ConfigError
from minilab.linear_ce import linear_cross_entropy

if TYPE_CHECKING:
    from minilab.kvcache import KVCache


@dataclass
class ModelConfig:
    """Architecture hyperparameters (names follow nanoGPT; `hf.py` maps them to LlamaConfig)."""

    vocab_size: int = field(default=32768, metadata={"help": "tokenizer vocabulary size"})
    n_layer: int = field(default=6, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "query heads per attention layer"})
    n_kv_head: int | None = field(default=None, metadata={
        "help": "key/value heads (grouped-query attention); None means n_head (multi-head)"})
    d_model: int = field(default=256, metadata={"help": "residual stream width"})
    head_dim: int | None = field(default=None, metadata={"help": "per-head width; None means d_model // n_head"})
    intermediate_size: int | None = field(default=None, metadata={
        "help": "SwiGLU hidden width; None means 8/3 * d_model rounded up to a multiple of 64"})
    max_seq_len: int = field(default=1024, metadata={"help": "longest sequence (RoPE table, KV cache)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    rope_scaling: dict | None = field(default=None, metadata={
        "help": "RoPE scaling as in HF config.json: None, {'rope_type': 'linear', 'factor': f} or llama3"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the input embedding and output head"})
    qk_norm: bool = field(default=False, metadata={
        "help": "RMSNorm on each head's queries and keys before RoPE (Qwen3's; exports as Qwen3ForCausalLM)"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal weight init"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block in backward to save activation memory"})

    def __post_init__(self) -> None:
        # Resolve derived sizes once so the config written to disk is complete.
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.d_model / 3 / 64)

    def validate(self) -> None:
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", key=key)
        if self.head_dim is None or self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}", key="head_dim")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})",
                              key="n_kv_head")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "linear", "llama3"):
                raise ConfigError(f"rope type {kind!r} is not supported (default, linear, llama3)",
                                  key="rope_scaling")
            if kind == "llama3" and self.qk_norm:  # it would not export: llama.cpp's qwen3 has no rope_freqs
                raise ConfigError("qk_norm cannot be combined with llama3 RoPE scaling (llama.cpp's qwen3 "
                                  "architecture has no per-frequency factors); use linear scaling or no qk_norm",
                                  key="qk_norm")

    @property
    def architecture(self) -> str:
        """The standard architecture this config is, for export and registry names: `llama`, or
        `qwen3` with QK-norm (Llama plus Qwen3's per-head q/k RMSNorm, nothing else)."""
        return "qwen3" if self.qk_norm else "llama"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as LlamaRMSNorm does). With fp32 input
    and weight, F.rms_norm: one op, bitwise the same values and gradients."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    if dtype is torch.float32 and weight.dtype is torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) on the CPU, with the HF 'linear' and 'llama3' scalings applied."""
    hd = cfg.head_dim
    # on the CPU whatever the default device: on `meta` these few ops would import torch._dynamo (2 s)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths scaled down by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for `apply_rope`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF layout). x: (B, h, T, hd); cos, `signed_sin(sin)`: (T, hd) or (B, 1, T, hd).

    HF's x * cos + cat(-x2, x1) * sin, computed as x * cos + cat(x2, x1) * cat(-sin1, sin2) (the
    same products, bit for bit) with one roll instead of chunk, neg and cat."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3: one (hd,) weight each, shared by all heads, applied before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (from `KVCache.attn_mask`): None means causal from slot 0, or one new token seeing all."""
        B, T, _ = x.shape
        q = linear(self.q_proj, x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = linear(self.k_proj, x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = linear(self.v_proj, x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer_idx, k, v)                                # (B, nkv, S, hd)
        gqa = self.n_kv_head != self.n_head
        if mask is not None:
            y = attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # from slot 0: causal; one new token after a prefix: it sees everything
            y = attention(q, k, v, is_causal=past == 0, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)              # (B, T, nh*hd)
        return linear(self.o_proj, y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The part HF calls `model`: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Transformer(nn.Module):
    supports_padded_kv_cache = True  # generate.py may decode a left-padded batch through one KVCache

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE angles are a pure function of the config: kept out of the state dict.
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(self.lm_head.weight.device), persistent=False)
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layer)
        (GPT-2) so the residual stream's variance does not grow with depth; norms at one."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):  # layernorms, final norm, q_norm / k_norm
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(rope_inv_freq(self.config))

    # ---- forward --------------------------------------------------------------------------
    def rope(self, start: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start..start+T-1, each (T, hd), in fp32 then cast (as HF)."""
        pos = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())                                # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                         # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def check_length(self, end: int, cache: KVCache | None = None) -> None:
        """Refuse `end` tokens beyond max_seq_len: RoPE itself extrapolates, but the model was never
        trained there, so say so loudly. Not with RoPE scaling, nor for a left-padded cache (its
        slots count pad too; the batch's rows budget their own lengths)."""
        if end > self.config.max_seq_len and self.config.rope_scaling is None and \
                (cache is None or cache.pad is None):
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len {self.config.max_seq_len}")

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "sum",
                **_ignored) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With `kv_cache`, T new tokens follow the cached ones.
        `logits_to_keep` > 0 computes the head for the last that many positions only (as HF's).
        With `targets` (B, T) (training, where `fused_loss` holds): the cross-entropy instead, summed
        or (`reduction="none"`) per token, head and loss fused without the logits
        (`minilab.linear_ce`); a call through DDP/FSDP/PEFT wrappers stays one forward."""
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        self.check_length(start + T, kv_cache)
        x = self.model.embed_tokens(input_ids)                                          # (B, T, C)
        if kv_cache is None:
            cos, sin = self.rope(start, T, x.dtype)
            sin, mask = signed_sin(sin), None
        else:
            cos, sin = kv_cache.rope(self, T, x.dtype)
            mask = kv_cache.attn_mask(T)
        for block in self.model.layers:
            if self.config.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is not None:
            if not self.fused_loss():
                raise ValueError("targets= needs a plain bias-free head (see Transformer.fused_loss)")
            return linear_cross_entropy(self.model.norm(x), self.lm_head.weight, targets, ignore_index, reduction)
        if 0 < logits_to_keep < T:
            x = x[:, -logits_to_keep:]
        return linear(self.lm_head, self.model.norm(x))                                 # (B, T, vocab)

    def fused_loss(self) -> bool:
        """Whether `forward(ids, targets=...)` may fuse the head with the loss: a plain bias-free head
        (not LoRA-wrapped or quantized), in any precision."""
        return is_plain_linear(self.lm_head)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of next-token targets (B, T); positions equal to ignore_index are skipped."""
        logits = self(input_ids)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=ignore_index)

    # ---- costs ----------------------------------------------------------------------------
    def param_groups(self) -> dict[str, int]:
        """Parameters by group; a tied head is counted once (under embeddings). Works on `meta`."""
        groups = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
        seen: set[int] = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if "embed_tokens" in name:
                groups["embeddings"] += p.numel()
            elif "norm" in name:  # before attention: q_norm / k_norm are norms, not matmul weights
                groups["norms"] += p.numel()
            elif "self_attn" in name:
                groups["attention"] += p.numel()
            elif ".mlp." in name:
                groups["mlp"] += p.numel()
            elif name.startswith("lm_head"):
                groups["head"] += p.numel()
            else:
                raise AssertionError(f"unclassified parameter {name}")
        return groups

    def num_params(self, non_embedding: bool = False) -> int:
        groups = self.param_groups()
        return sum(groups.values()) - (groups["embeddings"] if non_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token: 2 per weight of every matmul (the head included, the embedding
        lookup not), plus attention scores and weighted values, 2 * 2 * n_layer * T * nh * hd
        (PaLM appendix B counting, full T x T). Training (forward + backward) is 3x the forward."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        g = self.param_groups()
        matmul_weights = g["attention"] + g["mlp"] + cfg.vocab_size * cfg.d_model
        forward = 2 * matmul_weights + 4 * cfg.n_layer * T * cfg.n_head * cfg.head_dim
        return 3 * forward if training else forward

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes the KV cache holds per token per sequence: 2 (K, V) * n_layer * nkv * hd * itemsize."""
        cfg = self.config
        itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
        return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * itemsize

    def costs(self, seq_len: int | None = None) -> dict:
        """Everything a planner needs from the architecture, as plain data."""
        return {
            "params": self.num_params(),
            "params_by_group": self.param_groups(),
            "flops_per_token_train": self.flops_per_token(seq_len, training=True),
            "flops_per_token_infer": self.flops_per_token(seq_len, training=False),
            "kv_bytes_per_token": {str(d).removeprefix("torch."): self.kv_cache_bytes_per_token(d)
                                   for d in (torch.float32, torch.bfloat16, torch.int8)},
        }


class _NoInitOnMeta(TorchFunctionMode):
    """Random init of `meta` tensors as a no-op: there are no values to draw, and torch runs it
    through Python decompositions whose first call imports torch._dynamo (2 s of `minilab plan`)."""

    INIT = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                      "xavier_uniform_", "xavier_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.INIT:
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Modules built inside go to the `meta` device, their random init skipped (`_NoInitOnMeta`)."""
    with torch.device("meta"), _NoInitOnMeta():
        yield


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> Transformer:
    """Build a model; on `device="meta"` nothing is allocated (for costs and planning)."""
    device = torch.device(device or "cpu")
    with on_meta() if device.type == "meta" else torch.device(device):
        return Transformer(cfg)
