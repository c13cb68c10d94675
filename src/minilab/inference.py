"""One loaded model ready to answer: weights, tokenizer, chat format, stop tokens; and `minilab generate`.

    engine = Engine.load("llama-2M-tiny-sft-v1", adapter_dir=None, quantize="int8")
    for delta in engine.stream(engine.chat_prompt(messages), SamplingParams(max_tokens=64)):
        print(delta.text, end="")

`generate`, `chat` and `serve` all go through an `Engine`, so a prompt gets the same tokens and the
same text whichever verb asks. The chat format comes from the tokenizer's own `chat_template`
(rendered with Jinja2's sandbox, as transformers does, without importing transformers, which takes
seconds); its end-of-turn token is `chat_end_token` from minilab_tokenizer.json, else one the
template visibly writes. A model without a template or an end-of-turn token still works: the
`warnings` name the fallback so a server can say it at startup.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minilab.decode_layout import use_decode_layout
from minilab.decode_threads import set_threads
from minilab.errors import MinilabError
from minilab.fsutil import read_json_if_present
from minilab.generate import TextStream, encode, stream_generate
from minilab.loading import load_model_for_inference
from minilab.model import Transformer
from minilab.registry import resolve_model_dir
from minilab.sampling import GENERATE_SAMPLING, MAX_SEED
from minilab.tokenization import (
    chat_template_source,
    compile_chat_template,
    end_of_turn_id,
    render_chat,
    token_text,
    tokenizer_stop_ids,
)

log = logging.getLogger("minilab.inference")

# Used when a tokenizer has no chat template: a plain transcript any base model can continue.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
FALLBACK_STOP = ["\nUser:", "\nSystem:"]  # the transcript's next turn marks the end of a reply


@dataclass
class SamplingParams:
    """How to decode one request (OpenAI's names where OpenAI has one)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Delta:
    """A piece of a reply: new text, tokens generated so far, and the finish reason on the last one."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"


class ChatFormat:
    """Messages -> prompt text with the tokenizer's chat template (or the fallback)."""

    def __init__(self, template: str | None, special: dict[str, str]):
        self.is_fallback = not template
        self.source = template or FALLBACK_TEMPLATE
        compile_chat_template(self.source)  # a template that does not compile fails at load, not per request
        self.special = special

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.source, messages, add_generation_prompt=add_generation_prompt, **self.special)


def model_tokenizer(model_dir: Path, _depth: int = 0):
    """(`tokenizers.Tokenizer`, its directory) stored with a model; an adapter-only directory
    (a registered LoRA result) uses its base model's tokenizer."""
    from minilab.tokenization import load_tokenizer

    for d in (model_dir, model_dir / "tokenizer", model_dir / "adapters"):
        if (d / "tokenizer.json").is_file():
            return load_tokenizer(d), d
    base = (read_json_if_present(model_dir / "adapter_config.json").get("base_model_name_or_path")
            or read_json_if_present(model_dir / "adapters" / "adapter_config.json").get("base_model_name_or_path")
            or read_json_if_present(model_dir / "manifest.json").get("parent"))
    if base and _depth < 4:
        return model_tokenizer(resolve_model_dir(base), _depth + 1)
    raise MinilabError(f"{model_dir}: no tokenizer.json (export the model with its tokenizer directory)")


class Reply:
    """Tokens of one answer -> text deltas: stop strings (the request's, and the chat format's),
    the completion token count, and the finish reason. `Engine.stream` and the server's batch
    loop feed it one token at a time."""

    def __init__(self, engine: Engine, n_prompt: int, params: SamplingParams, chat: bool):
        self.text = TextStream(engine.tokenizer, list(params.stop) + (engine.chat_stop if chat else []))
        self.budget = min(params.max_tokens, engine.context_length - n_prompt)
        self.n = 0
        self.tail = ""  # text released by the token that completed a stop string: sent with the end

    @property
    def stopped(self) -> bool:
        """A stop string matched: the answer is over (its text cut before the match)."""
        return self.text.stopped

    def push(self, token_id: int) -> Delta | None:
        """Add a decoded token; the delta to send now, if any."""
        self.n += 1
        piece = self.text.push(token_id)
        if self.text.stopped:
            self.tail = piece
            return None
        return Delta(piece, self.n) if piece else None

    def end(self) -> Delta:
        """The last delta: the held-back text and the finish reason."""
        reason = "length" if self.n >= self.budget and not self.text.stopped else "stop"
        return Delta(self.tail + self.text.finish(), self.n, reason)


class Engine:
    """A model, its tokenizer and chat format; `stream` turns a prompt into text deltas."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, tokenizer_dir: Path | None = None):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.context_length = int(model.config.max_seq_len)
        self.warnings: list[str] = []
        tok_cfg = read_json_if_present(tokenizer_dir / "tokenizer_config.json") if tokenizer_dir else {}
        meta = read_json_if_present(tokenizer_dir / "minilab_tokenizer.json") if tokenizer_dir else {}
        special = {k: token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token")}
        self.chat = ChatFormat(chat_template_source(tok_cfg, tokenizer_dir), special)
        self.stop_ids = tokenizer_stop_ids(tokenizer)
        self.chat_stop: list[str] = []
        self.end_of_turn = end_of_turn_id(tokenizer, meta.get("chat_end_token"),
                                          None if self.chat.is_fallback else self.chat.source)
        if self.chat.is_fallback:
            self.chat_stop = list(FALLBACK_STOP)
            self.warnings.append("the tokenizer has no chat_template: chat uses the fallback plain transcript "
                                 "format 'User: ...\\nAssistant:' and stops replies at '\\nUser:'")
        elif self.end_of_turn is None:
            self.warnings.append("the chat template has no end-of-turn token in the vocabulary: replies stop only "
                                 f"at eos ({special['eos_token'] or 'none known'}) or max_tokens (fallback)")
        if self.end_of_turn is not None and self.end_of_turn not in self.stop_ids:
            self.stop_ids.append(self.end_of_turn)

    @classmethod
    def load(cls, path_or_name: str, *, adapter_dir: str | None = None, quantize: str | None = None,
             dtype: str | None = None, device: str | None = None) -> Engine:
        """Load a registry name or model directory (+ adapters, merged), optionally quantized."""
        model_dir = resolve_model_dir(path_or_name)
        model = load_model_for_inference(path_or_name, adapter_dir=adapter_dir, dtype=dtype, device=device)
        if quantize:
            from minilab.quantization import quantize_model

            model = quantize_model(model, quantize)
        if isinstance(model, Transformer):
            use_decode_layout(model)  # weights stored (in, out): faster decoding steps on CPU
        tokenizer, tok_dir = model_tokenizer(model_dir)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise MinilabError(f"{model_dir}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                               f"{model.config.vocab_size}: not this model's tokenizer")
        name = path_or_name if not Path(path_or_name).exists() else Path(path_or_name).resolve().name
        return cls(model, tokenizer, name, tok_dir)

    # ---- prompts ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the assistant's turn opened."""
        return self.encode(self.chat.render(messages, add_generation_prompt=True))

    def memory_bytes(self) -> int:
        """Bytes held by the weights (quantized packed weights included)."""
        from minilab.quantization import model_bytes

        return model_bytes(self.model)

    # ---- decoding ---------------------------------------------------------------------------
    def reply(self, prompt_ids: Sequence[int], params: SamplingParams, *, chat: bool = False) -> Reply:
        """The text side of one answer (stop strings, deltas, finish reason), fed token by token."""
        return Reply(self, len(prompt_ids), params, chat)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, *, chat: bool = False,
               cancelled: Callable[[], bool] | None = None) -> Iterator[Delta]:
        """Text deltas of the reply to `prompt_ids`; the last one carries the finish reason.
        `cancelled()` is asked before each token: True ends the stream quietly (no last delta)."""
        reply = self.reply(prompt_ids, params, chat=chat)
        tokens = stream_generate(self.model, list(prompt_ids), max_new_tokens=params.max_tokens,
                                 temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                 repetition_penalty=params.repetition_penalty, stop_token_ids=self.stop_ids,
                                 seed=params.seed)
        try:
            for tok in tokens:
                if cancelled is not None and cancelled():
                    return
                delta = reply.push(tok)
                if reply.stopped:
                    break
                if delta is not None:
                    yield delta
        finally:
            tokens.close()  # stops the decoder at once, whoever ends the stream
        yield reply.end()

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 chat: bool = False) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of a whole reply."""
        parts, n, reason = [], 0, "stop"
        for d in self.stream(prompt_ids, params, chat=chat):
            parts.append(d.text)
            n, reason = d.completion_tokens, d.finish_reason or reason
        return "".join(parts), n, reason


# ---- CLI: shared flags and the `generate` verb ----------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    """MODEL, --adapter and the quantization flags (generate, chat, serve)."""
    from minilab.cliargs import flag

    p.add_argument("model", metavar="MODEL", help="registry name or model directory")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory, merged into the weights at load")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--int8", dest="quantize", action="store_const", const="int8",
                   help="int8 dynamic quantization of the linear layers (CPU, torch)")
    flag(q, "--load-in-8bit", dest="quantize", action="store_const", const="bnb8",
         help="8-bit linear layers through bitsandbytes (must be installed)")
    flag(q, "--load-in-4bit", dest="quantize", action="store_const", const="nf4",
         help="4-bit NF4 linear layers through bitsandbytes (must be installed)")
    p.add_argument("--dtype", default=None, help="weights dtype: float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="most CPU threads a decoding step uses (default: torch's, the cores; a step with "
                        "little work, e.g. one row of a small model, runs on fewer)")


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int | None = 128, temperature: float = 0.0,
                       top_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """The sampling flags; `max_tokens=None` means the verb picks a budget from the context."""
    from minilab.cliargs import flag, int_range

    g = p.add_argument_group("sampling")
    flag(g, "--max-tokens", type=int, default=max_tokens,
         help="most new tokens per reply" + ("" if max_tokens else
                                             " (default: half the context, at most 256; capped to what fits)"))
    g.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    flag(g, "--top-k", type=int, default=None, help="sample from the k most likely tokens")
    flag(g, "--top-p", type=float, default=top_p, help="nucleus sampling mass (1 keeps every token)")
    flag(g, "--repetition-penalty", type=float, default=repetition_penalty,
         help="CTRL penalty on seen tokens (>1 discourages)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string, \\n \\t \\r \\\\ as escapes; repeatable")
    g.add_argument("--seed", type=int_range(0, MAX_SEED), default=None,
                   help="makes sampling reproducible (0 .. 2**64-1)")


_STOP_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_stop(s: str) -> str:
    """A --stop string as typed: `\\n`, `\\t`, `\\r` and `\\\\` are the characters they name (so --stop '\\n'
    means a newline); every other character, a lone backslash or non-ASCII text included, is kept as is."""
    return re.sub(r"\\([ntr\\])", lambda m: _STOP_ESCAPES[m.group(1)], s)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The flags as `SamplingParams`; `max_tokens` stays None (0 in the params) when the verb picks it."""
    if args.max_tokens is not None and args.max_tokens < 1:
        raise MinilabError(f"--max-tokens must be ≥ 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise MinilabError(f"--temperature must be ≥ 0, got {args.temperature}")
    stop = [unescape_stop(s) for s in args.stop]
    return SamplingParams(max_tokens=args.max_tokens or 0, temperature=args.temperature, top_k=args.top_k,
                          top_p=None if args.top_p == 1.0 else args.top_p,
                          repetition_penalty=args.repetition_penalty, stop=stop, seed=args.seed)


def engine_from_args(args: argparse.Namespace) -> Engine:
    t0 = time.perf_counter()
    engine = Engine.load(args.model, adapter_dir=args.adapter, quantize=args.quantize, dtype=args.dtype,
                         device=args.device)
    set_threads(getattr(args, "threads", None))
    for w in engine.warnings:
        log.warning("warning: %s", w)
    from minilab.fsutil import human_bytes

    log.info("loaded %s in %.1fs: weights %s%s", engine.name, time.perf_counter() - t0,
             human_bytes(engine.memory_bytes()), f" ({args.quantize})" if args.quantize else "")
    return engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag

    add_model_flags(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for several prompts")
    flag(p, "--prompts-file", metavar="FILE", help="one prompt per line ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_flags(p, **GENERATE_SAMPLING)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        src = sys.stdin if args.prompts_file == "-" else open(args.prompts_file, encoding="utf-8")  # noqa: SIM115
        with src:
            prompts += [line.rstrip("\n").replace("\\n", "\n") for line in src if line.strip()]
    if not prompts:
        raise MinilabError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def main(args: argparse.Namespace) -> int:
    prompts = _prompts(args)
    params = sampling_from_args(args)
    engine = engine_from_args(args)
    for text in prompts:
        ids = engine.chat_prompt([{"role": "user", "content": text}]) if args.chat else engine.encode(text)
        if not ids:
            raise MinilabError("the prompt encodes to no tokens")
        if len(ids) >= engine.context_length:
            raise MinilabError(f"prompt of {len(ids)} tokens does not fit the context ({engine.context_length})")
        t0, parts, last = time.perf_counter(), [], Delta("", 0)
        for d in engine.stream(ids, params, chat=args.chat):
            parts.append(d.text)
            last = d
            if not args.json:
                print(d.text, end="", flush=True)
        secs = time.perf_counter() - t0
        if args.json:
            print(json.dumps({"prompt": text, "text": "".join(parts), "prompt_tokens": len(ids),
                              "completion_tokens": last.completion_tokens, "finish_reason": last.finish_reason,
                              "seconds": round(secs, 4)}))
        else:
            print()
            log.info("[%d tokens, %.1f tokens/s, finish: %s]", last.completion_tokens,
                     last.completion_tokens / max(secs, 1e-9), last.finish_reason)
    return 0
