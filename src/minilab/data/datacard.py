"""DATACARD.md: the corpus manifest written for people (sources, licences, filters, stats, drops)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from minilab.fsutil import write_text_atomic


def code_fence(text: str, info: str = "") -> str:
    """`text` verbatim as a fenced code block: the fence is one backtick longer than the longest run
    of backticks in `text` (at least three), so no line of `text` can close it (CommonMark), and the
    block is always closed."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}{info}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}"


def render_datacard(m: dict[str, Any], examples: dict[str, list[dict[str, str]]]) -> str:
    cfg = m["config"]
    lines = [f"# Data card: {m['name']}", "",
             f"Built by minilab {m['minilab_version']} on {m['created']} in {m['seconds']} s.", "",
             "## Summary", "",
             f"- documents read: {m['documents_read']:,}; kept: {m['documents_kept']:,}",
             f"- characters kept: {m['characters_kept']:,} "
             f"(about {m['approx_tokens']:,} tokens at 4 chars/token)",
             f"- shards: {len(m['shards'])} ({cfg['compression']} compression); "
             "SHA-256 of each in manifest.json",
             f"- input problems (unreadable records, replaced bytes): {sum(m['rejects'].values()):,}"
             + (" (listed with file:line in rejects.jsonl)" if m["rejects"] else ""), "",
             "## Sources", "",
             "| source | format | licence (as given) | read | kept | characters kept |",
             "|---|---|---|---:|---:|---:|"]
    for s in m["sources"]:
        lines.append(f"| {s['name']} | {s['format']} | {s.get('license', '')} | {s['documents_read']:,} | "
                     f"{s['documents_kept']:,} | {s['characters_kept']:,} |")
    lines.append("")
    for s in m["sources"]:
        if s.get("provenance"):
            lines += [f"**{s['name']}**: {s['provenance']}", ""]
        for f in s.get("files", [])[:20]:
            lines.append(f"- `{f['path']}` sha256 `{f['sha256'][:16]}…` ({f['bytes']:,} bytes)")
        if len(s.get("files", [])) > 20:
            lines.append(f"- … and {len(s['files']) - 20} more files (all in manifest.json)")
    lines += ["", "## Cleaning and filters", "",
              f"- Unicode NFC normalisation, control characters removed, whitespace tidied; "
              f"mojibake repair (ftfy): {'on' if cfg['fix_encoding'] else 'off'}",
              "- quality rules (Gopher/C4 style): "
              + ", ".join(f"{k}={v}" for k, v in cfg["quality"].items()),
              f"- dedup: exact={cfg['dedup']['exact']}, near={cfg['dedup']['near']} (MinHash LSH, "
              f"Jaccard ≥ {cfg['dedup']['threshold']}, {cfg['dedup']['num_perm']} permutations, "
              f"{cfg['dedup']['shingle_words']}-word shingles)", "",
              "## Dropped documents", ""]
    if not m["dropped"]:
        lines.append("None.")
    for reason, n in m["dropped"].items():
        lines += [f"### {reason}: {n:,}", ""]
        for ex in examples.get(reason, []):
            lines += [f"From `{ex['where']}`:", "", code_fence(ex["text"], "text"), ""]
    return "\n".join(lines) + "\n"


def write_datacard(path: Path, manifest: dict[str, Any], examples: dict[str, list[dict[str, str]]]) -> None:
    write_text_atomic(path, render_datacard(manifest, examples))
