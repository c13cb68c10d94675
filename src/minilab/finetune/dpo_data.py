"""`minilab dpo-data`: preference triplets -> templated (chosen, rejected) rows and a manifest.

    minilab dpo-data --source pairs.jsonl --tokenizer-dir models/llama-2.3M-demo-lora-v1 \\
        --output-dir data/dpo/pairs [--template model] [--max-len 256]

Shapes: `{prompt, chosen, rejected}` (prompt a string or a message list; chosen/rejected strings
or assistant message lists), Orca-DPO-pairs `{system, question, chosen, rejected}`, and HH-RLHF
`{chosen, rejected}` where both hold the whole "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogue.
Each pair is templated like SFT (the prompt as a conversation, the answer as the assistant turn
with its end-of-turn token trained); empty fields, chosen == rejected and pairs longer than
`max_len` are counted and dropped. `--source demo` builds pairs from the built-in conversations
(constructed pairs, labelled so in the data card).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from minilab.config import SEED
from minilab.data.datacard import code_fence
from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import atomic_dir, write_json_atomic, write_text_atomic
from minilab.stage import Stage

log = logging.getLogger("minilab.dpo_data")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class DPODataConfig:
    sources: list[str] = field(default_factory=list, metadata={"help": "JSONL/JSON files, dataset ids, or 'demo'"})
    tokenizer_dir: str = field(default="", metadata={
        "help": "the policy model's tokenizer: its folder, a registry name, or a hub id in the HF cache"})
    output_dir: str = field(default="", metadata={"help": "where to write the pairs"})
    template: str = field(default="model", metadata={
        "help": "model (the tokenizer's own template, e.g. the SFT model's), chatml, instruct, chat, alpaca"})
    max_len: int = field(default=256, metadata={"help": "tokens of prompt + answer; longer pairs are dropped"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "fraction of the pairs held out for validation (rounded; none when there is only one pair)",
        "min": 0, "lt": 1})
    split: str = field(default="train", metadata={"help": "dataset split for Hugging Face dataset ids"})
    limit: int | None = field(default=None, metadata={
        "help": "read at most this many records per source (counted before any is dropped); default all"})
    seed: int = field(default=1234, metadata={
        "help": "seed of the shuffle that picks the held-out pairs, and of the built-in 'demo' pairs", **SEED})
    force: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def validate(self) -> None:
        for key in ("sources", "tokenizer_dir", "output_dir"):
            if not getattr(self, key):
                raise ConfigError("required", key=key)


def _hh_messages(text: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split("\n\n" + text.lstrip()) if not text.startswith("\n\n") else _HH_TURN.split(text)
    msgs = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)]
    if not msgs:
        raise MinilabError("HH-RLHF text without Human/Assistant turns")
    return msgs


def to_triplet(rec: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of one record in any supported shape."""
    from minilab.finetune.records import to_messages

    def answer(v: Any) -> str:
        if isinstance(v, list):  # [{"role": "assistant", "content": ...}]
            return str(v[-1].get("content", "")) if v else ""
        return "" if v is None else str(v)

    if "prompt" in rec and "chosen" in rec:
        p = rec["prompt"]
        prompt = to_messages({"messages": p}) if isinstance(p, list) else [{"role": "user", "content": str(p)}]
        return prompt, answer(rec["chosen"]), answer(rec["rejected"])
    if "question" in rec and "chosen" in rec:  # Orca DPO pairs
        prompt = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else [])
        return prompt + [{"role": "user", "content": str(rec["question"])}], answer(rec["chosen"]), \
            answer(rec["rejected"])
    if isinstance(rec.get("chosen"), str) and "Assistant:" in rec["chosen"]:  # HH-RLHF
        chosen, rejected = _hh_messages(rec["chosen"]), _hh_messages(rec["rejected"])
        if chosen[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
            raise MinilabError("HH-RLHF pair whose dialogues differ before the last answer")
        return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    raise MinilabError(f"unrecognised preference record (keys {sorted(rec)[:6]})")


def encode_pair(tok, template, prompt: list[dict[str, str]], chosen: str, rejected: str):
    from minilab.finetune.templates import encode_conversation

    return tuple(encode_conversation(tok, template, [*prompt, {"role": "assistant", "content": a}])
                 for a in (chosen, rejected))


def run(cfg: DPODataConfig) -> dict[str, Any]:
    from minilab.finetune.records import iter_records, manifest_head, prepare, source_info, split_held_out
    from minilab.finetune.rows import write_rows

    out, cfg, template, tok = prepare(cfg, "dpo_data")
    counts: Counter = Counter()
    pairs, samples = [], []
    for source in cfg.sources:
        if source == "demo":
            from minilab.finetune.demo_data import demo_pairs

            records = iter(demo_pairs(cfg.seed))
        else:
            records = iter_records(source, cfg.split)
        for n, rec in enumerate(records):
            if cfg.limit is not None and n >= cfg.limit:
                break
            counts["read"] += 1
            try:
                prompt, chosen, rejected = to_triplet(rec)
            except (MinilabError, AttributeError, TypeError, KeyError):
                counts["invalid"] += 1
                continue
            if not chosen.strip() or not rejected.strip() or not any(m["content"].strip() for m in prompt):
                counts["dropped_empty"] += 1
                continue
            if chosen.strip() == rejected.strip():
                counts["dropped_identical"] += 1
                continue
            c, r = encode_pair(tok, template, prompt, chosen, rejected)
            if max(len(c[0]), len(r[0])) > cfg.max_len:
                counts["dropped_too_long"] += 1
                continue
            pairs.append((c, r))
            if len(samples) < 3:
                samples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                **({"constructed": rec["constructed"]} if "constructed" in rec else {})})
    if not pairs:
        raise MinilabError(f"no usable preference pairs in {', '.join(cfg.sources)} ({dict(counts)})")
    splits = split_held_out(pairs, cfg.val_fraction, cfg.seed)
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        stats = {}
        for split, rows in splits.items():
            stats[split] = {side: write_rows(tmp, f"{split}.{side}", [p[k] for p in rows], tok.get_vocab_size())
                            for k, side in enumerate(("chosen", "rejected"))}
        manifest = {**manifest_head("dpo_data", cfg.tokenizer_dir, template),
                    "counts": {"pairs_kept": len(pairs), **counts}, "max_len": cfg.max_len, "seed": cfg.seed,
                    "constructed": "demo" in cfg.sources,
                    "sources": [source_info(s) for s in cfg.sources], "splits": stats}
        write_json_atomic(tmp / "manifest.json", manifest)
        write_text_atomic(tmp / "DATACARD.md", _card(manifest, samples))
    log.info("dpo data %s: %d train pairs, %d val pairs (%s)", out, len(splits["train"]), len(splits["val"]),
             dict(counts))
    return manifest


def _card(m: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    lines = ["# DPO data", "", f"- template: `{m['template']['name']}`", f"- counts: {json.dumps(m['counts'])}",
             f"- tokenizer sha256: `{m['tokenizer_sha256']}`", ""]
    if m["constructed"]:
        lines += ["**Constructed pairs.** The built-in demo has no human preference labels. Pairs are built",
                  "from real chatterbot-corpus answers: *chosen* is the real answer to the question;",
                  "*rejected* is the real answer to a different question, or the real answer cut to its",
                  "first third (field `constructed` of each sample). They teach the model to",
                  "answer the question asked and to finish its answer, nothing more.", ""]
    lines += ["## Sources", ""] + [f"- {json.dumps(s)}" for s in m["sources"]] + ["", "## Samples", ""]
    lines += [code_fence("\n".join(json.dumps(s, ensure_ascii=False) for s in samples), "json"), ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import add_config_flags
    from minilab.finetune.records import add_data_flags

    add_data_flags(p, sources="preference sources", tokenizer="the policy's tokenizer or model directory",
                   template="model (default), chatml, instruct, chat, alpaca",
                   max_len="max tokens of prompt + answer (default 256)", limit="at most N records per source")
    add_config_flags(p, "Keys: those of DPODataConfig.")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    cfg = config_from_args(DPODataConfig, args, (
        "sources", "tokenizer_dir", "output_dir", "template", "max_len", "limit", "force"))
    m = run(cfg)
    print(f"dpo data written to {cfg.output_dir}: {m['counts']['pairs_kept']} pairs; counts {json.dumps(m['counts'])}")
    return 0


def _metric(r: dict[str, Any], cfg: DPODataConfig) -> str:
    sp = r["splits"]
    return f"{sp['train']['chosen']['rows']:,} train / {sp['val']['chosen']['rows']:,} val pairs"


STAGE = Stage("dpo-data", DPODataConfig, run=run, metric=_metric, output_facts=("max_len",))
