"""Raw text sources: files, folders and globs of txt/JSONL/XML/Parquet, HF datasets, the default.

`iter_source(src, rejects)` streams `(text, where)` pairs, `where` being `file:line` (or
`file:row N`), so every later drop can name its origin. Input that cannot be read (malformed
JSON, a truncated compressed file, malformed XML, a missing field, a binary file among text
files) is passed to `rejects.add(where, reason)`, which records it in `rejects.jsonl` or, in
strict mode, stops with a one-line error naming file and line. Invalid UTF-8 bytes are replaced
by U+FFFD, the rest of the line kept, and the byte offset recorded the same way.

A file's format is known by its content, not its name (`formats.detect_format`: compression by
magic bytes, then the decompressed head); `format` (or a `jsonl:PATH` style prefix on the path)
overrides it. Each format's reader is in `readers.py`.
"""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from minilab.data.formats import ReadMeter, detect_format, metered, split_format_prefix
from minilab.data.readers import READERS, iter_hf
from minilab.errors import MinilabError

log = logging.getLogger("minilab.corpus")

# One plain-text document this large is most likely a file of many documents read in the wrong format.
HUGE_DOCUMENT_CHARS = 1 << 20
EMPTY_PATH = "empty path; give a file, folder, glob, 'default' or 'hf:ID' ('.' for the current folder)"


@dataclass
class SourceConfig:
    """One input of a corpus."""

    path: str = field(metadata={"help": "file, folder, glob, 'default', or 'hf:<dataset id or path>'; "
                                        "'FORMAT:PATH' (e.g. 'jsonl:data/dump') also sets format"})
    format: Literal["auto", "txt", "jsonl", "json", "xml", "parquet", "hf", "default"] = field(
        default="auto", metadata={"help": "input format; 'auto' recognises it from the file's content "
                                          "(the name is only a hint)"})
    name: str | None = field(default=None, metadata={"help": "label in the manifest and data card"})
    license: str = field(default="unspecified", metadata={"help": "licence as given, for the data card"})
    text_field: str = field(default="text", metadata={"help": "JSONL/Parquet/HF: field holding the text "
                                                              "(dotted for nested objects)"})
    split: Literal["file", "paragraph"] = field(default="file", metadata={
        "help": "txt: one document per file, or per blank-line-separated paragraph block"})
    record_tag: str | None = field(default=None, metadata={
        "help": "XML: element that is one document (MediaWiki dumps: 'page', found automatically)"})
    text_path: str | None = field(default=None, metadata={
        "help": "XML: path below the record to its text, e.g. 'revision/text'; all text when unset"})
    hf_split: str = field(default="train", metadata={"help": "HF dataset split"})
    weight: float = field(default=1.0, metadata={
        "help": "< 1 keeps that share of documents (seeded); > 1 repeats kept documents (upsampling)"})
    max_tokens: int = field(default=0, metadata={
        "help": "stop taking from this source after about this many tokens kept (chars/4); 0 = no limit"})

    def __post_init__(self) -> None:
        fmt, path = split_format_prefix(self.path)
        if fmt is not None:
            if self.format not in ("auto", fmt):
                raise MinilabError(f"source '{self.path}': the prefix says {fmt} but format is {self.format}; "
                                   "give one of them")
            self.format, self.path = fmt, path

    def validate(self) -> None:
        from minilab.errors import ConfigError

        if not self.path.strip():
            raise ConfigError(EMPTY_PATH, key="path")

    def label(self) -> str:
        if self.name:
            return self.name
        return "default (Jane Austen, janeaustenr)" if self.path == "default" else self.path


class Rejects:
    """Unreadable input: counted and written to rejects.jsonl, or fatal in strict mode."""

    def __init__(self, path: Path | None = None, strict: bool = False):
        self.path, self.strict = path, strict
        self.counts: Counter[str] = Counter()
        self.first: tuple[str, str] | None = None  # (where, reason) of the first problem, for messages
        self._f: IO | None = None

    def add(self, where: str, reason: str, sample: str = "") -> None:
        if self.strict:
            raise MinilabError(f"{where}: {reason} (drop --strict to skip such input and list it in "
                               "rejects.jsonl)")
        self.counts[reason.split(":")[0]] += 1
        self.first = self.first or (where, reason)
        if self.path is not None:
            if self._f is None:
                self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._f.write(json.dumps({"where": where, "reason": reason, "sample": sample[:200]},
                                     ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def summary(self) -> str:
        """'N input problems (reason n, ...; first at WHERE: REASON)', for one-line messages."""
        n = sum(self.counts.values())
        if not n:
            return ""
        reasons = ", ".join(f"{k} {v}" for k, v in self.counts.most_common(3))
        where, reason = self.first or ("?", "?")
        return f"{n} input problem{'s' if n > 1 else ''} ({reasons}; first at {where}: {reason})"


def file_format(path: Path, src: SourceConfig) -> tuple[str, str]:
    """(format, how it was decided) that `iter_source` reads one file of `src` in."""
    return detect_format(path) if src.format == "auto" else (src.format, "as configured")


def huge_document_hint(path: Path, how: str, chars: int) -> str:
    """Why one enormous plain-text document is suspect, and how to name the right format."""
    return (f"{path}: read as plain text ({how}), one document of {chars / 1e6:.1f} M characters; if it "
            f"holds many documents, name its format: --source jsonl:{path} (or json:, xml:, parquet:), "
            "or format: in the source's config; split: paragraph splits text at blank lines")


def expand_paths(pattern: str) -> list[Path]:
    """A file, every known-format file below a folder, or a glob's matches, sorted."""
    if not pattern.strip():
        raise MinilabError(EMPTY_PATH)
    p = Path(pattern)
    if p.is_dir():
        # Every non-hidden file: unknown extensions are read as text, so a stray binary file is
        # reported in rejects.jsonl rather than silently ignored.
        return [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    if any(ch in pattern for ch in "*?["):
        return [Path(f) for f in sorted(glob.glob(pattern, recursive=True)) if Path(f).is_file()]
    if not p.is_file():
        raise MinilabError(f"source '{pattern}' not found (a file, folder, glob, 'default' or 'hf:ID')")
    return [p]


def source_files(src: SourceConfig) -> list[Path]:
    """The files a file-based source reads (empty for 'default' and HF datasets)."""
    if src.format in ("hf", "default") or src.path == "default" or src.path.startswith("hf:"):
        return []
    files = expand_paths(src.path)
    if not files:
        raise MinilabError(f"source '{src.path}' matches no readable files")
    return files


def read_paths(src: SourceConfig) -> list[Path]:
    """What `src` reads on disk (its file or folder, a glob's matches, a local HF dataset): an
    output directory replaced with --force must never hold any of them."""
    if src.format == "default" or src.path == "default":
        return []
    path = src.path.removeprefix("hf:") if src.format == "hf" or src.path.startswith("hf:") else src.path
    if Path(path).exists():
        return [Path(path)]
    if any(ch in path for ch in "*?["):
        return [Path(f) for f in glob.glob(path, recursive=True)]
    return []


def iter_source(src: SourceConfig, rejects: Rejects, meter: ReadMeter | None = None) -> Iterator[tuple[str, str]]:
    """Stream (text, where) for every document of `src`; `meter` counts the bytes of its files read."""
    if src.format == "default" or src.path == "default":
        from minilab.data.default_corpus import iter_default

        yield from iter_default()
        return
    if src.format == "hf" or src.path.startswith("hf:"):
        yield from iter_hf(src.path.removeprefix("hf:"), src, rejects)
        return
    for path in source_files(src):
        fmt, how = file_format(path, src)
        log.debug("%s: read as %s (%s)", path, fmt, how)
        with metered(meter):
            for text, where in READERS[fmt](path, src, rejects):
                if fmt == "txt" and len(text) > HUGE_DOCUMENT_CHARS:
                    log.warning("%s", huge_document_hint(path, how, len(text)))
                yield text, where
        if meter is not None:
            meter.file_done(path.stat().st_size)
