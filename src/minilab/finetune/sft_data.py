"""`minilab sft-data`: conversations -> templated, tokenized rows with loss masks and a manifest.

    minilab sft-data --source data/chats.jsonl --tokenizer-dir tokenizers/tiny \\
        --output-dir data/sft/chats [--template chatml|instruct|chat|alpaca|model] [--max-len 512]

Accepted record shapes (JSONL, JSON list, or a Hugging Face dataset id through `datasets`):
Alpaca `{instruction, input, output}`; OpenAI `{messages: [{role, content}]}`; ShareGPT
`{conversations: [{from, value}]}`; OASST1 message trees, flat (`message_id`, `parent_id`,
`role`, `text`, `rank`) or nested (`{prompt: {text, role, replies: [...]}}`), from which the
top-ranked path is kept (`finetune/records.py` reads them, for dpo-data too). `--source demo`
uses the built-in chatterbot conversations.

Labels are -100 everywhere except assistant tokens and their end-of-turn token. Examples longer
than `max_len` are truncated (kept while a trained token remains) or dropped, and counted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from minilab.config import SEED
from minilab.data.datacard import code_fence
from minilab.errors import ConfigError, MinilabError
from minilab.finetune.records import iter_records, oasst_paths, to_messages
from minilab.fsutil import atomic_dir, write_json_atomic, write_text_atomic
from minilab.stage import Stage

log = logging.getLogger("minilab.sft_data")

@dataclass
class SFTDataConfig:
    """How to turn conversations into fine-tuning rows."""

    sources: list[str] = field(default_factory=list, metadata={
        "help": "JSONL/JSON files, Hugging Face dataset ids, or 'demo' (built-in conversations)"})
    tokenizer_dir: str = field(default="", metadata={
        "help": "the model's tokenizer: its folder, a registry name, or a hub id in the HF cache"})
    output_dir: str = field(default="", metadata={"help": "where to write the rows and manifest.json"})
    template: str = field(default="chatml", metadata={"help": "chatml, instruct, chat, alpaca, or model"})
    max_len: int = field(default=512, metadata={"help": "tokens per example (or per packed row)"})
    overflow: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "over-long examples: truncate (keep the start) or drop"})
    pack: bool = field(default=False, metadata={"help": "pack several short examples into one row"})
    val_fraction: float = field(default=0.05, metadata={"help": "fraction of examples held out"})
    split: str = field(default="train", metadata={"help": "dataset split for Hugging Face dataset ids"})
    limit: int | None = field(default=None, metadata={"help": "use at most this many examples per source"})
    seed: int = field(default=1234, metadata={"help": "seed of the shuffle that picks the held-out examples",
                                                      **SEED})
    force: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def validate(self) -> None:
        for key in ("sources", "tokenizer_dir", "output_dir"):
            if not getattr(self, key):
                raise ConfigError("required", key=key)
        if self.max_len < 8:
            raise ConfigError("must be at least 8", key="max_len")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("must be within [0, 1)", key="val_fraction")


# ---- reading conversations --------------------------------------------------------------------
def conversations(source: str, split: str, limit: int | None, bad: Counter) -> Iterator[list[dict[str, str]]]:
    """Conversations of one source as messages; malformed records are counted in `bad`."""
    if source == "demo":
        from minilab.finetune.demo_data import demo_conversations

        records: Iterator[dict[str, Any]] = iter(demo_conversations())
    else:
        records = iter_records(source, split)
    first = next(records, None)
    if first is None:
        return
    if "message_id" in first and "parent_id" in first:  # flat OASST: needs the whole tree first
        convs: Iterator[list[dict[str, str]]] = oasst_paths([first, *records])
    else:
        convs = _converted(itertools.chain([first], records), bad)
    for n, conv in enumerate(convs):
        if limit is not None and n >= limit:
            return
        yield conv


def _converted(records: Iterator[Any], bad: Counter) -> Iterator[list[dict[str, str]]]:
    for rec in records:
        yield from _one(rec, bad)


def _one(rec: Any, bad: Counter):
    try:
        if not isinstance(rec, dict):
            raise MinilabError("not an object")
        yield to_messages(rec)
    except MinilabError as e:
        bad[str(e).split(" (")[0][:60]] += 1


# ---- building rows ----------------------------------------------------------------------------
def fit_length(ids: list[int], mask: list[bool], max_len: int, overflow: str) -> tuple[list, list] | None:
    """The example within `max_len` tokens, or None when it must be dropped."""
    if len(ids) > max_len:
        if overflow == "drop":
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    # A row needs a trained token after position 0 (position 0 is never a target).
    return (ids, mask) if any(mask[1:]) else None


def pack_rows(rows: list[tuple[list[int], list[bool]]], max_len: int) -> list[tuple[list[int], list[bool]]]:
    """Greedy packing of consecutive examples into rows of at most `max_len` tokens. Attention
    spans the examples in a row (the model takes no block mask): cheap, and at worst a little
    noise from the previous example's context."""
    out: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    mask: list[bool] = []
    for a, m in rows:
        if ids and len(ids) + len(a) > max_len:
            out.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + a, mask + m
    if ids:
        out.append((ids, mask))
    return out


def run(cfg: SFTDataConfig) -> dict[str, Any]:
    """Write the SFT dataset described by `cfg`; returns its manifest."""
    from minilab.finetune.records import manifest_head, prepare, source_info, split_held_out
    from minilab.finetune.rows import write_rows
    from minilab.finetune.templates import encode_conversation

    out, cfg, template, tok = prepare(cfg, "sft_data")
    counts: Counter = Counter()
    bad: Counter = Counter()
    examples: list[tuple[list[int], list[bool]]] = []
    samples: list[str] = []
    for source in cfg.sources:
        for messages in conversations(source, cfg.split, cfg.limit, bad):
            counts["read"] += 1
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                counts["dropped_no_assistant"] += 1
                continue
            ids, mask = encode_conversation(tok, template, messages)
            fitted = fit_length(ids, mask, cfg.max_len, cfg.overflow)
            if fitted is None:
                # too long under "drop"; under "truncate", nothing trained was left in the window
                drop_long = cfg.overflow == "drop" and len(ids) > cfg.max_len
                counts["dropped_too_long" if drop_long else "dropped_no_target"] += 1
                continue
            counts["truncated"] += len(ids) > cfg.max_len
            examples.append(fitted)
            if len(samples) < 3:
                samples.append(template.render(messages))
    counts["invalid"] = sum(bad.values())
    if not examples:
        raise MinilabError(f"no usable examples in {', '.join(cfg.sources)} ({dict(counts)})")
    splits = split_held_out(examples, cfg.val_fraction, cfg.seed)
    if cfg.pack:
        splits = {k: pack_rows(v, cfg.max_len) for k, v in splits.items()}
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        stats = {k: write_rows(tmp, k, v, tok.get_vocab_size()) for k, v in splits.items()}
        manifest = {**manifest_head("sft_data", cfg.tokenizer_dir, template),
                    "counts": {"examples_kept": len(examples), **counts}, "invalid_reasons": dict(bad),
                    "max_len": cfg.max_len, "overflow": cfg.overflow, "pack": cfg.pack, "seed": cfg.seed,
                    "sources": [source_info(s) for s in cfg.sources], "splits": stats}
        write_json_atomic(tmp / "manifest.json", manifest)
        write_text_atomic(tmp / "DATACARD.md", _card(manifest, samples))
    log.info("sft data %s: %d train rows, %d val rows (%s)", out, stats["train"]["rows"], stats["val"]["rows"],
             dict(counts))
    return manifest


def _card(m: dict[str, Any], samples: list[str]) -> str:
    lines = ["# SFT data", "", f"- template: `{m['template']['name']}` (end of turn `{m['template']['end_token']}`)",
             f"- tokenizer sha256: `{m['tokenizer_sha256']}`", f"- counts: {json.dumps(m['counts'])}",
             f"- splits: {json.dumps(m['splits'])}", "", "## Sources", ""]
    lines += [f"- {json.dumps(s)}" for s in m["sources"]]
    lines += ["", "## Examples as trained (templated)", ""]
    lines += [line for s in samples for line in (code_fence(s), "")]
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import add_config_flags
    from minilab.finetune.records import add_data_flags

    add_data_flags(p, sources="conversation sources",
                   tokenizer="the model's tokenizer (a model directory works too)",
                   template="chatml (default), instruct, chat, alpaca, model",
                   max_len="tokens per example (default 512)", limit="at most N examples per source")
    p.add_argument("--overflow", choices=["truncate", "drop"], help="over-long examples (default truncate)")
    p.add_argument("--pack", action="store_true", help="pack short examples together")
    add_config_flags(p, "Keys: those of SFTDataConfig.")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    cfg = config_from_args(SFTDataConfig, args, (
        "sources", "tokenizer_dir", "output_dir", "template", "max_len", "overflow", "pack", "limit", "force"))
    m = run(cfg)
    print(f"sft data written to {cfg.output_dir}: {m['splits']['train']['rows']} train rows, "
          f"{m['splits']['val']['rows']} val rows; counts {json.dumps(m['counts'])}")
    return 0


STAGE = Stage("sft-data", SFTDataConfig, run=run, output_facts=("max_len",),
              metric=lambda r, cfg: f"{r['splits']['train']['rows']:,} train / {r['splits']['val']['rows']:,} val rows")
