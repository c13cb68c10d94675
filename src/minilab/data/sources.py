"""Raw text sources: files, folders and globs of txt/JSONL/XML/Parquet, HF datasets, the default.

`iter_source(src, rejects)` streams `(text, where)` pairs, `where` being `file:line` (or
`file:row N`), so every later drop can name its origin. Input that cannot be read (malformed
JSON, a truncated compressed file, malformed XML, a missing field, a binary file among text
files) is passed to `rejects.add(where, reason)`, which records it in `rejects.jsonl` or, in
strict mode, stops with a one-line error naming file and line. Invalid UTF-8 bytes are replaced
by U+FFFD, the rest of the line kept, and the byte offset recorded the same way.

A file's format is known by its content, not its name (`detect_format`): the compression by its
magic bytes (gzip, bzip2 including multistream dumps, xz, zstd), then the decompressed head says
Parquet, XML (MediaWiki dumps included), a JSON array, JSON Lines or plain text. The name is
only a hint where the content does not decide, and `format` (or a `jsonl:PATH` style prefix on
the path) overrides both.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import html
import io
import json
import logging
import lzma
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from minilab.errors import MinilabError

log = logging.getLogger("minilab.corpus")

FORMATS = ("txt", "jsonl", "json", "xml", "parquet")
# Compression by magic bytes, never by file name: Wikimedia names dumps '...xml-p10p30302.bz2'.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_SNIFF_BYTES = 1 << 16  # decompressed head read to recognise a format
# One plain-text document this large is most likely a file of many documents read in the wrong format.
HUGE_DOCUMENT_CHARS = 1 << 20
_NAME_HINT = re.compile(r"\.(txt|jsonl|ndjson|json|xml|parquet)(?![a-z0-9])")
EMPTY_PATH = "empty path; give a file, folder, glob, 'default' or 'hf:ID' ('.' for the current folder)"
# Errors a truncated or corrupt compressed stream raises part-way through reading.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError)


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


class ReadMeter:
    """How many bytes of the source files (as stored, compressed or not) have been read, for
    progress and MB/s: within an uncompressed or zstd file it follows the read position, and a
    gzip, bzip2 or xz file counts whole once it is read."""

    def __init__(self) -> None:
        self.done = 0  # bytes of the files finished
        self._file: IO[bytes] | None = None
        self._last = 0

    @property
    def bytes(self) -> int:
        pos = 0
        if self._file is not None:
            try:
                pos = self._file.tell()
            except (OSError, ValueError):  # closed between two reads of the same file
                pos = 0
        self._last = max(self._last, self.done + pos)
        return self._last

    def file_done(self, size: int) -> None:
        self.done += size
        self._file = None


_meter: ReadMeter | None = None  # the meter of the file `iter_source` is reading, if any


def _watch(f: IO[bytes]) -> IO[bytes]:
    if _meter is not None:
        _meter._file = f
    return f


def split_format_prefix(spec: str) -> tuple[str | None, str]:
    """'jsonl:data/dump' -> ('jsonl', 'data/dump'); a path without a format prefix -> (None, path)."""
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS and not Path(spec).exists():
        return head, rest
    return None, spec


def compression(path: Path) -> str | None:
    """'gzip', 'bz2', 'xz' or 'zstd' from the file's magic bytes; None when not compressed."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return next((kind for m, kind in _MAGIC if magic.startswith(m)), None)


def open_input(path: Path) -> IO[bytes]:
    """A source file's decompressed bytes, compression recognised by magic bytes (not the name)."""
    kind = compression(path)
    if kind == "gzip":
        return gzip.open(path, "rb")  # reads concatenated members too
    if kind == "bz2":
        return bz2.BZ2File(path, "rb")  # reads concatenated streams: multistream Wikipedia dumps
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(_watch(open(path, "rb")),  # noqa: SIM115
                                                            read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return _watch(open(path, "rb"))  # noqa: SIM115 - returned to the caller


def _name_hint(path: Path) -> str | None:
    """The format a file's name suggests, wherever the suffix sits ('a.xml-p10p30302.bz2' -> xml)."""
    found = _NAME_HINT.findall(path.name.lower())
    return None if not found else ("jsonl" if found[-1] == "ndjson" else found[-1])


def _content_format(head: bytes) -> str | None:
    """The format the first decompressed bytes identify, or None when they do not decide."""
    if head.startswith(b"PAR1"):
        return "parquet"
    body = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if body.startswith((b"<?xml", b"<mediawiki")):
        return "xml"
    if body.startswith(b"["):
        return "json" if body[1:].lstrip()[:1] in (b"{", b'"', b"]") else None
    if body.startswith(b"{"):
        line, newline, _ = body.partition(b"\n")
        if not newline and len(head) >= _SNIFF_BYTES:
            return "jsonl"  # a first record longer than the sniffed head
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict):
            return "jsonl"
        try:  # one pretty-printed JSON object
            return "json" if len(head) < _SNIFF_BYTES and isinstance(json.loads(body), dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return None


def detect_format(path: Path) -> tuple[str, str]:
    """(format, how it was decided) for one file: by content, else by name, else plain text."""
    try:
        with open_input(path) as f:
            head = f.read(_SNIFF_BYTES)
    except _STREAM_ERRORS:
        head = b""  # the reader reports the corrupt stream
    fmt = _content_format(head)
    if fmt is not None:
        return fmt, "by content"
    hint = _name_hint(path)
    if hint is not None:
        return hint, "by file name"
    return "txt", "nothing else recognised"


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


def _lines(path: Path, rejects: Rejects) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a possibly compressed file.

    Invalid UTF-8 bytes become U+FFFD and the rest of the line is kept; each such line is
    recorded in `rejects` with the byte offset (in the decompressed file) of its first bad byte.
    """
    lineno = offset = 0
    try:
        with open_input(path) as f:
            if b"\x00" in f.peek(8192)[:8192]:
                rejects.add(f"{path}:1", "binary file (NUL bytes) among text files")
                return
            for raw in f:
                lineno += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = raw.decode("utf-8", "replace")
                    rejects.add(f"{path}:{lineno}", f"invalid UTF-8 replaced by U+FFFD: first at byte "
                                f"{offset + e.start}", line)
                offset += len(raw)
                yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line
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
    """A JSON array of objects/strings, or one JSON object; otherwise read as JSON Lines."""
    try:
        with open_input(path) as f:
            head = f.read(_SNIFF_BYTES)
    except _STREAM_ERRORS:
        head = b""
    fmt = _content_format(head)
    if fmt != "json" and not head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        yield from _iter_jsonl(path, src, rejects)
        return
    try:
        with io.TextIOWrapper(open_input(path), encoding="utf-8-sig") as f:
            items = json.load(f)
        if isinstance(items, dict):
            items = [items]
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
    # [[target|label]] -> label, innermost first, so a link inside an image caption goes before the image
    (re.compile(r"\[\[(?!(?:File|Image|Category):)(?:[^|\[\]]*\|)?([^\[\]]*)\]\]", re.I), r"\1"),
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*\]\]", re.I), ""),
    (re.compile(r"__[A-Z]+__"), ""),  # magic words: __TOC__, __NOTOC__
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
    return html.unescape(text)  # &nbsp; &amp; ... as the characters they stand for


def _iter_xml(path: Path, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    record, text_path, wiki = src.record_tag, src.text_path, False
    n = 0
    try:
        with open_input(path) as f:
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
        pf = pq.ParquetFile(path if compression(path) is None else io.BytesIO(open_input(path).read()))
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
    global _meter
    if src.format == "default" or src.path == "default":
        from minilab.data.default_corpus import iter_default

        yield from iter_default()
        return
    if src.format == "hf" or src.path.startswith("hf:"):
        yield from _iter_hf(src.path.removeprefix("hf:"), src, rejects)
        return
    for path in source_files(src):
        fmt, how = file_format(path, src)
        log.debug("%s: read as %s (%s)", path, fmt, how)
        _meter = meter
        try:
            for text, where in _READERS[fmt](path, src, rejects):
                if fmt == "txt" and len(text) > HUGE_DOCUMENT_CHARS:
                    log.warning("%s", huge_document_hint(path, how, len(text)))
                yield text, where
        finally:
            _meter = None
        if meter is not None:
            meter.file_done(path.stat().st_size)
