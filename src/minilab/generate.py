"""Text generation with our `KVCache`: greedy, temperature, top-k, top-p, repetition penalty.

    ids = generate(model, [[5, 9, 2], [7]], max_new_tokens=20, temperature=0.8, top_k=50, seed=0)
    text = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=40)

Design choices (why):
- **Prompts are decoded together** (up to `batch_size` rows): shorter prompts are left-padded and
  our `KVCache` gives every row its own positions and masks its pad slots, so a row's tokens are
  those it gets alone (greedy output equals one-by-one output; only float summation order differs).
  A row leaves the batch as soon as it finishes (stop token, budget, or `finish(row)` from the
  caller, e.g. a stop string): the cache is compacted, nothing more is computed for it. Models
  that do not take a padded cache (test stubs, other wrappers) are decoded one prompt at a time.
- **Prefill once, then one token per step**: the prompts go through the model in one forward
  pass that fills the preallocated cache (written in place, RoPE tables built once per cache);
  every later step feeds only the newest token of each row (T=1), under `torch.inference_mode`.
- **A local `torch.Generator`** seeded from `seed` draws every sample, so generation is
  reproducible and never touches (or is disturbed by) the global RNG. Each step draws the rows'
  samples in row order from that one generator, so a batch is reproducible as a whole (a single
  prompt draws exactly as `stream_generate` does).
- Logits are processed (`minilab.sampling`) in transformers' order: repetition penalty -> temperature -> top-k ->
  top-p -> sample. `temperature == 0` is greedy (argmax after the repetition penalty).
- **Greedy steps need no logits**: each step hands the sampler `StepScores`, and greedy rows without
  a penalty take their `argmax()`, which a model prepared by `use_decode_layout` with a large head
  answers from an int8 copy of it (`ScreenedHead`: the same token, a quarter of the head's bytes
  read); sampled rows, and batches with any, make the logits as before.
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

from minilab.cached_forward import CachedForward, StepRow, StepScores
from minilab.decode_threads import step_threads_for
from minilab.errors import MinilabError
from minilab.kvcache import KVCache
from minilab.sampling import Sampler, check_sampling, make_generator
from minilab.tokenization import tokenizer_stop_ids


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


def _takes_padded_cache(model: torch.nn.Module) -> bool:
    """Our Transformer (also under a PEFT wrapper, which forwards attribute lookups) decodes a
    left-padded batch; anything else is given one prompt at a time."""
    return bool(getattr(model, "supports_padded_kv_cache", False))


def supports_continuous_batching(model: torch.nn.Module) -> bool:
    """Whether `ContinuousBatch` can decode this model (it needs a left-padded KV cache)."""
    return _takes_padded_cache(model)


def _next_scores(model: torch.nn.Module, fast: CachedForward | None, ids: torch.Tensor,
                 cache: KVCache | None, keep_last: bool = True) -> StepScores:
    """Each row's next-token scores at its last position, through `fast` when the model has one."""
    if fast is not None:
        return fast.step_scores(ids, cache)
    keep = {"logits_to_keep": 1} if keep_last and _takes_padded_cache(model) else {}
    return StepScores(logits=model(ids, kv_cache=cache, **keep)[:, -1])


class BatchDecoder:
    """Decodes several prompts together; iterate for (row, token) as each token is decoded.

    Rows are the indices of `prompts`. A row ends at a stop token (not yielded), at its budget, or
    when the caller says `finish(row)` (a stop string matched, a client went away); it then leaves
    the batch before the next step. Breaking off the iteration stops everything at once.
    """

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], budgets: list[int], stop: set[int],
                 generator: torch.Generator | None, pick: dict[str, Any], use_cache: bool = True):
        if len(prompts) > 1 and not (use_cache and _takes_padded_cache(model)):
            raise ValueError("this model decodes one prompt at a time")
        self.model, self.prompts, self.budgets, self.stop = model, prompts, budgets, stop
        self.generator, self.pick, self.use_cache = generator, pick, use_cache
        self.finished: set[int] = set()

    def finish(self, row: int) -> None:
        self.finished.add(row)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        model = self.model
        rows = [r for r in range(len(self.prompts)) if self.budgets[r] > 0]
        if not rows:
            return
        device, dtype = _model_device_dtype(model)
        prompts = [self.prompts[r] for r in rows]
        width = max(map(len, prompts))
        pad = [width - len(p) for p in prompts]
        cache = KVCache(model.config, len(rows), max_len=width + max(self.budgets[r] for r in rows),
                        dtype=dtype, device=device, pad=pad) if self.use_cache else None
        sampler = Sampler(prompts, generator=self.generator, exempt=self.stop, **self.pick)
        seqs = [list(p) for p in prompts]  # only for the no-cache reference path
        produced = dict.fromkeys(rows, 0)
        fast = CachedForward.of(model) if cache is not None else None

        threads = step_threads_for(model)
        ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts, strict=True)], device=device)  # (B, T)
        with threads(ids.numel()):
            with torch.inference_mode():  # not a decorator: a generator is resumed outside the decorated call
                scores = _next_scores(model, fast, ids, cache)                           # prefill
            tokens = sampler(scores)
        while True:
            keep = []
            for j, (r, tok) in enumerate(zip(rows, tokens, strict=True)):
                if tok in self.stop or r in self.finished:
                    continue
                yield r, tok
                produced[r] += 1
                if produced[r] < self.budgets[r] and r not in self.finished:  # the last token needs no forward
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                rows, tokens = [rows[j] for j in keep], [tokens[j] for j in keep]
                sampler.select(index)
                if cache is not None:
                    cache.select(index)
            new = torch.tensor(tokens, device=device)
            sampler.observe(new)
            with threads(len(rows)):
                with torch.inference_mode():
                    if cache is not None:
                        scores = _next_scores(model, fast, new[:, None], cache, keep_last=False)
                    else:  # recompute the whole sequence (reference path, and models without a cache)
                        seqs[0].append(tokens[0])
                        scores = StepScores(logits=model(torch.tensor(seqs, dtype=torch.long, device=device))[:, -1])
                tokens = sampler(scores)


def new_token_budget(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> int:
    """New tokens allowed for `prompt`: max_new_tokens, capped so the total fits max_seq_len."""
    max_len = model.config.max_seq_len
    if len(prompt) >= max_len:
        raise MinilabError(f"prompt of {len(prompt)} tokens leaves no room to generate "
                           f"(max_seq_len {max_len}); shorten it")
    return min(max_new_tokens, max_len - len(prompt))


def _batches(model: torch.nn.Module, n: int, batch_size: int, use_cache: bool) -> list[range]:
    size = max(1, batch_size) if use_cache and _takes_padded_cache(model) else 1
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def stream_generate(model: torch.nn.Module, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    stop_token_ids: Iterable[int] = (), seed: int | None = None) -> Iterator[int]:
    """New token ids of one prompt as they are decoded: the same tokens `generate` returns for it
    with the same arguments. The model must already be in eval mode (this never toggles it, so
    several streams may share one model from different threads)."""
    check_sampling(temperature, top_p, repetition_penalty)
    ids = _as_prompts([prompt])[0]
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    decoder = BatchDecoder(model, [ids], [new_token_budget(model, ids, max_new_tokens)], set(stop_token_ids),
                           make_generator(seed), pick)
    return (tok for _, tok in decoder)


def generate(model: torch.nn.Module, input_ids: Sequence[Sequence[int]] | torch.Tensor, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop_token_ids: Iterable[int] = (), seed: int | None = None,
             kv_cache: bool = True, batch_size: int = 16) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not repeated; a stop token ends a row and
    is not included). `temperature=0` is greedy; `seed` makes sampling reproducible (a local
    generator, the global RNG is untouched). Prompts may differ in length; up to `batch_size` are
    decoded together (see the module docstring). `kv_cache=False` recomputes every step, one prompt
    at a time (the reference path).
    """
    check_sampling(temperature, top_p, repetition_penalty)
    prompts = _as_prompts(input_ids)
    budgets = [new_token_budget(model, p, max_new_tokens) for p in prompts]
    generator = make_generator(seed)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    stop = set(stop_token_ids)
    was_training = model.training
    model.eval()
    try:
        results: list[list[int]] = [[] for _ in prompts]
        for batch in _batches(model, len(prompts), batch_size, kv_cache):
            decoder = BatchDecoder(model, [prompts[i] for i in batch], [budgets[i] for i in batch], stop,
                                   generator, pick, use_cache=kv_cache)
            for row, tok in decoder:
                results[batch[row]].append(tok)
        return results
    finally:
        model.train(was_training)


# ---- text in, text out ---------------------------------------------------------------------------
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


def generate_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, stop: Sequence[str] = (),
                   add_special_tokens: bool = False, max_new_tokens: int = 64,
                   stop_token_ids: Iterable[int] | None = None, seed: int | None = None, batch_size: int = 16,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0) -> list[str]:
    """Continuations of several prompts, decoded together (see `generate`); each row ends on its own
    at a stop token (default: the tokenizer's eos-like tokens), its budget, or a stop string, which
    is cut from the text (`TextStream`), and then leaves the batch."""
    check_sampling(temperature, top_p, repetition_penalty)
    ids = _as_prompts([encode(tokenizer, p, add_special_tokens) for p in prompts])
    budgets = [new_token_budget(model, p, max_new_tokens) for p in ids]
    stop_ids = set(tokenizer_stop_ids(tokenizer) if stop_token_ids is None else stop_token_ids)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    generator = make_generator(seed)
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(model, len(ids), batch_size, True):
            decoder = BatchDecoder(model, [ids[i] for i in batch], [budgets[i] for i in batch], stop_ids,
                                   generator, pick)
            for row, tok in decoder:
                stream = streams[batch[row]]
                stream.push(tok)
                if stream.stopped:
                    decoder.finish(row)
    finally:
        model.train(was_training)
    for stream in streams:
        stream.finish()
    return [stream.text for stream in streams]


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


# ---- continuous batching ---------------------------------------------------------------------------
class BatchRow:
    """One sequence of a `ContinuousBatch`: its sampler, budget, and what it has produced."""

    def __init__(self, prompt: list[int], budget: int, pick: dict[str, Any], generator: torch.Generator | None,
                 stop: Iterable[int] = ()):
        self.prompt, self.budget = prompt, budget
        self.sampler = Sampler([prompt], generator=generator, exempt=stop, **pick)
        self.produced = 0
        self.last: int | None = None           # the token the next step feeds
        self.done: str | None = None           # "stop" (a stop token) or "length" (its budget)
        self.prefill: KVCache | None = None    # its own cache until it joins the batch's

    def take(self, scores: StepScores | StepRow, stop: set[int]) -> int | None:
        """Sample this row's next token from its scores (one row); None when it is a stop token."""
        tok = self.sampler(scores)[0]
        if tok in stop:
            self.done = "stop"
            return None
        self.sampler.observe(torch.tensor([tok]))
        self.produced += 1
        self.last = tok
        if self.produced >= self.budget:
            self.done = "length"
        return tok


class ContinuousBatch:
    """Sequences decoded together that join and leave between steps (continuous batching).

    `add` prefills a prompt alone (its own cache, the logits of decoding it alone) and samples its
    first token; the next `step` moves it into the shared left-padded KVCache, aligned so every
    row's last token sits in the same slot: joining rows that are shorter than the batch get more
    left padding, a longer one shifts the others right (their pad grows by the same amount, so
    their RoPE positions stay). Rows that are done or `drop`ped leave before the next step. Each
    row samples with its own parameters and generator, so a seeded request gives the same tokens
    whichever requests share its steps, and greedy rows the tokens of decoding them alone.
    Only for models that decode a left-padded cache (our Transformer); one thread drives it.
    """

    def __init__(self, model: torch.nn.Module, stop_token_ids: Iterable[int] = ()):
        if not _takes_padded_cache(model):
            raise ValueError("continuous batching needs a model that decodes a left-padded KV cache")
        self.model, self.stop = model, set(stop_token_ids)
        self.device, self.dtype = _model_device_dtype(model)
        self.fast = CachedForward.of(model)
        self.threads = step_threads_for(model)
        self.rows: list[BatchRow] = []      # in the shared cache, in its row order
        self.joining: list[BatchRow] = []   # prefilled, joining at the next step
        self.cache: KVCache | None = None
        self.peak = 0                       # the most rows one step has decoded

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def add(self, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
            top_p: float | None = None, repetition_penalty: float = 1.0,
            seed: int | None = None) -> tuple[BatchRow, int | None]:
        """Prefill `prompt` and sample its first token: (row, token, None for a stop token). The
        row joins the batch at the next `step` unless it is already done or dropped."""
        check_sampling(temperature, top_p, repetition_penalty)
        ids = _as_prompts([prompt])[0]
        pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        row = BatchRow(ids, new_token_budget(self.model, ids, max_new_tokens), pick, make_generator(seed), self.stop)
        if row.budget <= 0:
            row.done = "length"
            return row, None
        row.prefill = KVCache(self.model.config, 1, max_len=len(ids), dtype=self.dtype, device=self.device)
        with self.threads(len(ids)):
            with torch.inference_mode():
                scores = _next_scores(self.model, self.fast, torch.tensor([ids], device=self.device), row.prefill)
            tok = row.take(scores, self.stop)
        if row.done is None:
            self.joining.append(row)
        return row, tok

    def drop(self, row: BatchRow) -> None:
        """Take `row` out before the next step (a stop string matched, its client went away)."""
        if row.done is None:
            row.done = "dropped"

    def step(self) -> list[tuple[BatchRow, int | None]]:
        """One decoding step of every live row: [(row, token or None for a stop token)]."""
        self._settle()
        if not self.rows:
            return []
        self.peak = max(self.peak, len(self.rows))
        with self.threads(len(self.rows)):
            with torch.inference_mode():
                new = torch.tensor([[r.last] for r in self.rows], device=self.device)
                scores = _next_scores(self.model, self.fast, new, self.cache)
                if not all(r.sampler.greedy for r in self.rows):
                    scores.logits()  # one head product for the batch, which the greedy rows read too
            return [(r, r.take(scores.row(j), self.stop)) for j, r in enumerate(self.rows)]

    def _settle(self) -> None:
        """Finished rows leave the shared cache; prefilled ones join it."""
        keep = [j for j, r in enumerate(self.rows) if r.done is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[j] for j in keep]
            if keep:
                self.cache.select(torch.tensor(keep, device=self.device))
            else:
                self.cache = None
        joining = [r for r in self.joining if r.done is None]
        self.joining = []
        if joining:
            self._join(joining)

    def _join(self, new: list[BatchRow]) -> None:
        cfg, old = self.model.config, self.cache
        pos = old.pos if old is not None else 0
        lengths = [r.prefill.pos for r in new]
        end = max([pos, *lengths])  # the common slot after every row's last token
        rows = self.rows + new
        old_pad = old.pad.tolist() if old is not None and old.pad is not None else [0] * len(self.rows)
        pad = [p + end - pos for p in old_pad] + [end - n for n in lengths]
        room = max(r.budget - r.produced for r in rows)  # slots still to write (a margin of one)
        cache = KVCache(cfg, len(rows), max_len=end + room, dtype=self.dtype, device=self.device, pad=pad)
        with torch.no_grad():
            for layer in range(cfg.n_layer):
                for dst, src_old, attr in ((cache.k[layer], old.k[layer] if old else None, "k"),
                                           (cache.v[layer], old.v[layer] if old else None, "v")):
                    if src_old is not None and pos:
                        dst[:len(self.rows), :, end - pos:end].copy_(src_old[:, :, :pos])
                    for j, (r, n) in enumerate(zip(new, lengths, strict=True)):
                        dst[len(self.rows) + j, :, end - n:end].copy_(getattr(r.prefill, attr)[layer][0, :, :n])
        cache.pos = end
        for r in new:
            r.prefill = None
        self.rows, self.cache = rows, cache
