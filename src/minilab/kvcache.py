"""`KVCache`: the keys and values of incremental decoding, preallocated per layer.

Also what a left-padded batch needs: per-row positions (each row's RoPE angles are those it has
alone) and the attention mask that hides each row's pad slots. `Transformer.forward` and
`CachedForward` ask the cache for both (`rope`, `attn_mask`) and know nothing of padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from minilab.model import ModelConfig, signed_sin

if TYPE_CHECKING:
    from minilab.model import Transformer


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
