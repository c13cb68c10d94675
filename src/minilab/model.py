"""The minilab model: a LLaMA-style decoder in one readable file.

RMSNorm, SwiGLU MLP, rotary position embeddings (RoPE, configurable theta), no biases, optional
grouped-query attention, tied or untied embeddings, attention through
`torch.nn.functional.scaled_dot_product_attention` (FlashAttention/memory-efficient kernels
where the device has them), optional gradient checkpointing and a KV cache for incremental
decoding.

Module and parameter names are exactly those of `transformers.LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE uses the same rotate-half layout, so
a state dict moves between the two without renaming or permuting anything: export is lossless
and the parity tests compare logits directly. Shapes in comments: B batch, T new tokens,
S cached + new tokens, nh query heads, nkv key/value heads, hd head_dim, C d_model.

The model also reports its own costs (parameters by group, FLOPs per token, KV-cache bytes per
token) so the planner can ask a model built on the `meta` device instead of re-deriving them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilab.errors import ConfigError


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

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---- bf16 matmuls on CPUs without bf16 hardware ----------------------------------------------------
# Without AVX512/AMX, oneDNN has no bf16 GEMM and torch falls back to a reference kernel that runs
# 5-50x slower than its fp32 GEMM (0.9 GFLOP/s against 54 on a 2-core AVX2 EPYC), so bf16 autocast
# made training ~40x slower than fp32. There, each bf16 matmul of the model is computed as what a
# bf16 GEMM is: bf16-rounded operands, exact products and fp32 accumulation, the result rounded to
# bf16, but by fp32 kernels on upcast operands (as oneDNN emulates bf16 on CPUs that lack it).
# Numerics stay those of bf16 autocast; speed becomes that of fp32. `BF16_MATMUL` forces a path.
BF16_MATMUL = "auto"  # "auto": emulate where the CPU has no bf16 GEMM; "native": torch's kernels; "emulate"


def cpu_has_bf16_gemm() -> bool:
    """Whether torch multiplies bf16 matrices on this CPU with oneDNN (AVX512 or AMX), not a reference loop."""
    global _CPU_BF16_GEMM
    if _CPU_BF16_GEMM is None:
        try:
            _CPU_BF16_GEMM = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _CPU_BF16_GEMM = False
    return _CPU_BF16_GEMM


_CPU_BF16_GEMM: bool | None = None


def emulate_bf16(x: torch.Tensor, rows: int) -> bool:
    """True when a matmul on `x` would run in bf16 (bf16 input or CPU bf16 autocast) on a CPU whose
    bf16 GEMM is torch's slow reference kernel; see BF16_MATMUL. Not below 32 rows (decoding a few
    tokens): there the reference kernel is memory-bound like fp32, and upcasting the weights is not."""
    if x.device.type != "cpu" or BF16_MATMUL == "native" or (rows < 32 and BF16_MATMUL == "auto"):
        return False
    in_bf16 = x.dtype is torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                            and torch.get_autocast_dtype("cpu") is torch.bfloat16)
    return in_bf16 and (BF16_MATMUL == "emulate" or not cpu_has_bf16_gemm())


class _BF16Linear(torch.autograd.Function):
    """y = x @ w.T as a bf16 GEMM (bf16 operands, fp32 accumulation, bf16 result) computed with fp32
    kernels. Saves the bf16 operands (the memory of bf16 autocast); gradients are rounded to bf16
    and returned in the inputs' dtypes, as autocast's cast-backward does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, w.dtype)
        with torch.autocast("cpu", enabled=False):
            return F.linear(xb.float(), wb.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xb, wb = ctx.saved_tensors
        g = grad.to(torch.bfloat16).float()
        gx = gw = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                gx = (g @ wb.float()).to(torch.bfloat16).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                g2, x2 = g.reshape(-1, g.shape[-1]), xb.reshape(-1, xb.shape[-1]).float()
                gw = (g2.T @ x2).to(torch.bfloat16).to(ctx.dtypes[1])
        return gx, gw


def linear_w(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias), its bf16 GEMM emulated where the CPU lacks one."""
    if (x.dtype is torch.bfloat16 or torch.is_autocast_enabled("cpu")) and \
            emulate_bf16(x, x.numel() // max(1, x.shape[-1])):
        return _BF16Linear.apply(x, weight)
    return F.linear(x, weight)


def is_plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`: a plain bias-free nn.Linear through `linear_w` (no Module.__call__), anything
    else (LoRA, quantized layers) simply called."""
    return linear_w(x, layer.weight) if is_plain_linear(layer) else layer(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """scaled_dot_product_attention; in bf16 on a CPU without bf16 GEMM, on bf16-rounded q, k, v upcast
    to fp32 (the fp32 flash kernel; the probabilities stay fp32), the output rounded to bf16."""
    if emulate_bf16(q, q.shape[-2]):
        with torch.autocast("cpu", enabled=False):
            up = [t.to(torch.bfloat16).float() for t in (q, k, v)]
            return F.scaled_dot_product_attention(*up, **kw).to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, **kw)


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
    """Inverse frequencies (hd/2,), with the HF 'linear' and 'llama3' scalings applied."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
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


class KVCache:
    """Preallocated keys and values for incremental decoding: one (B, nkv, max_len, hd) pair per layer,
    written in place (no concatenation per step).

    Prompts of different lengths share one cache left-padded: `pad[i]` slots at the start of row i hold
    no token. The cache then gives each row its own positions (slot - pad[i], so a row's RoPE angles
    are those it has alone) and an attention mask that hides the pad slots. The RoPE tables for all
    slots are built once per cache and sliced per step.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 pad: Sequence[int] | None = None):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = 0  # slots already filled (tokens stored, pad slots included)
        self.pad: torch.Tensor | None = None  # (B,) pad slots per row; None when no row is padded
        self._valid: torch.Tensor | None = None  # (B, 1, 1, max_len): slot j of row i holds a token
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if pad is not None and any(pad):
            if len(pad) != batch_size:
                raise ValueError(f"pad has {len(pad)} rows, the cache {batch_size}")
            self.pad = torch.as_tensor(list(pad), dtype=torch.long, device=device)
            slots = torch.arange(self.max_len, device=device)
            self._valid = (slots[None, :] >= self.pad[:, None])[:, None, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, nkv, T, hd); return all keys and values so far (B, nkv, S, hd)."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, self.pos, t).copy_(k)
        values.narrow(2, self.pos, t).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, t: int) -> None:
        self.pos += t

    def rope(self, model: Transformer, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and `signed_sin` for the T tokens about to be stored: (T, hd), or (B, 1, T, hd) with
        per-row positions. The values `model.rope` computes for those positions (slices of one table)."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + T} tokens > max_len {self.max_len}")
        if self._rope is None or self._rope[0].dtype != dtype:
            cos, sin = model.rope(0, self.max_len, dtype)                                # (L, hd)
            sin = signed_sin(sin)
            if self.pad is not None:
                positions = (torch.arange(self.max_len, device=self.pad.device)[None, :]
                             - self.pad[:, None]).clamp(min=0)                             # (B, L)
                cos, sin = cos[positions][:, None], sin[positions][:, None]               # (B, 1, L, hd)
            self._rope = cos, sin
        cos, sin = self._rope
        return cos[..., self.pos:self.pos + T, :], sin[..., self.pos:self.pos + T, :]

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean mask (True = may attend) for T new tokens over all S = pos + T slots, or None
        where causal attention needs none (an unpadded prompt from slot 0, or one new token)."""
        end = self.pos + T
        if self.pad is None:
            if self.pos == 0 or T == 1:
                return None
            # A chunk after a cached prefix: query i (slot pos + i) sees slots 0..pos + i.
            return torch.ones(T, end, dtype=torch.bool, device=self.k[0].device).tril(diagonal=self.pos)
        valid = self._valid[..., :end]                                                  # (B, 1, 1, S)
        if T == 1:
            return valid
        causal = torch.ones(T, end, dtype=torch.bool, device=valid.device).tril(diagonal=self.pos)
        # A pad slot's query sees no token; it sees itself, so its softmax stays finite (unused output).
        own = torch.ones(T, end, dtype=torch.bool, device=valid.device).tril(diagonal=self.pos) \
            & ~torch.ones(T, end, dtype=torch.bool, device=valid.device).tril(diagonal=self.pos - 1)
        return (valid & causal) | own                                                   # (B, 1, T, S)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a 1-D index tensor): finished sequences leave the batch."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        if self.pad is not None:
            self.pad, self._valid = self.pad.index_select(0, rows), self._valid.index_select(0, rows)
            if self._rope is not None:
                self._rope = tuple(t.index_select(0, rows) for t in self._rope)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (from `KVCache.attn_mask`): None means causal from slot 0, or one new token seeing all."""
        B, T, _ = x.shape
        q = linear(self.q_proj, x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = linear(self.k_proj, x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = linear(self.v_proj, x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
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
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layer)
        (GPT-2) so the residual stream's variance does not grow with depth; norms at one."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(rope_inv_freq(self.config))

    def use_decode_layout(self) -> Transformer:
        """Store each plain fp32 linear weight of a CPU model transposed, (in, out) contiguous: same
        Parameter, shape, name and values, now a transposed view. The vector-matrix products of
        decoding then read the weight row after row, 1.3-3x faster on CPU (the large head most).
        A block's q, k, v weights share one (in, q+k+v) tensor and gate, up one (in, 2 * inter), each
        weight a column range of it, so `CachedForward` computes them with one product each: fewer,
        longer reads of memory (the per-token cost of a model larger than the CPU's caches).
        Not bf16 weights: torch's bf16 CPU kernel is 3x slower in that layout. For inference-only
        models (`Engine` does it); export (`save_hf_dir`) writes the same files."""

        def decodable(w: torch.Tensor) -> bool:
            return w.device.type == "cpu" and w.dtype is torch.float32 and w.dim() == 2 and w.is_contiguous()

        with torch.no_grad():
            for block in self.model.layers:
                a, m = block.self_attn, block.mlp
                for group in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
                    if all(map(is_plain_linear, group)) and all(decodable(lin.weight) for lin in group):
                        fused = torch.cat([lin.weight.t() for lin in group], dim=1)  # (in, sum of outs)
                        start = 0
                        for lin in group:
                            n = lin.weight.shape[0]
                            lin.weight.data = fused[:, start:start + n].t()
                            start += n
            for module in self.modules():
                w = module.weight if type(module) is nn.Linear else None
                if w is not None and decodable(w):
                    w.data = w.data.t().contiguous().t()
        return self

    # ---- forward --------------------------------------------------------------------------
    def rope(self, start: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start..start+T-1, each (T, hd), in fp32 then cast (as HF)."""
        pos = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())                                # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                         # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, logits_to_keep: int = 0,
                **_ignored) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With `kv_cache`, T new tokens follow the cached ones.
        `logits_to_keep` > 0 computes the head for the last that many positions only (as HF's)."""
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.max_seq_len and self.config.rope_scaling is None and \
                (kv_cache is None or kv_cache.pad is None):  # a padded batch's rows budget themselves
            # RoPE itself extrapolates, but the model was never trained there: say so loudly.
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
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
        if 0 < logits_to_keep < T:
            x = x[:, -logits_to_keep:]
        return linear(self.lm_head, self.model.norm(x))                                 # (B, T, vocab)

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
            elif "self_attn" in name:
                groups["attention"] += p.numel()
            elif ".mlp." in name:
                groups["mlp"] += p.numel()
            elif "norm" in name:
                groups["norms"] += p.numel()
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


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> Transformer:
    """Build a model; on `device="meta"` nothing is allocated (for costs and planning)."""
    with torch.device(device or "cpu"):
        return Transformer(cfg)
