"""What a corpus source file is: its compression by magic bytes (gzip, bzip2 including
multistream dumps, xz, zstd), its decompressed bytes (`open_input`, counted by a `ReadMeter`),
and its format by content (`detect_format`): Parquet, XML (MediaWiki dumps included), a JSON
array, JSON Lines or plain text, the name being only a hint where the content does not decide.
The readers of each format are in `readers.py`; `sources.py` turns a source into documents.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

FORMATS = ("txt", "jsonl", "json", "xml", "parquet")
# Compression by magic bytes, never by file name: Wikimedia names dumps '...xml-p10p30302.bz2'.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
SNIFF_BYTES = 1 << 16  # decompressed head read to recognise a format
_NAME_HINT = re.compile(r"\.(txt|jsonl|ndjson|json|xml|parquet)(?![a-z0-9])")
# Errors a truncated or corrupt compressed stream raises part-way through reading.
STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError)


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


@contextlib.contextmanager
def metered(meter: ReadMeter | None) -> Iterator[None]:
    """While inside, the files `open_input` opens are the ones `meter` follows."""
    global _meter
    _meter = meter
    try:
        yield
    finally:
        _meter = None


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


def content_format(head: bytes) -> str | None:
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
        if not newline and len(head) >= SNIFF_BYTES:
            return "jsonl"  # a first record longer than the sniffed head
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict):
            return "jsonl"
        try:  # one pretty-printed JSON object
            return "json" if len(head) < SNIFF_BYTES and isinstance(json.loads(body), dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return None


def detect_format(path: Path) -> tuple[str, str]:
    """(format, how it was decided) for one file: by content, else by name, else plain text."""
    try:
        with open_input(path) as f:
            head = f.read(SNIFF_BYTES)
    except STREAM_ERRORS:
        head = b""  # the reader reports the corrupt stream
    fmt = content_format(head)
    if fmt is not None:
        return fmt, "by content"
    hint = _name_hint(path)
    if hint is not None:
        return hint, "by file name"
    return "txt", "nothing else recognised"
