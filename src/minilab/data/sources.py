"""Raw text sources: files, folders and globs of txt/JSONL/XML/Parquet, HF datasets, the default.

`iter_source(src, rejects)` streams `(text, where)` pairs, `where` being `file:line` (or
`file:row N`), so every later drop can name its origin. Input that cannot be read (malformed
JSON, invalid UTF-8, a truncated compressed file, malformed XML, a missing field, a binary file
among text files) is passed to `rejects.add(where, reason)`, which records it in
`rejects.jsonl` or, in strict mode, stops with a one-line error naming file and line.
"""

from __future__ import annotations

import glob
import json
import lzma
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from minilab.errors import MinilabError

FORMATS = ("txt", "jsonl", "json", "xml", "parquet")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# Errors a truncated or corrupt compressed stream raises part-way through reading.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclass
class SourceConfig:
    """One input of a corpus."""

    path: str = field(metadata={"help": "file, folder, glob, 'default', or 'hf:<dataset id or path>'"})
    format: Literal["auto", "txt", "jsonl", "json", "xml", "parquet", "hf", "default"] = field(
        default="auto", metadata={"help": "input format; 'auto' infers it from the extension"})
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

    def label(self) -> str:
        if self.name:
            return self.name
        return "default (Jane Austen, janeaustenr)" if self.path == "default" else self.path


class Rejects:
    """Unreadable input: counted and written to rejects.jsonl, or fatal in strict mode."""

    def __init__(self, path: Path | None = None, strict: bool = False):
        self.path, self.strict = path, strict
        self.counts: Counter[str] = Counter()
        self._f: IO | None = None

    def add(self, where: str, reason: str, sample: str = "") -> None:
        if self.strict:
            raise MinilabError(f"{where}: {reason} (drop --strict to skip such input and list it in "
                               "rejects.jsonl)")
        self.counts[reason.split(":")[0]] += 1
        if self.path is not None:
            if self._f is None:
                self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._f.write(json.dumps({"where": where, "reason": reason, "sample": sample[:200]},
                                     ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def infer_format(path: str | Path) -> str:
    suffix = _base_suffix(Path(path)).lstrip(".")
    return suffix if suffix in FORMATS else "txt"


def _base_suffix(path: Path) -> str:
    """'.jsonl' for 'a.jsonl.gz': the format suffix under any compression suffix."""
    name = path.name.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    return Path(name).suffix


def expand_paths(pattern: str) -> list[Path]:
    """A file, every known-format file below a folder, or a glob's matches, sorted."""
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


def _lines(path: Path, rejects: Rejects) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a possibly compressed file; bad lines go to `rejects`."""
    from minilab.data.shards import open_text

    lineno = 0
    try:
        with open_text(path, "rb") as f:
            head = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
            if b"\x00" in head:
                rejects.add(f"{path}:1", "binary file (NUL bytes) among text files")
                return
            for raw in f:
                lineno += 1
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rejects.add(f"{path}:{lineno}", f"invalid UTF-8 at byte {e.start}",
                                raw.decode("utf-8", "replace"))
    except _STREAM_ERRORS as e:
        rejects.add(f"{path}:{lineno + 1}", f"truncated or corrupt file: {e}")


def _get_field(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _iter_txt(path: Path, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    buf: list[str] = []
    start = 1
    for lineno, line in _lines(path, rejects):
        if src.split == "paragraph" and not line.strip():
            if "".join(buf).strip():
                yield "".join(buf), f"{path}:{start}"
            buf, start = [], lineno + 1
            continue
        buf.append(line)
    if "".join(buf).strip():
        yield "".join(buf), f"{path}:{start}"


def _iter_jsonl(path: Path, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    for lineno, line in _lines(path, rejects):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rejects.add(where, f"malformed JSON: {e.msg}", line)
            continue
        text = _get_field(obj, src.text_field) if isinstance(obj, dict) else None
        if isinstance(text, str):
            yield text, where
        elif text is None:
            rejects.add(where, f"missing field '{src.text_field}'", line)
        else:
            rejects.add(where, f"field '{src.text_field}' is {type(text).__name__}, not text", line)


def _iter_json(path: Path, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    """A .json file holding an array of objects/strings; otherwise read as JSON Lines."""
    from minilab.data.shards import open_text

    with open_text(path, "rb") as f:
        first = f.read(64).lstrip()[:1]
    if first != b"[":
        yield from _iter_jsonl(path, src, rejects)
        return
    try:
        with open_text(path) as f:
            items = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, *_STREAM_ERRORS) as e:
        rejects.add(f"{path}:{getattr(e, 'lineno', 1)}", f"malformed JSON: {getattr(e, 'msg', e)}")
        return
    for i, obj in enumerate(items):
        text = obj if isinstance(obj, str) else _get_field(obj, src.text_field)
        if isinstance(text, str):
            yield text, f"{path}:item {i}"
        else:
            rejects.add(f"{path}:item {i}", f"missing field '{src.text_field}'")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+\s*([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def strip_wikitext(text: str) -> str:
    """MediaWiki markup to plain text (templates, refs, tables, links, emphasis, headings)."""
    prev = None
    while prev != text:  # templates nest: strip innermost first until none are left
        prev, text = text, _TEMPLATE.sub("", text)
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    return text


def _iter_xml(path: Path, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    from minilab.data.shards import open_text

    record, text_path, wiki = src.record_tag, src.text_path, False
    n = 0
    try:
        with open_text(path, "rb") as f:
            context = ET.iterparse(f, events=("start", "end"))
            _, root = next(context)
            if _local(root.tag) == "mediawiki":  # a Wikipedia-style dump: pages, main namespace only
                wiki, record, text_path = True, record or "page", text_path or "revision/text"
            if not record:
                raise MinilabError(f"{path}: set record_tag for this XML source (root <{_local(root.tag)}>)")
            for event, elem in context:
                if event != "end" or _local(elem.tag) != record:
                    continue
                n += 1
                where = f"{path}:record {n}"
                yield from _xml_record(elem, text_path, wiki, where, rejects)
                root.clear()  # drop finished records so memory stays flat on large dumps
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else "?"
        rejects.add(f"{path}:{line}", f"malformed XML: {e}")
    except _STREAM_ERRORS as e:
        rejects.add(f"{path}:record {n + 1}", f"truncated or corrupt file: {e}")


def _xml_record(elem, text_path: str | None, wiki: bool, where: str, rejects: Rejects):
    if wiki:
        ns = next((c.text for c in elem if _local(c.tag) == "ns"), "0")
        if ns != "0" or any(_local(c.tag) == "redirect" for c in elem):
            return
    node = elem
    for part in (text_path.split("/") if text_path else []):
        node = next((c for c in node if _local(c.tag) == part), None)
        if node is None:
            rejects.add(where, f"missing element '{text_path}'")
            return
    text = "".join(node.itertext())
    yield (strip_wikitext(text) if wiki else text), where


def _iter_parquet(path: Path, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MinilabError("reading Parquet needs pyarrow: pip install 'minilab[hf]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc.
        rejects.add(f"{path}:1", f"unreadable Parquet file: {e}")
        return
    column = src.text_field.split(".")[0]
    if column not in pf.schema_arrow.names:
        rejects.add(f"{path}:1", f"missing field '{src.text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _get_field({column: value}, src.text_field)
            if isinstance(text, str):
                yield text, f"{path}:row {row}"
            else:
                rejects.add(f"{path}:row {row}", f"field '{src.text_field}' is missing or not text")


def _iter_hf(name: str, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise MinilabError("Hugging Face datasets need the 'datasets' package: pip install 'minilab[hf]'") from None
    try:
        ds = datasets.load_dataset(name, split=src.hf_split, streaming=True)
    except Exception as e:  # the hub or a local script can fail in many ways; report one line
        raise MinilabError(f"cannot open dataset '{name}': {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        text = _get_field(row, src.text_field)
        if isinstance(text, str):
            yield text, f"hf:{name}:row {i + 1}"
        else:
            rejects.add(f"hf:{name}:row {i + 1}", f"missing field '{src.text_field}'")


_READERS = {"txt": _iter_txt, "jsonl": _iter_jsonl, "json": _iter_json, "xml": _iter_xml,
            "parquet": _iter_parquet}


def source_files(src: SourceConfig) -> list[Path]:
    """The files a file-based source reads (empty for 'default' and HF datasets)."""
    if src.format in ("hf", "default") or src.path == "default" or src.path.startswith("hf:"):
        return []
    files = expand_paths(src.path)
    if not files:
        raise MinilabError(f"source '{src.path}' matches no readable files")
    return files


def iter_source(src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    """Stream (text, where) for every document of `src`."""
    if src.format == "default" or src.path == "default":
        from minilab.data.default_corpus import iter_default

        yield from iter_default()
        return
    if src.format == "hf" or src.path.startswith("hf:"):
        yield from _iter_hf(src.path.removeprefix("hf:"), src, rejects)
        return
    for path in source_files(src):
        fmt = infer_format(path) if src.format == "auto" else src.format
        yield from _READERS[fmt](path, src, rejects)
