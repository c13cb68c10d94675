"""Multiple choice by log-likelihood, printed beside chance and majority-class baselines.

Input: local JSONL, one item per line, in either shape (detected per line):
  BoolQ    {"passage": str, "question": str, "answer": bool}
           -> context "{passage}\\nQuestion: {question}?\\nAnswer:", choices [" no", " yes"]
              (the lm-evaluation-harness prompt)
  generic  {"context": str, "choices": [str, ...], "label": int}

Each choice is scored as the summed log-likelihood of its tokens after the context (the whole
answer, not just its first token). Three predictions come from that: the raw sum (favours short
answers), the sum divided by the answer's token count, and divided by its UTF-8 byte count (the
tokenizer-independent one, like lm-eval's `acc_norm`, which divides by characters). Each
accuracy carries a 95% Wilson score interval; the chance baseline is the mean of 1/n_choices
over the items, and the majority baseline is always answering the most frequent label. A small
model's "37%" on BoolQ means nothing next to the ~62% of always answering "yes".

`limit` draws that many items uniformly at random with `seed` (the first N lines of a file are
often sorted or grouped, so they are never used as a sample).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minilab.errors import MinilabError

NORMS = ("sum", "per_token", "per_byte")


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    line: int  # 1-based line in the source file, for messages and per-item output


def _parse_line(obj: Any, where: str) -> tuple[str, list[str], int]:
    """(context, choices, label) of one decoded JSON line in either shape; a MinilabError otherwise."""
    if not isinstance(obj, dict):
        raise MinilabError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if {"passage", "question", "answer"} <= obj.keys():
        if not isinstance(obj["answer"], bool):
            raise MinilabError(f"{where}: 'answer' must be true or false, got {obj['answer']!r}")
        if not isinstance(obj["passage"], str) or not isinstance(obj["question"], str):
            raise MinilabError(f"{where}: 'passage' and 'question' must be strings")
        question = obj["question"].strip()
        question = question if question.endswith("?") else question + "?"
        return f"{obj['passage']}\nQuestion: {question}\nAnswer:", [" no", " yes"], int(obj["answer"])
    if {"context", "choices", "label"} <= obj.keys():
        context, choices, label = obj["context"], obj["choices"], obj["label"]
        if not isinstance(context, str):
            raise MinilabError(f"{where}: 'context' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise MinilabError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise MinilabError(f"{where}: 'label' must be an integer index into choices (0..{len(choices) - 1}), "
                               f"got {label!r}")
        return context, choices, label
    raise MinilabError(f"{where}: expected keys passage/question/answer (BoolQ) or context/choices/label, "
                       f"got {', '.join(sorted(map(str, obj))) or 'none'}")


def load_items(path: str | Path) -> list[Item]:
    """Every item of a JSONL file (blank lines skipped); a malformed line is a one-line error
    naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise MinilabError(f"{path}: multiple-choice file not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise MinilabError(f"{where}: invalid JSON: {e.msg}") from None
            items.append(Item(*_parse_line(obj, where), line=lineno))
    if not items:
        raise MinilabError(f"{path}: no items")
    return items


def sample_items(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """`limit` items drawn at random with `seed` (file order kept), or all of them."""
    if limit is None or limit <= 0 or limit >= len(items):
        return items
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound at small n and near 0 or 1, unlike p ± z·se."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def _split_tokens(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval does: encode context + choice together and take
    what follows the context's own tokens, so the answer is tokenized as it would appear in text
    (a trailing space of the context moves to the answer)."""
    from minilab.generate import encode

    stripped = context.rstrip()
    choice = context[len(stripped):] + choice
    ctx = encode(tokenizer, stripped) if stripped else []
    whole = encode(tokenizer, stripped + choice)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else encode(tokenizer, choice)
    if not cont:
        raise MinilabError(f"answer {choice!r} encodes to no tokens")
    return ctx, cont


@torch.no_grad()
def score_item(model: torch.nn.Module, tokenizer: Any, item: Item,
               prefix_id: int | None = None) -> tuple[list[float], list[int]]:
    """(summed log-likelihood, token count) of each choice's tokens given the context, from one
    batched forward over the choices.

    `prefix_id` (the document separator) starts every sequence, so even an empty context gives the
    first answer token something to be predicted from. Sequences longer than max_seq_len lose
    context tokens from the left; the answer is always kept whole.
    """
    max_len = model.config.max_seq_len
    seqs, spans = [], []
    for choice in item.choices:
        ctx, cont = _split_tokens(tokenizer, item.context, choice)
        ctx = ([prefix_id] if prefix_id is not None else []) + ctx
        if not ctx:
            raise MinilabError(f"line {item.line}: empty context and no prefix token to predict the answer from")
        seq = (ctx + cont)[-max_len:]
        if len(seq) <= len(cont):
            raise MinilabError(f"line {item.line}: answer of {len(cont)} tokens does not fit max_seq_len {max_len}")
        seqs.append(seq)
        spans.append(len(cont))
    width = max(map(len, seqs))
    # Right padding: causal attention keeps padding from changing the real positions' logits.
    batch = torch.zeros(len(seqs), width, dtype=torch.long)                          # (C, T)
    for row, seq in enumerate(seqs):
        batch[row, :len(seq)] = torch.tensor(seq)
    p = next(model.parameters(), None)
    logits = model(batch.to(p.device if p is not None else "cpu")).float().cpu()     # (C, T, V)
    logprobs = F.log_softmax(logits, dim=-1)
    scores = []
    for row, (seq, n) in enumerate(zip(seqs, spans, strict=True)):
        pos = torch.arange(len(seq) - n, len(seq))                                    # answer positions
        scores.append(float(logprobs[row, pos - 1, torch.tensor(seq)[pos]].sum()))   # logits[t-1] predicts t
    return scores, spans


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first choice


def majority_baseline(items: list[Item]) -> dict[str, Any]:
    """Accuracy of always giving the most frequent answer (by text when all items share the same
    choices, as BoolQ's " no"/" yes", else by index)."""
    same = all(it.choices == items[0].choices for it in items)
    counts = Counter(it.label for it in items)
    label, count = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    answer = items[0].choices[label].strip() if same else f"choice #{label}"
    return {"answer": answer, "label": label, "accuracy": count / len(items)}


def evaluate_file(model: torch.nn.Module, tokenizer: Any, path: str | Path, *, limit: int | None = None,
                  seed: int = 1234, prefix_id: int | None = None) -> dict[str, Any]:
    """Accuracy (three normalisations, each with a 95% CI) and baselines for one JSONL file.

    The result's "items" holds each scored item (line, label, scores, predictions) for the report
    to write beside the summary.
    """
    all_items = load_items(path)
    items = sample_items(all_items, limit, seed)
    correct = dict.fromkeys(NORMS, 0)
    details = []
    for it in items:
        ll, n_tok = score_item(model, tokenizer, it, prefix_id)
        n_bytes = [max(1, len(c.encode("utf-8"))) for c in it.choices]
        normed = {"sum": ll,
                  "per_token": [s / n for s, n in zip(ll, n_tok, strict=True)],
                  "per_byte": [s / n for s, n in zip(ll, n_bytes, strict=True)]}
        preds = {k: _argmax(v) for k, v in normed.items()}
        for k in NORMS:
            correct[k] += preds[k] == it.label
        details.append({"line": it.line, "label": it.label, "loglik": ll, "pred": preds,
                        "answer_tokens": n_tok})
    n = len(items)
    accuracy = {k: {"accuracy": correct[k] / n, "correct": correct[k], "ci95": list(wilson_interval(correct[k], n))}
                for k in NORMS}
    return {
        "file": str(path), "items": details, "n_items": n, "n_in_file": len(all_items),
        "sampled": n < len(all_items), "seed": seed, "accuracy": accuracy,
        "baselines": {"chance": sum(1 / len(it.choices) for it in items) / n,
                      "majority": majority_baseline(items)},
        "note": "loglik = summed log-likelihood of the whole answer; per_token / per_byte divide it by "
                "the answer's token / UTF-8 byte count before taking the argmax",
    }
