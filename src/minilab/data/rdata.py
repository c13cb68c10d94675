"""A minimal reader for R's serialization format and lazy-load databases (`Rdata.rdb/.rdx`).

Enough of R's XDR serialization (`serialize()` version 2 and 3) to read the data an R package
ships: vectors, character strings, lists, pairlists with attributes and references. Used to read
Jane Austen's novels out of Debian's `r-cran-janeaustenr` without R installed. R closures,
environments and bytecode are read structurally but not interpreted.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

_NIL, _REF, _GLOBALENV, _UNBOUND, _MISSING, _BASENS, _EMPTYENV, _BASEENV = 254, 255, 253, 252, 251, 247, 242, 241
_SPECIAL = {_NIL: None, _GLOBALENV: "<globalenv>", _UNBOUND: "<unbound>", _MISSING: "<missing>",
            _BASENS: "<basenamespace>", _EMPTYENV: "<emptyenv>", _BASEENV: "<baseenv>"}
_PAIRLIST_TYPES = {2, 3, 5, 6, 17}  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP


class RFormatError(ValueError):
    """The bytes are not R serialization this reader understands."""


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise RFormatError("not R XDR serialization (expected 'X\\n')")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            n = self.int()  # native encoding name (read n first: `pos += int()` would lose 4 bytes)
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in _SPECIAL:
            return _SPECIAL[t]
        if t == _REF:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP: a name, remembered for later references
            sym = self.item()
            self.refs.append(sym)
            return sym
        if t in _PAIRLIST_TYPES:
            return self._pairlist(has_attr, has_tag)
        if t == 4:  # ENVSXP
            env: dict[str, Any] = {}
            self.refs.append(env)
            self.int()  # locked
            env.update(enclos=self.item(), frame=self.item(), hashtab=self.item(), attrib=self.item())
            return env
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        value = self._vector(t)
        if has_attr:
            attrs = self.item()
            if isinstance(value, list) and isinstance(attrs, dict) and "names" in attrs:
                value = dict(zip(attrs["names"], value, strict=False))
        return value

    def _vector(self, t: int) -> Any:
        n = self.length()
        if t in (10, 13):  # LGLSXP, INTSXP
            vals = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
            return vals
        if t == 14:  # REALSXP
            vals = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
            return vals
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            return [self.item() for _ in range(n)]
        if t == 24:  # RAWSXP
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw
        raise RFormatError(f"unsupported R type {t}")

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        """A pairlist as {tag: value} (untagged cells get their position as key)."""
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out[tag if isinstance(tag, str) else str(len(out))] = self.item()
            flags = self.int()
            t = flags & 0xFF
            if t == _NIL:
                return out
            if t not in _PAIRLIST_TYPES:  # a CDR that is not a pairlist cell: read it as a value
                self.pos -= 4
                out[str(len(out))] = self.item()
                return out
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes) -> Any:
    """Python value of R-serialized bytes (character vectors become lists of str, etc.)."""
    try:
        return _Reader(data).item()
    except (struct.error, IndexError) as e:
        raise RFormatError(f"truncated R data: {e}") from None


def _decompress(blob: bytes) -> bytes:
    """An .rdb entry: 4-byte length then zlib, or length + type byte ('2' bzip2, 'Z' xz, '0' none)."""
    body = blob[4:]
    if body[:1] in (b"2", b"Z", b"0") and body[1:2] != b"\x9c":
        import bz2
        import lzma

        kind, body = body[:1], body[1:]
        return {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[kind](body)
    return zlib.decompress(body)


def read_lazyload_db(prefix: str | Path) -> dict[str, Any]:
    """Every variable of a lazy-load database `prefix.rdb` / `prefix.rdx` (e.g. `data/Rdata`)."""
    prefix = Path(prefix)
    index = unserialize(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (start, size) in index["variables"].items():
        out[name] = unserialize(_decompress(rdb[start:start + size]))
    return out
