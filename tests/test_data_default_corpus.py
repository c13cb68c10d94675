"""The built-in default corpus: .deb unpacking, R lazy-load reading and chapter splitting.

No download here: the test builds a miniature `r-cran-janeaustenr` .deb (R serialization written
by hand below) and hands it to the fetcher in place of `apt-get download`.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib

from minilab.data import default_corpus
from minilab.data.clean import QualityConfig
from minilab.data.corpus import CorpusConfig, run
from minilab.data.dedup import DedupConfig
from minilab.data.rdata import unserialize
from minilab.data.sources import SourceConfig


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _chars(s: str) -> bytes:
    b = s.encode()
    return _i(9 | (1 << 15)) + _i(len(b)) + b  # CHARSXP, UTF-8 flag


def _strsxp(items: list[str]) -> bytes:
    return _i(16) + _i(len(items)) + b"".join(_chars(x) for x in items)


def _named_list(d: dict[str, bytes]) -> bytes:
    """VECSXP with a names attribute (as R writes a named list)."""
    body = _i(19 | (1 << 9)) + _i(len(d)) + b"".join(d.values())
    names_attr = _i(2 | (1 << 10)) + _i(1) + _chars("names") + _strsxp(list(d)) + _i(254)
    return body + names_attr


def _serialize(obj: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + obj


def _make_deb(path, novels: dict[str, list[str]]) -> None:
    rdb, variables = b"", {}
    for name, lines in novels.items():
        raw = _serialize(_strsxp(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = _i(13) + _i(2) + _i(len(rdb)) + _i(len(blob))
        rdb += blob
    rdx = gzip.compress(_serialize(_named_list({"variables": _named_list(variables),
                                                "references": _named_list({}), "compressed": _i(10) + _i(1) + _i(1)})))

    def tar(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for n, data in files.items():
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = {"debian-binary": b"2.0\n", "control.tar.xz": tar({"./control": b"Package: x\nVersion: 9.9-1\n"}),
               "data.tar.xz": tar({"./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb": rdb,
                                   "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdx": rdx})}
    out = b"!<arch>\n"
    for n, data in members.items():
        out += f"{n + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    path.write_bytes(out)


def _novel(title: str, n_chapters: int) -> list[str]:
    lines = [title.upper(), "", "By Jane Austen", ""]
    for c in range(1, n_chapters + 1):
        lines += [f"CHAPTER {c}", ""]
        for p in range(4):
            lines += [f"It is a truth of chapter {c} paragraph {p} in {title}, that the people", "with a good "
                      "fortune have to walk about the garden with their friends and be merry.", ""]
    return lines


def test_rdata_reads_strings_and_named_lists():
    assert unserialize(_serialize(_strsxp(["a", "é"]))) == ["a", "é"]
    assert unserialize(_serialize(_named_list({"x": _strsxp(["1"])}))) == {"x": ["1"]}


def test_default_corpus_from_generated_deb(tmp_path, monkeypatch):
    novels = {k: _novel(t, 3) for k, t in default_corpus.NOVELS.items()}

    def fake_download(dest):
        _make_deb(dest / "r-cran-janeaustenr_9.9-1_all.deb", novels)
        return dest / "r-cran-janeaustenr_9.9-1_all.deb"

    monkeypatch.setattr(default_corpus, "_download_deb", fake_download)
    docs = list(default_corpus.iter_default())
    assert len(docs) == 6 * 4  # title page + 3 chapters per novel
    text, where = docs[1]
    assert text.startswith("CHAPTER 1\n\nIt is a truth of chapter 1 paragraph 0") and where.endswith(".txt:5")
    assert "the people with a good fortune" in text  # wrapped lines re-joined
    prov = json.loads((default_corpus.cache_dir() / "provenance.json").read_text())
    assert prov["debian_version"] == "9.9-1" and "public domain" in prov["license"]
    loose = QualityConfig(max_duplicate_5gram_ratio=1.0, max_top_2gram_ratio=1.0)  # the fake text repeats
    m = run(CorpusConfig(output_dir=str(tmp_path / "c"), sources=[SourceConfig(path="default")], quality=loose,
                         dedup=DedupConfig(near=False)))  # fake chapters share their vocabulary
    src = m["sources"][0]
    assert m["documents_kept"] == 18 and src["name"].startswith("default") and len(src["files"]) == 6
    card = (tmp_path / "c" / "DATACARD.md").read_text()
    assert "r-cran-janeaustenr 9.9-1" in card and "public domain" in card
