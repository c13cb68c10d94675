"""Which sampling defaults serve a small chat model: answers at several settings, measured.

    python benchmarks/chat_defaults.py MODEL [--prompts 40] [--max-tokens 64] [--seeds 3] [--corpus DIR]

Each prompt is the first user message of a built-in demo conversation (every k-th one, so the
topics vary), or a line of `--prompts-file` (recipes/demo-chat-heldout.txt: 40 questions that are
in none of the demo conversations). For each setting (temperature, top_p, repetition_penalty) every prompt is answered
with `--seeds` seeds (greedy once), at most `--max-tokens` tokens, and scored:

- end-of-turn rate: answers that ended by themselves (finish "stop"), not at the token limit;
- distinct-4: distinct token 4-grams / all 4-grams within an answer, averaged (1.0 = no
  repeated phrase; loops score low);
- known words: the share of an answer's words (lowercased letters and apostrophes) that occur
  in the training text (the demo conversations, and `--corpus` shards when given): made-up
  words such as "rrokle" or "Blibation" are what a reader calls gibberish;
- mean tokens per answer.

One JSON line per setting on stdout.

`--conversation` instead sends ten questions in a row, each with the whole conversation so far,
to `minilab serve`'s app (in process) as the chat page before issue 15 sent them (temperature
0.7, max_tokens 128) and as it sends them now (the new defaults, `truncation: "auto"`, keeping
only what the server kept): answered, errors, notices, replies that ended by themselves.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from minilab.evaluate.stage import distinct_ngrams
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
    ("T0.2 top-p 0.9", 0.2, 0.9, 1.0),
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


QUESTIONS = ["Hello, how are you?", "What is your name?", "Do you like books?", "Tell me a joke.", "What is AI?",
             "Who are you?", "What do you eat?", "Do you have feelings?", "What is your favorite color?", "Goodbye!"]
PAGES = {"old page": {"temperature": 0.7, "max_tokens": 128},
         "new page": {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.0, "max_tokens": 128,
                      "truncation": "auto"}}


def conversation(engine: Engine) -> None:
    from fastapi.testclient import TestClient

    from minilab.serve.app import create_app

    for label, fields in PAGES.items():
        history, errors, notices, ended = [], [], [], 0
        with TestClient(create_app(engine), base_url="http://localhost") as client:
            for i, question in enumerate(QUESTIONS):
                history.append({"role": "user", "content": question})
                r = client.post("/v1/chat/completions",
                                json={"model": engine.name, "messages": history, "seed": i, **fields})
                if r.status_code != 200:
                    errors.append(r.json()["error"]["message"])
                    history.pop()  # what the page does with a failed turn
                    continue
                body = r.json()
                trunc = body.get("minilab", {}).get("truncation") or {"dropped_messages": 0, "notice": None}
                history = history[trunc["dropped_messages"]:]
                notices += [trunc["notice"]] if trunc["notice"] else []
                ended += body["choices"][0]["finish_reason"] == "stop"
                history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        print(json.dumps({"requests": label, "answered": len(QUESTIONS) - len(errors), "errors": len(errors),
                          "first_error": errors[0] if errors else None, "notices": notices, "ended": ended}),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--prompts-file", default=None,
                    help="prompts the model was not trained on, one per line (e.g. recipes/demo-chat-heldout.txt); "
                         "default: first user turns of the built-in demo conversations")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--conversation", action="store_true", help="the ten-turn conversation, old vs new page")
    ap.add_argument("--only", nargs="*", default=None, help="run only the settings whose names start so")
    ap.add_argument("--corpus", default=None, help="a corpus directory (shard-*.jsonl) of the pretraining text")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = Engine.load(args.model)
    if args.conversation:
        return conversation(engine)
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    else:
        convs = demo_conversations()
        step = max(1, len(convs) // args.prompts)
        prompts = [c["messages"][0]["content"] for c in convs[::step]][: args.prompts]
    vocab = known_words(args.corpus)
    for name, temp, top_p, rep in SETTINGS:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
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
                if (v := distinct_ngrams(engine.encode(text))) is not None:
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
