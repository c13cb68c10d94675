"""Text generation with our `KVCache`: greedy, temperature, top-k, top-p, repetition penalty.

    ids = generate(model, [[5, 9, 2], [7]], max_new_tokens=20, temperature=0.8, top_k=50, seed=0)
    text = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=40)

Design choices (why):
- **One prompt at a time.** Our `KVCache` has one position counter shared by the whole batch,
  so prompts of different lengths would need left padding plus an attention mask that the
  model does not take. Decoding each prompt alone with its own cache is exactly correct, and
  on the small models minilab targets the per-token cost is dominated by Python overhead
  anyway. Results therefore never depend on what else is in the batch.
- **Prefill once, then one token per step**: the prompt goes through the model in one forward
  pass that fills the cache; every later step feeds only the newest token (B=1, T=1).
- **A local `torch.Generator`** seeded from `seed` draws every sample, so generation is
  reproducible and never touches (or is disturbed by) the global RNG. Prompts are decoded in
  order with the same generator, so a batch is reproducible as a whole.
- Logits are processed in transformers' order: repetition penalty -> temperature -> top-k ->
  top-p -> sample. `temperature == 0` is greedy (argmax after the repetition penalty).
- A stop token (eos or any of `stop_token_ids`) ends that prompt's generation and is not
  included in the output. Output holds only the new tokens, never the prompt.
- The total length (prompt + new tokens) never exceeds `model.config.max_seq_len`.
- **Streaming**: `stream_generate` yields one prompt's tokens as they are decoded (the same tokens
  `generate` returns); `TextStream` turns them into text deltas and applies stop strings. The
  server, `minilab generate` and `minilab chat` all decode through these two.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from minilab.errors import MinilabError
from minilab.model import KVCache


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


def next_token(logits: torch.Tensor, seen: Sequence[int], *, temperature: float, top_k: int | None,
               top_p: float | None, repetition_penalty: float, generator: torch.Generator | None) -> int:
    """Pick the next token from one position's logits (V,)."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0.0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    # multinomial on CPU with a CPU generator: reproducible whatever device the model is on.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _as_prompts(input_ids: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        return [[int(t) for t in row] for row in input_ids.tolist()]
    prompts = [list(map(int, p)) for p in input_ids]
    if any(not p for p in prompts):
        raise MinilabError("cannot generate from an empty prompt (encode at least one token, e.g. bos)")
    return prompts


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:  # parameter-free stubs in tests
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def _stream_one(model: torch.nn.Module, prompt: list[int], max_new: int, stop: set[int], use_cache: bool,
                generator: torch.Generator | None, pick: dict[str, Any]) -> Iterator[int]:
    """New tokens for one prompt, one at a time (a stop token ends the stream and is not yielded).

    A caller may stop iterating at any time (a stop string matched, a client went away): nothing
    more is computed, the cache is simply dropped.
    """
    if max_new <= 0:
        return
    device, dtype = _model_device_dtype(model)
    cache = KVCache(model.config, 1, max_len=len(prompt) + max_new, dtype=dtype, device=device) \
        if use_cache else None
    seen = list(prompt)
    with torch.no_grad():  # not a decorator: a generator is resumed outside the decorated call
        ids = torch.tensor([prompt], dtype=torch.long, device=device)                    # (1, T)
        logits = model(ids, kv_cache=cache)[0, -1]                                       # (V,) prefill
    for step in range(max_new):
        tok = next_token(logits, seen, generator=generator, **pick)
        if tok in stop:
            return
        seen.append(tok)
        yield tok
        if step == max_new - 1:
            return  # the last token needs no forward pass
        with torch.no_grad():
            if cache is not None:
                logits = model(torch.tensor([[tok]], device=device), kv_cache=cache)[0, -1]  # (V,)
            else:  # recompute the whole sequence (reference path, and models without a cache)
                logits = model(torch.tensor([seen], dtype=torch.long, device=device))[0, -1]


def _check_sampling(temperature: float, top_p: float | None, repetition_penalty: float) -> None:
    if temperature < 0:
        raise MinilabError(f"temperature must be ≥ 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise MinilabError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise MinilabError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()  # fresh entropy for this call only; the global RNG stays untouched
    return generator


def _budget(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> int:
    """New tokens allowed for `prompt`: max_new_tokens, capped so the total fits max_seq_len."""
    max_len = model.config.max_seq_len
    if len(prompt) >= max_len:
        raise MinilabError(f"prompt of {len(prompt)} tokens leaves no room to generate "
                           f"(max_seq_len {max_len}); shorten it")
    return min(max_new_tokens, max_len - len(prompt))


def stream_generate(model: torch.nn.Module, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    stop_token_ids: Iterable[int] = (), seed: int | None = None) -> Iterator[int]:
    """New token ids of one prompt as they are decoded: the same tokens `generate` returns for it
    with the same arguments. The model must already be in eval mode (this never toggles it, so
    several streams may share one model from different threads)."""
    _check_sampling(temperature, top_p, repetition_penalty)
    ids = _as_prompts([prompt])[0]
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    return _stream_one(model, ids, _budget(model, ids, max_new_tokens), set(stop_token_ids), True,
                       _make_generator(seed), pick)


def generate(model: torch.nn.Module, input_ids: Sequence[Sequence[int]] | torch.Tensor, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop_token_ids: Iterable[int] = (), seed: int | None = None,
             kv_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not repeated; a stop token ends a row and
    is not included). `temperature=0` is greedy; `seed` makes sampling reproducible (a local
    generator, the global RNG is untouched). Prompts may differ in length; see the module docstring.
    """
    _check_sampling(temperature, top_p, repetition_penalty)
    prompts = _as_prompts(input_ids)
    generator = _make_generator(seed)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        results = []
        for prompt in prompts:
            budget = _budget(model, prompt, max_new_tokens)
            results.append(list(_stream_one(model, prompt, budget, set(stop_token_ids), kv_cache, generator, pick)))
        return results
    finally:
        model.train(was_training)


# ---- text in, text out ---------------------------------------------------------------------------
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")


def tokenizer_stop_ids(tokenizer: Any) -> list[int]:
    """eos-like token ids of a `tokenizers.Tokenizer` or HF tokenizer (those present in its vocab)."""
    ids: list[int] = []
    eos_id = getattr(tokenizer, "eos_token_id", None)  # HF tokenizers know their eos
    if isinstance(eos_id, int):
        ids.append(eos_id)
    for name in _EOS_NAMES:
        tid = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else \
            tokenizer.convert_tokens_to_ids(name)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid != unk and tid not in ids:
            ids.append(tid)
    return ids


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text` with a `tokenizers.Tokenizer` (returns an Encoding) or an HF tokenizer."""
    enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def generate_text(model: torch.nn.Module, tokenizer: Any, prompt: str, *, add_special_tokens: bool = False,
                  **kw: Any) -> str:
    """Continuation of `prompt` as text (the prompt not repeated). Keyword arguments go to
    `generate`; `stop_token_ids` defaults to the tokenizer's eos-like tokens. Prompts are encoded
    without special tokens by default, as `minilab pack` encodes training documents."""
    kw.setdefault("stop_token_ids", tokenizer_stop_ids(tokenizer))
    kw.setdefault("max_new_tokens", 64)
    ids = encode(tokenizer, prompt, add_special_tokens)
    return decode(tokenizer, generate(model, [ids], **kw)[0])


# ---- streaming text and stop strings --------------------------------------------------------------
class TextStream:
    """Turns token ids into text deltas as they arrive, and finds stop strings.

        stream = TextStream(tokenizer, stop=["\\nUser:"])
        for tok in stream_generate(...):
            delta = stream.push(tok)      # text safe to show now ("" while held back)
            if stream.stopped:
                break
        delta += stream.finish()          # whatever was held back, cut at a stop string

    Why it is not `decode([tok])` per token: byte-level BPE splits a multi-byte character over
    several tokens (decoding one alone gives U+FFFD), and SentencePiece-style decoders drop a
    leading space when a slice is decoded alone. So each step decodes the window of ids from
    `_prefix` on and emits only what it adds to the window's previous decoding (TGI's offsets).
    Text that could be the start of a stop string is held back until it is ruled out, so a
    client never sees a stop string or a piece of one; the concatenated deltas equal the final
    text exactly.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""        # everything decoded so far (emitted + held)
        self.emitted = 0      # characters of `text` handed out
        self.stopped = False  # a stop string matched; `text` is cut before it
        self._prefix = self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; the text that can be shown now."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = decode(self.tokenizer, self.ids[self._prefix:self._read])
        after = decode(self.tokenizer, self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its next byte
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest once generation has ended (an incomplete character included, as
        decoding the whole output would show it)."""
        if not self.stopped and self._read < len(self.ids):
            before = decode(self.tokenizer, self.ids[self._prefix:self._read])
            self.text += decode(self.tokenizer, self.ids[self._prefix:])[len(before):]
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped:
            # A match may start in the held-back text, so search from the earliest unreleased char.
            start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._partial_stop_len()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
