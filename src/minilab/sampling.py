"""Logits processing and sampling for decoding: repetition penalty, temperature, top-k, top-p, and
the seeded generator every sample is drawn from.

Why its own module: `generate` decodes (caches, batches, rows finishing), this picks tokens from
logits; both the batch decoder and the server's continuous batch sample through `Sampler`.

- Logits are processed in transformers' order: repetition penalty -> temperature -> top-k ->
  top-p -> sample. `temperature == 0` is greedy (argmax after the repetition penalty).
- **A local `torch.Generator`** (`make_generator`) draws every sample, so generation is
  reproducible and never touches (or is disturbed by) the global RNG; multinomial runs on CPU row
  by row, so a seed gives the same tokens on any device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from minilab.errors import MinilabError

if TYPE_CHECKING:
    from minilab.cached_forward import StepRow, StepScores


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: Sequence[int] | torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019, as transformers): for every token already seen,
    a positive logit is divided by `penalty` and a negative one multiplied by it, so the token
    becomes less likely either way when penalty > 1. logits: (V,) or (B, V); returns a new tensor."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = torch.as_tensor(seen_ids, dtype=torch.long, device=logits.device).unique()
    out = logits.clone()
    picked = out[..., ids]
    out[..., ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value are kept too), -inf elsewhere. (..., V)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                            # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `p`
    (the most likely token is always kept). (..., V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly before each token: a token is dropped once the tokens ahead of it reach p.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# The sampling defaults, defined once (docs/stages/09-serve.md, "Sampling defaults", says why with
# the figures of benchmarks/chat_defaults.py and of the demo's eval reports):
# - free text from a small model (`minilab generate`, eval's sampled continuations): greedy decoding
#   loops ("the first of the first time, and the first of the first time"); a mild temperature, a
#   nucleus and a CTRL penalty of 1.15 give sentences that move on;
# - a conversation (`minilab chat`, the chat page, eval of chat models): a low temperature keeps a
#   small model on the answers it learned, and no penalty, since answers are short and the prompt
#   repeats the user's words on purpose.
GENERATE_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.15}
CHAT_SAMPLING = {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.0}


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """`apply_repetition_penalty` for a batch, with the seen tokens as a (B, V) boolean mask."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class Sampler:
    """Next tokens of a batch from its (B, V) logits: repetition penalty -> temperature -> top-k ->
    top-p -> sample (or argmax when greedy), each row as `apply_repetition_penalty`, `top_k_filter`
    and `top_p_filter` treat it alone.

    The repetition penalty never applies to `exempt` ids (the stop tokens): a chat prompt holds an
    end-of-turn token after every earlier turn, and penalising it makes a small model run past the
    end of its answer (measured: docs/stages/09-serve.md)."""

    def __init__(self, prompts: list[list[int]], *, temperature: float, top_k: int | None, top_p: float | None,
                 repetition_penalty: float, generator: torch.Generator | None, exempt: Iterable[int] = ()):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.penalty, self.generator = repetition_penalty, generator
        self.prompts = prompts if repetition_penalty != 1.0 else None
        self.exempt = sorted(set(exempt))
        self.seen: torch.Tensor | None = None  # (B, V) tokens of each row so far, built on first use

    @property
    def greedy(self) -> bool:
        """Whether the tokens are the logits' argmax as they come (greedy, no penalty)."""
        return self.temperature <= 0.0 and self.prompts is None

    def __call__(self, scores: torch.Tensor | StepScores | StepRow) -> list[int]:
        """The rows' next tokens from their (B, V) logits, or from a decoding step's scores: then greedy
        rows without a penalty take its `argmax()` (which may not need the logits made at all)."""
        if not isinstance(scores, torch.Tensor):
            if self.greedy:
                return scores.argmax()
            scores = scores.logits()
        logits = scores.float()
        if self.prompts is not None:
            if self.seen is None:
                self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                for i, p in enumerate(self.prompts):
                    self.seen[i, p] = True
                self.seen[:, [e for e in self.exempt if e < self.seen.shape[1]]] = False
            logits = _penalise(logits, self.seen, self.penalty)
        if self.temperature <= 0.0:
            return logits.argmax(dim=-1).tolist()
        logits = logits / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        probs = logits.softmax(dim=-1).cpu()
        # multinomial on CPU with a CPU generator, row by row: reproducible whatever the device.
        return [int(torch.multinomial(row, 1, generator=self.generator)) for row in probs]

    def observe(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:  # a stop token ends its row, so no exempt id is observed
            self.seen[torch.arange(len(tokens), device=self.seen.device), tokens.to(self.seen.device)] = True

    def select(self, keep: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen.index_select(0, keep)


def check_sampling(temperature: float, top_p: float | None, repetition_penalty: float) -> None:
    """Refuse sampling arguments with no meaning before any forward pass is spent on them."""
    if temperature < 0:
        raise MinilabError(f"temperature must be ≥ 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise MinilabError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise MinilabError(f"repetition_penalty must be > 0, got {repetition_penalty}")


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1 (negatives alias large seeds)


def make_generator(seed: int | None) -> torch.Generator:
    """The CPU generator one call draws every sample from: seeded, or fresh entropy without `seed`."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()  # fresh entropy for this call only; the global RNG stays untouched
    return generator
