"""Fine-tuning records as `sft-data` and `dpo-data` read them, and the steps both take around them.

Records come from JSONL or JSON files, or Hugging Face datasets (`iter_records`); `to_messages`
turns one record of any supported conversation shape into messages (OASST trees keep their
top-ranked path). Both verbs then resolve the tokenizer and template and check the output
directory alike (`prepare`), hold out a seeded share of their examples (`split_held_out`), and
start their manifest with the same tokenizer and template fields (`manifest_head`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError
from minilab.fsutil import read_user_text, sha256_file, text_lines

_ROLE_ALIASES = {"human": "user", "user": "user", "prompter": "user", "gpt": "assistant", "assistant": "assistant",
                 "bot": "assistant", "chatgpt": "assistant", "model": "assistant", "system": "system"}


def iter_records(source: str, split: str = "train") -> Iterator[dict[str, Any]]:
    """Dicts from a JSONL or JSON file, or rows of a Hugging Face dataset (id or local path)."""
    path = Path(source).expanduser()
    if path.is_file():
        text = read_user_text(path)
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                yield from json.loads(text)
            except json.JSONDecodeError as e:
                raise MinilabError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            return
        for lineno, line in text_lines(text):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise MinilabError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        return
    if path.exists() or source.startswith((".", "/")):
        raise MinilabError(f"{source}: not a JSONL/JSON file")
    try:
        import datasets  # optional: pip install 'minilab[hf]'
    except ImportError:
        raise MinilabError(f"{source}: not a file; reading Hugging Face dataset ids needs the 'datasets' "
                           "package (pip install 'minilab[hf]')") from None
    try:
        yield from datasets.load_dataset(source, split=split)  # respects HF_HOME / HF_DATASETS_CACHE
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line for the user
        raise MinilabError(f"cannot load dataset '{source}': {str(e).splitlines()[0]}") from None


def _role(raw: Any) -> str:
    role = _ROLE_ALIASES.get(str(raw).lower())
    if role is None:
        raise MinilabError(f"unknown role {raw!r}")
    return role


def to_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    """One record in any supported shape (except flat OASST, see `oasst_paths`) as messages."""
    from minilab.finetune.templates import validate_messages

    if "messages" in rec:
        return validate_messages([{"role": _role(m.get("role")), "content": m.get("content")}
                                  for m in rec["messages"]])
    if "conversations" in rec:
        return validate_messages([{"role": _role(m.get("from", m.get("role"))),
                                   "content": m.get("value", m.get("content"))} for m in rec["conversations"]])
    if "instruction" in rec and "output" in rec:
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return validate_messages([{"role": "user", "content": user},
                                  {"role": "assistant", "content": rec["output"]}])
    if isinstance(rec.get("prompt"), dict) and "replies" in rec["prompt"]:
        return oasst_nested_path(rec["prompt"])
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        return validate_messages([{"role": "user", "content": rec["prompt"]},
                                  {"role": "assistant", "content": rec.get("response", rec.get("completion"))}])
    raise MinilabError(f"unrecognised record shape (keys {sorted(rec)[:6]}); expected messages, "
                       "conversations, instruction/output, or an OASST tree")


def _best(replies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The top-ranked reply (rank 0 is best; unranked replies come last; ties keep file order)."""
    if not replies:
        return None
    return min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))


def _trim_to_assistant(path: list[dict[str, str]]) -> list[dict[str, str]]:
    while path and path[-1]["role"] != "assistant":
        path.pop()
    if not path:
        raise MinilabError("OASST tree without an assistant reply")
    return path


def oasst_nested_path(node: dict[str, Any]) -> list[dict[str, str]]:
    """Top-ranked path through a nested OASST tree (the `*.trees.jsonl` export)."""
    path = []
    while node is not None:
        if not node.get("deleted"):
            path.append({"role": _role(node.get("role")), "content": str(node.get("text", ""))})
        node = _best(node.get("replies") or [])
    return _trim_to_assistant(path)


def oasst_paths(records: list[dict[str, Any]]) -> Iterator[list[dict[str, str]]]:
    """Top-ranked path of every tree in flat OASST messages (`message_id`, `parent_id`, ...)."""
    children: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        if not r.get("deleted"):
            children.setdefault(r.get("parent_id"), []).append(r)
    for root in children.get(None, []):
        node, path = root, []
        while node is not None:
            path.append({"role": _role(node.get("role")), "content": str(node.get("text", ""))})
            node = _best(children.get(node["message_id"], []))
        try:
            yield _trim_to_assistant(path)
        except MinilabError:
            continue


def source_info(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.is_file():
        return {"source": str(path.resolve()), "sha256": sha256_file(path)}
    if source == "demo":
        from minilab.finetune.demo_data import provenance

        return {"source": "demo", **provenance()}
    return {"source": source, "kind": "huggingface dataset"}


# ---- what sft-data and dpo-data share ------------------------------------------------------
def prepare(cfg: Any, kind: str) -> tuple[Path, Any, Any, Any]:
    """(output dir, `cfg` with its tokenizer resolved to a folder, chat template, tokenizer), after
    checking that the output may be written (`kind`: sft_data or dpo_data)."""
    from minilab.finetune.models import resolve_tokenizer_dir
    from minilab.finetune.templates import resolve_template
    from minilab.owned import check_output
    from minilab.tokenization import load_tokenizer

    out = Path(cfg.output_dir)
    cfg = dataclasses.replace(cfg, tokenizer_dir=str(resolve_tokenizer_dir(cfg.tokenizer_dir)))
    reading = (cfg.tokenizer_dir, *(Path(s).expanduser() for s in cfg.sources))
    check_output(out, cfg.force, {kind}, reading=reading)
    template = resolve_template(cfg.template, cfg.tokenizer_dir)
    return out, cfg, template, load_tokenizer(cfg.tokenizer_dir)


def split_held_out(items: list, val_fraction: float, seed: int) -> dict[str, list]:
    """{"val": ..., "train": ...}: a shuffle seeded by `seed` picks round(val_fraction x n) held-out
    items (none when there is only one)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(items))) if len(items) > 1 else 0
    return {"val": [items[i] for i in order[:n_val]], "train": [items[i] for i in order[n_val:]]}


def manifest_head(kind: str, tokenizer_dir: str, template) -> dict[str, Any]:
    """The first fields of a fine-tuning dataset's manifest: its kind, tokenizer and chat template."""
    from minilab.tokenization import tokenizer_fingerprint

    return {"kind": f"minilab.{kind}", "tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "template": {"name": template.name, "jinja": template.jinja, "end_token": template.end_token}}


def add_data_flags(p: Any, *, sources: str, tokenizer: str, template: str, max_len: str, limit: str) -> None:
    """The flags sft-data and dpo-data share (each says in its own words what they mean to it)."""
    from minilab.cliargs import flag

    p.add_argument("--source", dest="sources", nargs="+", metavar="FILE|ID|demo", help=sources)
    flag(p, "--tokenizer-dir", metavar="DIR", help=tokenizer)
    flag(p, "--output-dir", metavar="DIR", help="output directory")
    p.add_argument("--template", help=template)
    flag(p, "--max-len", type=int, metavar="N", help=max_len)
    p.add_argument("--limit", type=int, metavar="N", help=limit)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
