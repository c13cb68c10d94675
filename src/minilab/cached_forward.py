"""`CachedForward`: the lean inference forward that decoding uses, over a `Transformer`'s own weights.

Kept apart from `minilab.model` (the model definition): it re-expresses the model's forward as
plain tensor ops for speed, and tests hold it bitwise equal to `Transformer.forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minilab.bf16 import attention, linear_w
from minilab.decode_layout import joined, plain_model
from minilab.kvcache import KVCache
from minilab.model import Transformer, apply_rope, rms_norm
from minilab.screened_head import ScreenedHead

# Elements of a weight each thread's share of a split product must have (see `split_mm`): below
# ~512 KiB per thread, thread hand-off costs more than the extra bandwidth gives (measured, 2
# threads, one row: 256 x 768 and 256 x 1000 were slower split, 512 x 1536 and up 1.3-1.9x faster;
# `small`'s 512 x 512 output projections split cut 2% of its step, 9.77 -> 9.57 ms)
SPLIT_ELEMENTS = 1 << 17
# Rows up to which products are split: decoding steps (a row each; serve's default concurrency is
# 8, `generate`'s batch 16). Torch runs such products on one thread, or (8 rows) on two no faster
# than one: split, a `tiny` 8-row step 5.9 -> 5.6 ms, `small`'s 33 -> 25 ms. Longer products
# (prefill) go to MKL's own threaded GEMM.
SPLIT_ROWS = 16
# Columns a block is a multiple of (64 bytes of fp32): unaligned blocks change the last bits
SPLIT_COLUMNS = 16
# `split_key(...)` -> whether the split product is torch.mm's bit for bit
_EXACT_SPLITS: dict[tuple, bool] = {}


def split_parts(rows: int, w: torch.Tensor, threads: int) -> int:
    """Into how many column blocks `split_mm` cuts `w` for `rows` rows on `threads` threads (1: not)."""
    parts = min(threads, w.numel() // SPLIT_ELEMENTS) if rows <= SPLIT_ROWS else 1
    if parts < 2 or not w.is_cpu:  # the cheap tests first: most products of a small model stop here
        return 1
    while parts > 1 and w.shape[1] % (parts * SPLIT_COLUMNS):
        parts -= 1
    return parts if parts > 1 and _split_is_exact(rows, w, parts) else 1


def _split_is_exact(rows: int, w: torch.Tensor, parts: int) -> bool:
    """Whether the product split in `parts` column blocks gives torch.mm's values bit for bit at this
    shape: checked once, on a random input. Why it can differ: MKL picks its kernel for a block by
    the block's shape, and at some row counts (5-7 and 9-11 here, AVX-512 EPYC, not 1-4, 8 or
    12-16) the block's kernel sums in another order than the whole product's; which counts depends
    on the CPU's kernels. The kernel follows the shape, not the values, so one random input tells
    (a different summation order shows in some of its rows x columns dot products)."""
    key = split_key(rows, w, parts)
    exact = _EXACT_SPLITS.get(key)
    if exact is None:
        x = torch.randn(rows, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        exact = _EXACT_SPLITS[key] = torch.equal(_split_bmm(x, w, parts), torch.mm(x, w))
    return exact


def split_key(rows: int, w: torch.Tensor, parts: int) -> tuple:
    """What `_split_is_exact` checks once: all a kernel choice may follow, torch.mm's threads too,
    and where w starts within a cache line."""
    return rows, tuple(w.shape), w.stride(), w.data_ptr() % 64, parts, w.dtype, torch.get_num_threads()


def split_mm(x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    """x @ w (x: (M, K) contiguous; w: (K, N), any strides), with w's output columns cut into up to
    `threads` equal blocks taken as one batched product, so that each thread streams its own block.

    Why: torch's CPU product runs a matrix-vector product (decoding's: one row, or a few) on one
    thread, whatever torch's thread count, and one core reads memory at a fraction of what several
    do (2-core VM: a 512 x 3072 fp32 weight at 21 GB/s on one thread, 35 GB/s split in two; its read
    bandwidth is 30 GB/s on one thread, 61 on two). `bmm` runs its batch in parallel. The values are
    the unsplit product's, bit for bit: each column is still one dot product over all of K, the
    blocks aligned, and where the block's kernel would sum in another order (some row counts) the
    product is not split (`_split_is_exact`). Small weights, many rows or one thread: `torch.mm`."""
    # x as `_split_is_exact` checked it: contiguous, starting a cache line (as torch allocates)
    parts = split_parts(x.shape[0], w, threads) if x.is_contiguous() and x.data_ptr() % 64 == 0 else 1
    return torch.mm(x, w) if parts == 1 else _split_bmm(x, w, parts)


def _split_bmm(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    (M, K), N = x.shape, w.shape[1]
    b = N // parts
    blocks = w.as_strided((parts, K, b), (b * w.stride(1), w.stride(0), w.stride(1)))
    if M == 1:  # the batch written straight into out's column blocks
        out = torch.empty(1, N, dtype=x.dtype, device=x.device)
        torch.bmm(x.expand(parts, 1, K), blocks, out=out.as_strided((parts, 1, b), (b, N, 1)))
        return out
    return torch.bmm(x.expand(parts, M, K), blocks).transpose(0, 1).reshape(M, N)


class CachedForward:
    """`Transformer.forward` with a KVCache, as plain tensor ops over the model's own weights.

    Why: a decoding step of a minilab-sized model is ~150 small ops (~900 counting what composite
    ops dispatch), and module calls, attribute lookups and wrappers cost a third of the step. This
    computes the same values with fewer dispatches: activations kept 2-D (tokens, width), each
    projection one `mm` on the transposed weight (what F.linear calls; q|k|v and gate|up one `mm`
    each where `use_decode_layout` joined them, q and k rotated together; a large weight's product
    split over torch's threads, `split_mm`), RMSNorm as its five
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
        # fp32: torch.mm itself, split over the threads for large weights (set by `_threads`);
        # otherwise through linear_w, for its bf16 GEMM emulation
        self.fp32 = fp32
        if not fp32:
            self.mm = lambda x, w_t: linear_w(x, w_t.t())
        self._threads()
        screen = getattr(model, "decode_screen", None)  # set by use_decode_layout for a large fp32 head
        self.screen: ScreenedHead | None = screen if fp32 and screen is not None and screen.fresh(self.head) else None
        self.rms = self._rms_fp32 if fp32 else (lambda x, w: rms_norm(x, w, self.shape[3]))
        # 0-dim fp32 tensors, not Python numbers: an in-place op with a Python number first converts it
        # to a tensor (three more dispatches), and the fp32 values are the ones the kernel would use
        self._width = torch.tensor(float(cfg.d_model), device=self.norm.device)
        self._eps = torch.tensor(cfg.norm_eps, dtype=torch.float32, device=self.norm.device)

    def _split_mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return split_mm(x, w, self.threads)

    def _threads(self) -> None:
        """Read torch's thread count (at each forward: a caller may set it after loading); on one
        thread fp32 products are plain `torch.mm` calls, without `split_mm`'s Python in between."""
        self.threads = torch.get_num_threads()
        if self.fp32:
            self.mm = torch.mm if self.threads == 1 else self._split_mm

    def _rms_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # = F.rms_norm in fp32, bit for bit: mean is sum / n on CPU (tested)
        return weight * (x * (x * x).sum(-1, keepdim=True).div_(self._width).add_(self._eps).rsqrt_())

    def project(self, h: torch.Tensor, w: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """h @ [w1 | w2 | ...]: one product for a joined weight, else one each, concatenated."""
        return self.mm(h, w) if isinstance(w, torch.Tensor) else torch.cat([self.mm(h, p) for p in w], dim=1)

    @staticmethod
    def of(model: nn.Module) -> CachedForward | None:
        return CachedForward(model) if plain_model(model) else None

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, logits_to_keep: int = 0) -> torch.Tensor:
        """As `Transformer.forward(input_ids, kv_cache=cache, logits_to_keep=...)`, under no_grad."""
        B, T = input_ids.shape
        x = self._final_states(input_ids, cache, logits_to_keep)
        return self.mm(x, self.head).view(B, x.shape[0] // B, -1)                        # (B, T, vocab)

    def step_scores(self, input_ids: torch.Tensor, cache: KVCache) -> StepScores:
        """The next-token scores of each row's last position, the head product left until asked for."""
        return StepScores(hidden=self._final_states(input_ids, cache, 1), forward=self)

    def _final_states(self, input_ids: torch.Tensor, cache: KVCache, logits_to_keep: int) -> torch.Tensor:
        """The final-normed hidden states the head multiplies: (B * T, C), or the last `logits_to_keep`
        positions of each row."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type):
            raise RuntimeError("CachedForward is for inference: run it under torch.inference_mode()")
        nh, nkv, hd, eps = self.shape
        self._threads()
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
        return rms(x, self.norm)


class StepScores:
    """One decoding step's scores, as a `Sampler` takes them: each row's next-token logits, made only
    when asked. From `CachedForward.step_scores` it holds the final hidden states, and `argmax()` (what
    greedy rows without a penalty need) goes through the model's `ScreenedHead` when it has one,
    without the full head product; from a module forward it holds the logits themselves."""

    def __init__(self, *, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 forward: CachedForward | None = None):
        self._logits, self.hidden, self.forward = logits, hidden, forward
        self._tokens: list[int] | None = None

    def logits(self) -> torch.Tensor:
        """(B, V)."""
        if self._logits is None:
            with torch.inference_mode():  # asked for after the step, outside its inference_mode
                self._logits = self.forward.mm(self.hidden, self.forward.head)
        return self._logits

    def argmax(self) -> list[int]:
        """Each row's highest-scoring token id (the lowest id on a tie), as `logits().argmax(-1)`."""
        if self._tokens is None:
            screen = self.forward.screen if self._logits is None and self.forward is not None else None
            if screen is None or len(self.hidden) < screen.min_rows:  # too few rows for it to pay
                self._tokens = self._full_argmax()
            else:  # the screen or the fp32 head, whichever is faster here (timed on the first steps)
                with torch.inference_mode():
                    self._tokens = screen.tokens(self.hidden, self._full_argmax)
        return self._tokens

    def _full_argmax(self) -> list[int]:
        return self.logits().argmax(-1).tolist()

    def row(self, j: int) -> StepRow:
        return StepRow(self, j)


class StepRow:
    """Row `j` of a `StepScores`, for that row's own sampler; the batch's products are made once."""

    def __init__(self, scores: StepScores, j: int):
        self.scores, self.j = scores, j

    def logits(self) -> torch.Tensor:
        return self.scores.logits()[self.j:self.j + 1]

    def argmax(self) -> list[int]:
        return [self.scores.argmax()[self.j]]
