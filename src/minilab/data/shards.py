"""Corpus shards: the on-disk format shared by `corpus` (writer), `tokenizer` and `pack` (readers).

A corpus directory holds `shard-NNNNN.jsonl[.gz|.zst]`, one JSON object per line with at least
`{"text": ...}`, plus `manifest.json` listing every shard with its SHA-256. Readers verify those
hashes before trusting a shard, so a shard edited or truncated after the fact is refused instead
of silently training on different data than the manifest describes.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from minilab.errors import MinilabError
from minilab.fsutil import sha256_bytes, sha256_file

MANIFEST = "manifest.json"


def open_text(path: str | Path, mode: str = "rt") -> IO:
    """Open a possibly compressed file (by extension) as UTF-8 text or bytes ('rb'/'wb')."""
    path = Path(path)
    name = path.name.lower()
    binary = "b" in mode
    raw_mode = mode.replace("t", "").replace("b", "") + "b"
    if name.endswith(".gz"):
        f: IO = gzip.open(path, raw_mode)  # noqa: SIM115 - returned to the caller
    elif name.endswith(".bz2"):
        f = bz2.open(path, raw_mode)  # noqa: SIM115
    elif name.endswith(".xz"):
        f = lzma.open(path, raw_mode)  # noqa: SIM115
    elif name.endswith(".zst"):
        import zstandard  # only needed for .zst; a light C extension

        fh = open(path, raw_mode)  # noqa: SIM115 - ownership passes to the zstd stream
        if "r" in raw_mode:
            f = zstandard.ZstdDecompressor().stream_reader(fh, closefd=True)
        else:
            f = zstandard.ZstdCompressor(level=6).stream_writer(fh, closefd=True)
    else:
        f = open(path, raw_mode)  # noqa: SIM115
    if binary:
        return f
    return io.TextIOWrapper(f, encoding="utf-8", newline="\n")


def manifest_hash(directory: str | Path) -> str:
    """SHA-256 of a stage's manifest.json: the identity later stages record for their input."""
    return sha256_file(Path(directory) / MANIFEST)


def load_manifest(directory: str | Path, kind: str) -> dict[str, Any]:
    """Read `directory/manifest.json`, checking it is a manifest of `kind` ('corpus', 'packed')."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MinilabError(f"{directory}: no {MANIFEST} here; is this a minilab {kind} directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinilabError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if data.get("kind") != f"minilab.{kind}":
        raise MinilabError(f"{path}: not a {kind} manifest (kind={data.get('kind')!r})")
    return data


def verify_corpus(corpus_dir: str | Path) -> dict[str, Any]:
    """Load a corpus manifest and check every shard's SHA-256; returns the manifest."""
    corpus_dir = Path(corpus_dir)
    manifest = load_manifest(corpus_dir, "corpus")
    for shard in manifest["shards"]:
        path = corpus_dir / shard["file"]
        if not path.is_file():
            raise MinilabError(f"{path}: shard listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != shard["sha256"]:
            raise MinilabError(f"{path}: SHA-256 {actual[:12]}… differs from the manifest's "
                               f"{shard['sha256'][:12]}…; the shard changed after it was written "
                               "(rebuild the corpus)")
    return manifest


def iter_corpus(corpus_dir: str | Path, manifest: dict[str, Any] | None = None) -> Iterator[str]:
    """Stream document texts from a corpus, shard by shard in manifest order."""
    corpus_dir = Path(corpus_dir)
    manifest = manifest or load_manifest(corpus_dir, "corpus")
    for shard in manifest["shards"]:
        with open_text(corpus_dir / shard["file"]) as f:
            for line in f:
                yield json.loads(line)["text"]


class ShardWriter:
    """Write documents into shards of bounded size inside `directory` (already a temp dir).

    A shard is closed once it holds `max_bytes` of uncompressed JSON; its SHA-256 is taken from
    the file as written, so the manifest describes exactly the bytes on disk.
    """

    def __init__(self, directory: Path, max_bytes: int = 64 << 20, compression: str = "none"):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.suffix = {"none": ".jsonl", "gzip": ".jsonl.gz", "zstd": ".jsonl.zst"}[compression]
        self.shards: list[dict[str, Any]] = []
        self._f: IO | None = None
        self._bytes = self._docs = self._chars = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            name = f"shard-{len(self.shards):05d}{self.suffix}"
            self._name, self._f = name, open_text(self.directory / name, "wt")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self._f.write(line)
        self._bytes += len(line.encode("utf-8"))
        self._docs += 1
        self._chars += len(record["text"])
        if self._bytes >= self.max_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._f is None:
            return
        self._f.close()
        path = self.directory / self._name
        self.shards.append({"file": self._name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                            "documents": self._docs, "characters": self._chars})
        self._f, self._bytes, self._docs, self._chars = None, 0, 0, 0

    def close(self) -> list[dict[str, Any]]:
        self._close_shard()
        return self.shards


def text_sha256(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))
