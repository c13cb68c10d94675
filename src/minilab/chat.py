"""`minilab chat MODEL`: talk to a model in the terminal, with history and its chat template.

Each line read is a user turn; the reply streams as it is decoded. The whole conversation is
rendered with the model's chat template every turn (as a server would), and when it no longer
fits the context the oldest turns are dropped (a system prompt is kept). Commands: `/reset`
forgets the conversation, `/system TEXT` sets the system prompt, `/exit` (or end of input) quits.
Reading stdin makes it scriptable: `printf 'hi\\nmore\\n' | minilab chat my-model`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from minilab.errors import MinilabError
from minilab.inference import Engine, SamplingParams, add_model_flags, add_sampling_flags, engine_from_args
from minilab.inference import sampling_from_args as _sampling

log = logging.getLogger("minilab.chat")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(p, max_tokens=256)


def fit_history(engine: Engine, system: str | None, turns: list[dict[str, str]], reserve: int) -> list[int]:
    """Prompt ids of the conversation, dropping the oldest user/assistant pairs until `reserve`
    new tokens fit; the latest user turn is never dropped."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        ids = engine.chat_prompt(messages)
        if len(ids) + reserve <= engine.context_length or len(turns) <= 1:
            break
        del turns[:2]
    if len(ids) >= engine.context_length:
        raise MinilabError(f"the message alone has {len(ids)} tokens, more than the context "
                           f"({engine.context_length}); shorten it")
    return ids


def reply(engine: Engine, ids: list[int], params: SamplingParams, out: Any) -> str:
    """Stream one reply to `out`; returns its text."""
    parts = []
    for d in engine.stream(ids, params, chat=True):
        parts.append(d.text)
        out.write(d.text)
        out.flush()
    out.write("\n")
    return "".join(parts)


def run_chat(engine: Engine, params: SamplingParams, system: str | None, lines: Any, out: Any,
             interactive: bool) -> list[dict[str, str]]:
    """The conversation loop over `lines`; returns the turns it kept."""
    turns: list[dict[str, str]] = []
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            turns.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        turns.append({"role": "user", "content": text})
        ids = fit_history(engine, system, turns, reserve=min(params.max_tokens, 32))
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        turns.append({"role": "assistant", "content": reply(engine, ids, params, out)})
    return turns


def main(args: argparse.Namespace) -> int:
    params = _sampling(args)
    engine = engine_from_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {engine.name}; /reset, /system TEXT, /exit", file=sys.stderr)
    run_chat(engine, params, args.system, sys.stdin, sys.stdout, interactive)
    return 0
