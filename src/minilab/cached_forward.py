"""`CachedForward`: the lean inference forward that decoding uses, over a `Transformer`'s own weights.

Kept apart from `minilab.model` (the model definition): it re-expresses the model's forward as
plain tensor ops for speed, and tests hold it bitwise equal to `Transformer.forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minilab.bf16 import attention, is_plain_linear, linear_w
from minilab.decode_layout import joined
from minilab.kvcache import KVCache
from minilab.model import Block, Transformer, apply_rope, rms_norm


class CachedForward:
    """`Transformer.forward` with a KVCache, as plain tensor ops over the model's own weights.

    Why: a decoding step of a minilab-sized model is ~150 small ops (~900 counting what composite
    ops dispatch), and module calls, attribute lookups and wrappers cost a third of the step. This
    computes the same values with fewer dispatches: activations kept 2-D (tokens, width), each
    projection one `mm` on the transposed weight (what F.linear calls; q|k|v and gate|up one `mm`
    each where `use_decode_layout` joined them, q and k rotated together), RMSNorm as its five
    primitive ops (what F.rms_norm runs, without the composite's wrappers). The logits are bitwise
    those of `model(ids, kv_cache=cache)` (tested). Only for inference (no autograd, no autocast) of
    a plain model: `of` returns None when a projection is not a bias-free nn.Linear (LoRA-wrapped,
    quantized), and the module forward is used instead.
    """

    def __init__(self, model: Transformer):
        cfg = model.config
        self.config, self.model = cfg, model
        self.shape = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
        self.embed, self.norm = model.model.embed_tokens.weight, model.model.norm.weight
        self.head = model.lm_head.weight.t()                                            # (C, vocab)
        self.layers = []  # per block: norm weights and the projections as (in, out): q|k|v and gate|up joined
        self.qk_norms = []  # per block: (q_norm, k_norm) weights, or None without QK-norm
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            self.layers.append((block.input_layernorm.weight, joined(a.q_proj, a.k_proj, a.v_proj),
                                a.o_proj.weight.t(), block.post_attention_layernorm.weight,
                                joined(m.gate_proj, m.up_proj), m.down_proj.weight.t()))
            self.qk_norms.append((a.q_norm.weight, a.k_norm.weight) if cfg.qk_norm else None)
        fp32 = all(w.dtype is torch.float32 for w in (self.layers[0][2], self.head))
        # fp32: torch.mm itself; otherwise through linear_w, for its bf16 GEMM emulation
        self.mm = torch.mm if fp32 else (lambda x, w_t: linear_w(x, w_t.t()))
        self.rms = self._rms_fp32 if fp32 else (lambda x, w: rms_norm(x, w, self.shape[3]))
        # 0-dim fp32 tensors, not Python numbers: an in-place op with a Python number first converts it
        # to a tensor (three more dispatches), and the fp32 values are the ones the kernel would use
        self._width = torch.tensor(float(cfg.d_model), device=self.norm.device)
        self._eps = torch.tensor(cfg.norm_eps, dtype=torch.float32, device=self.norm.device)

    def _rms_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # = F.rms_norm in fp32, bit for bit: mean is sum / n on CPU (tested)
        return weight * (x * (x * x).sum(-1, keepdim=True).div_(self._width).add_(self._eps).rsqrt_())

    def project(self, h: torch.Tensor, w: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """h @ [w1 | w2 | ...]: one product for a joined weight, else one each, concatenated."""
        return self.mm(h, w) if isinstance(w, torch.Tensor) else torch.cat([self.mm(h, p) for p in w], dim=1)

    @staticmethod
    def of(model: nn.Module) -> CachedForward | None:
        if type(model) is not Transformer or type(model.model.embed_tokens) is not nn.Embedding \
                or not is_plain_linear(model.lm_head):
            return None
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            if type(block) is not Block or not all(map(is_plain_linear, (
                    a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj))):
                return None
        return CachedForward(model)

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, logits_to_keep: int = 0) -> torch.Tensor:
        """As `Transformer.forward(input_ids, kv_cache=cache, logits_to_keep=...)`, under no_grad."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type):
            raise RuntimeError("CachedForward is for inference: run it under torch.inference_mode()")
        nh, nkv, hd, eps = self.shape
        mm, rms, gqa = self.mm, self.rms, nkv != nh
        B, T = input_ids.shape
        N = B * T
        self.model.check_length(cache.pos + T, cache)
        x = F.embedding(input_ids.reshape(N), self.embed)                               # (N, C)
        cos, sin = cache.rope(self.model, T, x.dtype)
        mask = cache.attn_mask(T)
        causal = mask is None and cache.pos == 0
        if T == 1:  # (B, h*hd) is already (B, h, 1, hd) in memory
            def heads(t, h): return t.view(B, h, 1, hd)
        else:
            def heads(t, h): return t.view(B, T, h, hd).transpose(1, 2)
        inter = self.config.intermediate_size
        for i, (n1, wqkv, wo, n2, wgu, wd) in enumerate(self.layers):
            h = rms(x, n1)
            qkv = heads(self.project(h, wqkv), nh + 2 * nkv)                           # (B, nh+2nkv, T, hd)
            qk = qkv[:, :nh + nkv]
            if self.qk_norms[i] is not None:  # as Attention: per-head RMSNorm (F.rms_norm's values), then RoPE
                qn, kn = self.qk_norms[i]
                qk = torch.cat((rms_norm(qk[:, :nh], qn, eps), rms_norm(qk[:, nh:], kn, eps)), dim=1)
            qk = apply_rope(qk, cos, sin)                                              # q and k rotated at once
            k, v = cache.update(i, qk[:, nh:], qkv[:, nh + nkv:])                      # (B, nkv, S, hd)
            q = qk[:, :nh]
            if mask is not None:
                y = attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            else:
                y = attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            y = y.view(N, nh * hd) if T == 1 else y.transpose(1, 2).reshape(N, nh * hd)
            x = x + mm(y, wo)
            gu = self.project(rms(x, n2), wgu)
            x = x + mm(F.silu(gu[:, :inter]) * gu[:, inter:], wd)
        cache.advance(T)
        if 0 < logits_to_keep < T:
            x = x.view(B, T, -1)[:, -logits_to_keep:].reshape(B * logits_to_keep, -1)
            T = logits_to_keep
        return mm(rms(x, self.norm), self.head).view(B, T, -1)                          # (B, T, vocab)
