"""Perplexity and bits per byte: on packed validation data and on raw text files.

All NLLs are natural-log sums over *scored* tokens (a token is scored when the model predicts it
from the tokens before it); mean NLL = sum / tokens, perplexity = exp(mean NLL), and
bits per byte = sum NLL / ln 2 / UTF-8 bytes of the scored text, which does not depend on the
tokenizer, so models with different vocabularies can be compared.

Raw text uses the sliding window of the Hugging Face perplexity guide: windows of `max_length`
tokens start every `stride` tokens and each window scores only the tokens the previous window
did not, so every token is scored exactly once, with between max_length - stride and
max_length - 1 tokens of context. The largest stride is max_length - 1 (windows share one
token, so no token is left without context: the cheap variant); a smaller stride costs more
forwards and gives each token more context (a lower, fairer NLL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minilab.errors import MinilabError

LN2 = math.log(2.0)


def summarize(nll_sum: float, tokens: int, n_bytes: int | None = None) -> dict[str, Any]:
    """Mean NLL, perplexity and (with `n_bytes`) bits per byte from a summed NLL."""
    if tokens <= 0:
        raise MinilabError("no tokens to score (the text or split is too short)")
    mean = nll_sum / tokens
    out: dict[str, Any] = {"nll_sum": nll_sum, "tokens": tokens, "mean_nll": mean,
                           "perplexity": math.exp(min(mean, 700.0))}  # exp(>709) overflows a float
    if n_bytes is not None:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = nll_sum / LN2 / n_bytes if n_bytes > 0 else None
    return out


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, score_from: int) -> float:
    """Summed NLL of tokens ids[score_from:] of one window, each predicted from all tokens before
    it in the window. ids: (T,) long; score_from >= 1 (the first token has no prediction)."""
    device = _device(model)
    logits = model(ids[None].to(device))[0]                                     # (T, V)
    # logits[t] predicts ids[t + 1]: scoring ids[s:] uses logits[s - 1 : T - 1].
    pred = logits[score_from - 1:-1].float()                                    # (n, V)
    target = ids[score_from:].to(device)                                        # (n,)
    return float(F.cross_entropy(pred, target, reduction="sum", ignore_index=-100))


def sliding_window_nll(model: torch.nn.Module, ids: Sequence[int] | torch.Tensor, max_length: int,
                       stride: int) -> tuple[float, int]:
    """(summed NLL, scored tokens) of ids[1:], every token scored once (HF perplexity guide)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel()
    if max_length < 2 or stride < 1:
        raise MinilabError(f"need max_length >= 2 and stride >= 1 (got {max_length}, {stride})")
    stride = min(stride, max_length - 1)  # each window must score at least one new token
    total, scored, prev_end = 0.0, 0, 1  # ids[0] is context only: nothing predicts it
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + max_length, n)
        if end <= prev_end:
            break
        # Score only what earlier windows did not: positions prev_end..end-1.
        total += window_nll(model, ids[begin:end], prev_end - begin)
        scored += end - prev_end
        prev_end = end
        if end == n:
            break
    return total, scored


def text_perplexity(model: torch.nn.Module, tokenizer: Any, text: str, *, max_length: int | None = None,
                    stride: int | None = None, prefix_id: int | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte of one text.

    With `prefix_id` (the document separator, eos for `minilab pack` data), it is put before the
    text so that every text token is scored, and bits per byte covers the whole text exactly.
    Without it the first token is context only and its bytes are left out of the byte count.
    """
    from minilab.generate import decode, encode

    ids = encode(tokenizer, text)
    if not ids:
        raise MinilabError("the text encodes to no tokens")
    if prefix_id is not None:
        ids = [prefix_id, *ids]
        n_bytes = len(text.encode("utf-8"))
    else:
        n_bytes = len(decode(tokenizer, ids[1:]).encode("utf-8"))
    max_length = max_length or model.config.max_seq_len
    stride = stride or max(1, max_length // 2)
    nll, tokens = sliding_window_nll(model, ids, max_length, stride)
    return {**summarize(nll, tokens, n_bytes), "max_length": max_length, "stride": stride}


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise MinilabError(f"{path}: text file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MinilabError(f"{path}: not UTF-8 text (byte {e.start}); convert it first") from None


@torch.no_grad()
def packed_perplexity(model: torch.nn.Module, packed_dir: str | Path, *, split: str = "val",
                      seq_len: int | None = None, max_tokens: int = 0, batch_size: int = 8,
                      tokenizer: Any = None) -> dict[str, Any]:
    """Mean token NLL and perplexity over a packed split (`minilab pack` output).

    The split's token stream is cut into windows of seq_len + 1 tokens that overlap by one, so
    every token after the first is scored exactly once (context restarts at each window, as in
    training). `max_tokens` > 0 caps the tokens read (from the start: the split is a fixed,
    seeded draw of whole documents already). With `tokenizer`, the scored tokens are decoded to
    count bytes, giving bits per byte (eos tokens are scored and add 0 bytes).
    """
    import numpy as np

    from minilab.data.packed import open_split

    tokens, _offsets, manifest = open_split(packed_dir, split)
    seq_len = min(seq_len or int(manifest.get("seq_len", model.config.max_seq_len)), model.config.max_seq_len)
    n = len(tokens) if max_tokens <= 0 else min(len(tokens), max_tokens)
    if n < 2:
        raise MinilabError(f"{packed_dir}: split '{split}' has {n} tokens, too few to score")
    vocab = model.config.vocab_size
    starts = list(range(0, n - 1, seq_len))
    total, scored, device = 0.0, 0, _device(model)
    for i in range(0, len(starts), batch_size):
        chunk = [np.asarray(tokens[s:min(s + seq_len + 1, n)], dtype=np.int64) for s in starts[i:i + batch_size]]
        width = max(len(c) for c in chunk)
        # Right-pad the last short window; padded targets are ignored, and causal attention means
        # padding after a token cannot change that token's logits.
        batch = torch.zeros(len(chunk), width, dtype=torch.long)                 # (B, T+1)
        targets = torch.full((len(chunk), width - 1), -100, dtype=torch.long)    # (B, T)
        for row, c in enumerate(chunk):
            batch[row, :len(c)] = torch.from_numpy(c)
            targets[row, :len(c) - 1] = torch.from_numpy(c[1:])
        if int(batch.max()) >= vocab:
            raise MinilabError(f"{packed_dir}: token id {int(batch.max())} ≥ the model's vocab_size {vocab} "
                               "(data packed with another tokenizer?)")
        logits = model(batch[:, :-1].to(device))                                 # (B, T, V)
        total += float(F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1).to(device),
                                       ignore_index=-100, reduction="sum"))
        scored += int((targets != -100).sum())
    n_bytes = None
    if tokenizer is not None:
        from minilab.generate import decode

        n_bytes = len(decode(tokenizer, np.asarray(tokens[1:n]).tolist()).encode("utf-8"))
    return {**summarize(total, scored, n_bytes), "split": split, "seq_len": seq_len,
            "split_tokens": int(len(tokens)), "dir": str(packed_dir)}


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
