"""Which sampling defaults serve a small chat model: answers at several settings, measured.

    python benchmarks/chat_defaults.py MODEL [--prompts 40] [--max-tokens 64] [--seeds 3] [--corpus DIR]

Each prompt is the first user message of a built-in demo conversation (every k-th one, so the
topics vary). For each setting (temperature, top_p, repetition_penalty) every prompt is answered
with `--seeds` seeds (greedy once), at most `--max-tokens` tokens, and scored:

- end-of-turn rate: answers that ended by themselves (finish "stop"), not at the token limit;
- distinct-4: distinct token 4-grams / all 4-grams within an answer, averaged (1.0 = no
  repeated phrase; loops score low);
- known words: the share of an answer's words (lowercased letters and apostrophes) that occur
  in the training text (the demo conversations, and `--corpus` shards when given): made-up
  words such as "rrokle" or "Blibation" are what a reader calls gibberish;
- mean tokens per answer.

One JSON line per setting on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from minilab.finetune.demo_data import demo_conversations
from minilab.inference import Engine, SamplingParams

SETTINGS = [  # (name, temperature, top_p, repetition_penalty)
    ("greedy (old `minilab chat`)", 0.0, None, 1.0),
    ("greedy, rep 1.1", 0.0, None, 1.1),
    ("T0.7 (old page)", 0.7, None, 1.0),
    ("T1.0 (OpenAI API default)", 1.0, None, 1.0),
    ("T0.7 top-p 0.9", 0.7, 0.9, 1.0),
    ("T0.7 top-p 0.9 rep 1.1", 0.7, 0.9, 1.1),
    ("T0.5 top-p 0.9 rep 1.1", 0.5, 0.9, 1.1),
    ("T0.7 top-p 0.9 rep 1.2", 0.7, 0.9, 1.2),
    ("T0.5 top-p 0.9", 0.5, 0.9, 1.0),
    ("T0.3 top-p 0.9", 0.3, 0.9, 1.0),
    ("T0.3 top-p 0.9 rep 1.1", 0.3, 0.9, 1.1),
]
WORD = re.compile(r"[a-z']+")


def known_words(corpus: str | None) -> set[str]:
    words: set[str] = set()
    for conv in demo_conversations():
        for m in conv["messages"]:
            words.update(WORD.findall(m["content"].lower()))
    if corpus:
        for shard in sorted(Path(corpus).glob("shard-*.jsonl")):
            for line in shard.open(encoding="utf-8"):
                words.update(WORD.findall(json.loads(line)["text"].lower()))
    return words


def distinct4(ids: list[int]) -> float | None:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / len(grams) if grams else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--corpus", default=None, help="a corpus directory (shard-*.jsonl) of the pretraining text")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = Engine.load(args.model)
    convs = demo_conversations()
    step = max(1, len(convs) // args.prompts)
    prompts = [c["messages"][0]["content"] for c in convs[::step]][: args.prompts]
    vocab = known_words(args.corpus)
    for name, temp, top_p, rep in SETTINGS:
        stops, d4, known, lengths = [], [], [], []
        for prompt in prompts:
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
            for seed in range(1 if temp == 0 else args.seeds):
                params = SamplingParams(max_tokens=args.max_tokens, temperature=temp, top_p=top_p,
                                        repetition_penalty=rep, seed=seed)
                answer, n, finish = [], 0, "stop"
                for d in engine.stream(ids, params, chat=True):
                    answer.append(d.text)
                    n, finish = d.completion_tokens, d.finish_reason or finish
                text = "".join(answer)
                stops.append(finish == "stop")
                lengths.append(n)
                if (v := distinct4(engine.encode(text))) is not None:
                    d4.append(v)
                words = WORD.findall(text.lower())
                if words:
                    known.append(sum(w in vocab for w in words) / len(words))
        print(json.dumps({"setting": name, "temperature": temp, "top_p": top_p, "repetition_penalty": rep,
                          "answers": len(stops), "end_of_turn_rate": round(sum(stops) / len(stops), 3),
                          "distinct4": round(statistics.mean(d4), 3) if d4 else None,
                          "known_words": round(statistics.mean(known), 3) if known else None,
                          "mean_tokens": round(statistics.mean(lengths), 1)}), flush=True)


if __name__ == "__main__":
    main()
