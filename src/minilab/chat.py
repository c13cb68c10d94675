"""`minilab chat MODEL`: talk to a model in the terminal, with history and its chat template.

Each line read is a user turn; the reply streams as it is decoded. The whole conversation is
rendered with the model's chat template every turn (as a server would), and when it no longer
fits the context the oldest turns are dropped and the reply capped (a system prompt is kept;
`minilab.conversation` is the rule, the same as the server's `truncation: "auto"`), with a
one-line notice on stderr. Commands: `/reset`
forgets the conversation, `/system TEXT` sets the system prompt, `/exit` (or end of input) quits.
Reading stdin makes it scriptable: `printf 'hi\\nmore\\n' | minilab chat my-model`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import Any

from minilab.conversation import ContextFull, Fit, default_reply_tokens, fit_conversation
from minilab.errors import MinilabError
from minilab.inference import Engine, SamplingParams, add_model_flags, add_sampling_flags, engine_from_args
from minilab.inference import sampling_from_args as _sampling
from minilab.sampling import CHAT_SAMPLING

log = logging.getLogger("minilab.chat")



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(p, max_tokens=None, **CHAT_SAMPLING)


def fit_history(engine: Engine, system: str | None, turns: list[dict[str, str]], requested: int) -> Fit:
    """The prompt of the conversation that fits (`minilab.conversation.fit_conversation`); the
    dropped turns are removed from `turns`, and a one-line notice goes to stderr."""
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    try:
        fit = fit_conversation(engine, messages, requested)
    except ContextFull as e:
        turns.pop()  # the message that cannot be answered is not kept
        raise MinilabError(f"the message alone has {e.n_prompt} tokens with the system prompt, more than the "
                           f"context ({e.context}); shorten it") from None
    del turns[:fit.dropped_messages]
    if fit.notice:
        print(f"({fit.notice})", file=sys.stderr)
    return fit


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
        requested = params.max_tokens or default_reply_tokens(engine.context_length)
        try:
            fit = fit_history(engine, system, turns, requested)
        except MinilabError as e:  # one message too long: say so, the conversation goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        answer = reply(engine, fit.ids, replace(params, max_tokens=fit.max_tokens), out)
        turns.append({"role": "assistant", "content": answer})
    return turns


def main(args: argparse.Namespace) -> int:
    params = _sampling(args)
    engine = engine_from_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {engine.name}; /reset, /system TEXT, /exit", file=sys.stderr)
    run_chat(engine, params, args.system, sys.stdin, sys.stdout, interactive)
    return 0
