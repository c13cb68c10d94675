"""One reader per corpus file format (txt, JSON Lines, JSON, XML with MediaWiki dumps, Parquet)
and for Hugging Face datasets: each streams `(text, where)` pairs, `where` naming file and line
(or record, item, row), and hands what it cannot read to `rejects.add(where, reason)`.
`sources.iter_source` picks the reader; `formats.py` opens and recognises the files.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minilab.data.formats import SNIFF_BYTES, STREAM_ERRORS, compression, content_format, open_input
from minilab.errors import MinilabError

if TYPE_CHECKING:
    from minilab.data.sources import Rejects, SourceConfig


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
    except STREAM_ERRORS as e:
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
            head = f.read(SNIFF_BYTES)
    except STREAM_ERRORS:
        head = b""
    fmt = content_format(head)
    if fmt != "json" and not head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        yield from _iter_jsonl(path, src, rejects)
        return
    try:
        with io.TextIOWrapper(open_input(path), encoding="utf-8-sig") as f:
            items = json.load(f)
        if isinstance(items, dict):
            items = [items]
    except (json.JSONDecodeError, UnicodeDecodeError, *STREAM_ERRORS) as e:
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
    except STREAM_ERRORS as e:
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


def iter_hf(name: str, src: SourceConfig, rejects: Rejects) -> Iterator[tuple[str, str]]:
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


READERS = {"txt": _iter_txt, "jsonl": _iter_jsonl, "json": _iter_json, "xml": _iter_xml,
           "parquet": _iter_parquet}
