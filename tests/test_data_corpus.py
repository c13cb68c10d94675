"""`minilab corpus`: sources, cleaning, quality filters, dedup, bad input, manifest and data card."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import random

import pytest

from minilab.cli import main as cli_main
from minilab.data import sources
from minilab.data.clean import QualityConfig, QualityFilter, clean_text
from minilab.data.corpus import CorpusConfig, run
from minilab.data.dedup import DedupConfig, Deduplicator
from minilab.data.readers import strip_wikitext
from minilab.data.shards import iter_corpus, verify_corpus
from minilab.data.sources import SourceConfig
from minilab.errors import MinilabError

_rng = random.Random(7)
VOCAB = ["".join(_rng.choice("abcdefghijklmnoprstuvw") for _ in range(_rng.randint(3, 8))) for _ in range(2000)]
STOP = ["the", "of", "and", "to", "with", "that", "have", "be"]


def prose(rng: random.Random, n_words: int = 120) -> str:
    """Distinct English-looking text: random vocabulary words mixed with stop words."""
    words = [rng.choice(STOP) if rng.random() < 0.3 else rng.choice(VOCAB) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def edit(rng: random.Random, text: str, fraction: float = 0.05) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def cfg_for(tmp_path, *sources, **kw) -> CorpusConfig:
    quality = QualityConfig(min_chars=20, min_words=5)
    return CorpusConfig(output_dir=str(tmp_path / "out"), sources=[SourceConfig(path=str(s)) for s in sources],
                        quality=quality, **kw)


def test_clean_text_repairs_and_tidies():
    assert clean_text("cafÃ©  au\u00a0lait\x07 \r\n\r\n\r\n\r\nnext\ufeff ") == "café au lait\n\nnext"
    assert clean_text("e\u0301") == "\u00e9"  # NFC


def test_quality_rules_name_their_reason():
    q = QualityFilter(QualityConfig(min_chars=20, min_words=5))
    rng = random.Random(1)
    assert q.check(prose(rng)) is None
    assert q.check("too short") == "too_short"
    assert q.check("1234 5678 9012 3456 7890 1234 5678 and the numbers") == "digit_ratio"
    assert q.check("#tag #tag2 #tag3 #tag4 #tag5 of the words with") == "symbol_ratio"
    assert q.check("\n".join(["same line here"] * 5 + ["other line is here"])) == "duplicate_lines"
    assert q.check("buy now " * 30) == "repeated_2gram"
    en = QualityFilter(QualityConfig(min_chars=20, min_words=5, language="en"))
    assert en.check("Ceci est une phrase tout en français sans mots anglais") == "language"


def test_near_duplicates_removed_distinct_kept():
    rng = random.Random(3)
    originals = [prose(rng, 200) for _ in range(100)]
    near = [edit(rng, t, 0.05) for t in originals[:30]]  # 5% of words changed
    d = Deduplicator(DedupConfig(threshold=0.8))
    kept_orig = [d.check(t) is None for t in originals]
    dup_reasons = [d.check(t) for t in near]
    assert all(kept_orig), "distinct documents must all be kept"
    assert dup_reasons == ["near_duplicate"] * 30
    assert d.check(originals[5].upper() + "!!") == "exact_duplicate"  # case/punctuation normalised


def test_corpus_end_to_end_manifest_datacard(tmp_path):
    rng = random.Random(4)
    docs = [prose(rng) for _ in range(40)]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:20])))
    for i, t in enumerate(docs[20:30]):
        (src / f"doc{i}.txt").write_text(t)
    with gzip.open(src / "b.jsonl.gz", "wt") as f:  # 10 new + 5 near-dups + 1 exact dup
        for t in docs[30:] + [edit(rng, t) for t in docs[:5]] + [docs[7]]:
            f.write(json.dumps({"text": t}) + "\n")
    m = run(cfg_for(tmp_path, src, compression="zstd", shard_max_bytes=3000))
    out = tmp_path / "out"
    assert m["documents_read"] == 46 and m["documents_kept"] == 40
    assert m["dropped"] == {"near_duplicate": 5, "exact_duplicate": 1}
    assert verify_corpus(out)["shards"] == m["shards"] and len(m["shards"]) > 1
    assert all(s["file"].endswith(".jsonl.zst") for s in m["shards"])
    assert sorted(iter_corpus(out)) == sorted(docs)
    files = m["sources"][0]["files"]
    assert len(files) == 12 and all(len(f["sha256"]) == 64 for f in files)
    card = (out / "DATACARD.md").read_text()
    assert "near_duplicate: 5" in card and "b.jsonl.gz" in card
    assert not (out / "rejects.jsonl").exists()
    with pytest.raises(MinilabError, match="already exists"):
        run(cfg_for(tmp_path, src))


def _bad_inputs(d):
    rng = random.Random(5)
    d.mkdir()
    good = prose(rng)
    (d / "a.jsonl").write_text(json.dumps({"text": good}) + "\n{not json\n")
    (d / "f.jsonl").write_text(json.dumps({"text": good}) + "\n\n" + json.dumps({"body": "x"}) + "\n")
    (d / "b.txt").write_bytes(b"valid first line of text\n\xff\xfe broken bytes\n")
    (d / "c.bin").write_bytes(b"\x00\x01\x02binary" * 100)
    (d / "d.xml").write_text("<docs><doc>" + prose(rng) + "</doc><doc>unclosed</docs>")
    (d / "e.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": prose(rng)}) + "\n").encode() * 50)[:300])
    return d


@pytest.mark.parametrize("name,reason,line", [
    ("a.jsonl", "malformed JSON", 2), ("f.jsonl", "missing field 'text'", 3), ("b.txt", "invalid UTF-8", 2),
    ("c.bin", "binary file", 1), ("d.xml", "malformed XML", 1), ("e.jsonl.gz", "truncated or corrupt", None)])
def test_bad_input_rejected_with_file_line_or_strict(tmp_path, name, reason, line):
    d = _bad_inputs(tmp_path / "in")
    cfg = cfg_for(tmp_path, d / name)
    cfg.sources[0].record_tag = "doc"
    try:
        run(cfg)
        rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    except MinilabError as e:  # nothing usable left: the empty-result error also counts the rejects
        assert "empty corpus" in str(e) and "input problem" in str(e) and "rejects.jsonl" not in str(e)
        rejects = None
    if rejects is not None:
        hit = [r for r in rejects if reason in r["reason"]]
        assert hit and hit[0]["where"].startswith(str(d / name))
        if line:
            assert hit[0]["where"] == f"{d / name}:{line}"
    cfg.strict, cfg.output_dir = True, str(tmp_path / "strict")
    with pytest.raises(MinilabError) as e:
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"{d / name}:" in msg and reason in msg
    assert not (tmp_path / "strict").exists()


def test_empty_result_is_error_and_cli_one_line(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("tiny")
    rc = cli_main(["corpus", "--source", str(tmp_path / "x.txt"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "empty corpus after filtering (too_short 1" in err
    assert not (tmp_path / "o").exists()


def test_xml_mediawiki_and_analyze_only(tmp_path, capsys):
    rng = random.Random(6)
    body = prose(rng)
    (tmp_path / "wiki.xml").write_text(
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><page><title>A</title><ns>0</ns>'
        f"<revision><text>'''Bold''' [[Target|label]] {{{{Infobox|x={{{{y}}}}}}}}{body}<ref>cite</ref></text>"
        "</revision></page><page><title>Talk:A</title><ns>1</ns><revision><text>talk page words here "
        "</text></revision></page></mediawiki>")
    rc = cli_main(["corpus", "--source", str(tmp_path / "wiki.xml"), "--analyze-only",
                   "--set", "quality.min_chars=20", "--set", "quality.min_words=5"])
    assert rc == 0 and "1 of 1 documents kept" in capsys.readouterr().out
    assert strip_wikitext("'''Bold''' [[Target|label]] {{T|{{n}}}}x<ref>c</ref>") == "Bold label x"
    image = "[[File:Map.png|thumb|A map of [[France|the country]] in 1900]]"
    assert strip_wikitext(f"__NOTOC__A&nbsp;B &amp; [[Paris]] {image}rest") == "A\u00a0B & Paris rest"


def test_weights_and_budgets(tmp_path):
    rng = random.Random(8)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(40)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(10)))
    cfg = cfg_for(tmp_path, tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    cfg.sources[0].max_tokens = 500  # ~2000 chars: a handful of documents
    cfg.sources[1].weight = 2.0
    m = run(cfg)
    a, b = m["sources"]
    assert 1 <= a["documents_kept"] < 10 and a["characters_kept"] >= 2000
    assert b["documents_kept"] == 20


# --- formats known by content (issue 13) -------------------------------------------------------

_WIKI_HEAD = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="0.11" xml:lang="en">\n'
    "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n    <dbname>enwiki</dbname>\n"
    '    <namespaces>\n      <namespace key="0" case="first-letter" />\n'
    '      <namespace key="1" case="first-letter">Talk</namespace>\n    </namespaces>\n  </siteinfo>\n')


def _wiki_page(i: int, title: str, body: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'    <redirect title="{redirect}" />\n' if redirect else ""
    wikitext = (f"{{{{Infobox person|name={title}|born={{{{birth date|1900|1|1}}}}}}}}\n"
                f"'''{title}''' was [[Target page|a subject]] of note.&lt;ref&gt;{{{{cite web|url=x}}}}"
                f"&lt;/ref&gt;\n\n== Life ==\n{body}\n\n[[Category:Examples]]")
    return (f"  <page>\n    <title>{title}</title>\n    <ns>{ns}</ns>\n    <id>{i}</id>\n{red}"
            f"    <revision>\n      <id>{1000 + i}</id>\n      <timestamp>2024-05-01T00:00:00Z</timestamp>\n"
            "      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
            f'      <text bytes="{len(wikitext)}" xml:space="preserve">{wikitext}</text>\n'
            "      <sha1>abc</sha1>\n    </revision>\n  </page>\n")


def _wiki_dump(rng: random.Random, n: int = 6) -> tuple[list[str], list[str]]:
    """(parts of a realistic MediaWiki export: head, pages, tail), the article bodies kept."""
    bodies = [prose(rng) for _ in range(n)]
    pages = [_wiki_page(i, f"Article {i}", b) for i, b in enumerate(bodies)]
    pages.insert(2, _wiki_page(90, "Talk:Article 0", prose(rng), ns=1))
    pages.insert(4, _wiki_page(91, "Article Zero", "#REDIRECT [[Article 0]]", redirect="Article 0"))
    return [_WIKI_HEAD, *pages, "</mediawiki>\n"], bodies


@pytest.mark.parametrize("name,multistream", [
    ("enwiki-20240601-pages-articles1.xml-p10p30302.bz2", False),
    ("enwiki-20240601-pages-articles-multistream.xml.bz2", True),
    ("enwiki-latest-pages-articles.dump", False)])
def test_wikipedia_dump_read_as_articles_whatever_its_name(tmp_path, name, multistream):
    parts, bodies = _wiki_dump(random.Random(11))
    if multistream:  # Wikimedia's layout: the header, then streams of pages, then the footer
        streams = [parts[0], "".join(parts[1:4]), "".join(parts[4:-1]), parts[-1]]
        data = b"".join(bz2.compress(p.encode()) for p in streams)
    else:
        data = bz2.compress("".join(parts).encode())
    (tmp_path / name).write_bytes(data)
    m = run(cfg_for(tmp_path, tmp_path / name))
    texts = list(iter_corpus(tmp_path / "out"))
    assert m["documents_read"] == len(bodies) == len(texts)  # talk page and redirect skipped
    assert m["sources"][0]["files"][0]["format"] == "xml"  # the manifest says how each file was read
    for i, (text, body) in enumerate(zip(texts, bodies, strict=True)):
        assert text.startswith(f"Article {i} was a subject of note.") and body in text
        assert not any(mark in text for mark in ("<", "[[", "{{", "''", "==", "Category", "cite"))


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "none"])
def test_compression_known_by_magic_bytes_not_name(tmp_path, kind):
    import zstandard

    rng = random.Random(12)
    docs = [prose(rng) for _ in range(4)]
    raw = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()

    def zstd_two_frames(b: bytes) -> bytes:
        return zstandard.ZstdCompressor().compress(b[:300]) + zstandard.ZstdCompressor().compress(b[300:])

    pack = {"gzip": gzip.compress, "xz": lzma.compress, "none": bytes, "zstd": zstd_two_frames}
    (tmp_path / "records.bin").write_bytes(pack[kind](raw))
    assert run(cfg_for(tmp_path, tmp_path / "records.bin"))["documents_kept"] == 4
    assert sorted(iter_corpus(tmp_path / "out")) == sorted(docs)


@pytest.mark.parametrize("name,layout", [("articles", "jsonl"), ("articles.txt", "jsonl"),
                                         ("articles.ndjson", "jsonl"), ("articles.data", "array"),
                                         ("articles.txt.gz", "pretty-array"), ("bom.jsonl", "bom-jsonl")])
def test_json_lines_and_arrays_known_by_content(tmp_path, name, layout):
    rng = random.Random(13)
    docs = [prose(rng) for _ in range(5)]
    records = [{"text": t, "id": i} for i, t in enumerate(docs)]
    text = {"jsonl": "".join(json.dumps(r) + "\n" for r in records), "array": json.dumps(records),
            "pretty-array": json.dumps(records, indent=2),
            "bom-jsonl": "\ufeff" + "".join(json.dumps(r) + "\n" for r in records)}[layout]
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    m = run(cfg_for(tmp_path, path))
    assert m["documents_read"] == 5 and sorted(iter_corpus(tmp_path / "out")) == sorted(docs)


@pytest.mark.parametrize("name,compress", [("table.bin", False), ("table.parquet.gz", True)])
def test_parquet_known_by_content_even_compressed(tmp_path, name, compress):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(19)
    docs = [prose(rng) for _ in range(3)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / name).write_bytes(gzip.compress(data) if compress else data)
    assert run(cfg_for(tmp_path, tmp_path / name))["documents_kept"] == 3


def test_source_names_its_format_on_the_command_line(tmp_path, capsys):
    rng = random.Random(14)
    docs = [prose(rng) for _ in range(3)]
    path = tmp_path / "dump"  # a broken first record: the content alone says plain text
    path.write_text("{broken\n" + "".join(json.dumps({"body": t}) + "\n" for t in docs))
    base = ["corpus", "--analyze-only", "--set", "quality.min_chars=20", "--set", "quality.min_words=5"]
    assert cli_main([*base, "--source", f"jsonl:{path}", "--text-field", "body"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 documents kept" in out and "input problem (malformed JSON): 1" in out
    assert cli_main([*base, "--source", f"json:{path}", "--text-field", "body"]) == 0  # not an array
    assert "3 of 3 documents kept" in capsys.readouterr().out
    assert cli_main([*base, "--source", f"txt:{path}"]) == 0
    assert "1 of 1 documents kept" in capsys.readouterr().out
    src = SourceConfig(path=f"xml:{path}")
    assert (src.format, src.path) == ("xml", str(path))
    with pytest.raises(MinilabError, match="prefix says json"):
        SourceConfig(path=f"json:{path}", format="xml")


def test_one_huge_plain_text_document_says_which_format_was_assumed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "HUGE_DOCUMENT_CHARS", 2000)
    rng = random.Random(15)
    path = tmp_path / "export"  # JSON Lines with a broken first line: read as plain text
    path.write_text("{oops\n" + "".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(10)))
    cfg = cfg_for(tmp_path, path)
    cfg.quality.max_chars = 5000
    with caplog.at_level(logging.WARNING, logger="minilab.corpus"), pytest.raises(MinilabError) as e:
        run(cfg)
    assert f"{path}: read as plain text (nothing else recognised), one document of" in caplog.text
    msg = str(e.value)
    assert "(too_long 1)" in msg and "quality.max_chars" in msg and f"--source jsonl:{path}" in msg
    assert "quality.min_chars" not in msg and "\n" not in msg


def test_empty_source_path_is_refused_not_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "creds.txt").write_text("password hunter2 " * 50)
    for spec in ("", "jsonl:"):
        rc = cli_main(["corpus", "--source", spec, "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "sources[0].path" in err and "empty path" in err
        assert not (tmp_path / "o").exists()


def test_invalid_utf8_keeps_the_rest_of_the_file_and_names_the_offset(tmp_path):
    rng = random.Random(16)
    first, second = prose(rng), prose(rng)
    (tmp_path / "a.txt").write_bytes(first.encode() + b"\n" + b"caf\xe9 " + second.encode() + b"\n")
    run(cfg_for(tmp_path, tmp_path / "a.txt"))
    [text] = iter_corpus(tmp_path / "out")
    assert first in text and "caf\ufffd " + second in text
    [reject] = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["where"] == f"{tmp_path / 'a.txt'}:2"
    assert reject["reason"] == f"invalid UTF-8 replaced by U+FFFD: first at byte {len(first) + 1 + 3}"


def test_rejects_file_named_only_when_written(tmp_path, capsys):
    rng = random.Random(17)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": prose(rng)}) + "\n{bad\n")
    base = ["corpus", "--source", str(tmp_path / "a.jsonl"), "--set", "quality.min_chars=20",
            "--set", "quality.min_words=5"]
    assert cli_main([*base, "--analyze-only"]) == 0
    assert "rejects.jsonl" not in capsys.readouterr().out
    assert cli_main([*base, "--output-dir", str(tmp_path / "o")]) == 0
    assert f"listed in {tmp_path / 'o' / 'rejects.jsonl'}" in capsys.readouterr().out
    assert (tmp_path / "o" / "rejects.jsonl").is_file()
    (tmp_path / "b.jsonl").write_text("{bad\n" + json.dumps({"text": "tiny"}) + "\n")
    assert cli_main(["corpus", "--source", str(tmp_path / "b.jsonl"), "--output-dir", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "rejects.jsonl" not in err and not (tmp_path / "p").exists()
    assert f"1 input problem (malformed JSON 1; first at {tmp_path / 'b.jsonl'}:1: malformed JSON" in err


@pytest.mark.parametrize("docs,settings,reason,hint", [
    (["tiny"], {}, "too_short", "quality.min_chars"),
    (["Ceci est une phrase tout en français, écrite pour montrer comment le filtre rejette un texte "
      "sans aucun mot vide anglais"], {"language": "en"}, "language",
     "quality.language"),
    (["1234 5678 9012 3456 7890 1234 5678 and the numbers"], {}, "digit_ratio", "quality.max_digit_ratio")])
def test_empty_corpus_hint_matches_the_main_drop_reason(tmp_path, docs, settings, reason, hint):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = cfg_for(tmp_path, tmp_path / "a.jsonl")
    for k, v in settings.items():
        setattr(cfg.quality, k, v)
    with pytest.raises(MinilabError) as e:
        run(cfg)
    msg = str(e.value)
    assert f"({reason} 1)" in msg and f"dropped as {reason}: loosen {hint}" in msg
    others = {"quality.min_chars", "quality.language", "quality.max_digit_ratio"} - {hint}
    assert not any(o in msg for o in others)


def test_empty_corpus_of_sampled_out_documents_points_at_weight(tmp_path):
    rng = random.Random(18)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(3)))
    cfg = cfg_for(tmp_path, tmp_path / "a.jsonl")
    cfg.sources[0].weight = 1e-9
    with pytest.raises(MinilabError) as e:
        run(cfg)
    assert "(sampled_out 3)" in str(e.value) and "raise the sources' weight" in str(e.value)
    assert "quality." not in str(e.value)


def _sources(d, n=3):
    rng = random.Random(11)
    d.mkdir()
    for i in range(n):
        (d / f"s{i}.txt").write_text(prose(rng))
    return d


def test_force_replaces_only_a_previous_corpus(tmp_path, capsys):
    """--force replaced any path: a folder of the user's, the folder being read, a plain file."""
    src = _sources(tmp_path / "src")
    cli = ["corpus", "--source", str(src), "--set", "quality.min_chars=20", "--set", "quality.min_words=5", "--force"]
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.tex").write_text("years of work")
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    for out, why in ((important, "has no minilab marker"), (src, "which this run reads"), (plain, "is a file")):
        assert cli_main([*cli, "--output-dir", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and str(out) in err and "Traceback" not in err
    assert (important / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in src.iterdir()) == ["s0.txt", "s1.txt", "s2.txt"]
    assert plain.read_text() == "keep me"
    # a folder holding the source (its parent) is refused as well, and so is one inside a source folder
    assert cli_main([*cli, "--output-dir", str(src / "corpus")]) == 1
    err = capsys.readouterr().err
    assert "lies inside the source folder" in err and err.count("\n") == 1 and not (src / "corpus").exists()
    assert cli_main([*cli, "--output-dir", str(tmp_path)]) == 1 and "which this run reads" in capsys.readouterr().err
    # a previous corpus, and an empty folder, are replaced
    out = tmp_path / "corpus"
    assert cli_main([*cli, "--output-dir", str(out)]) == 0
    (out / "stale.txt").write_text("from the older build")
    assert cli_main([*cli, "--output-dir", str(out)]) == 0
    assert not (out / "stale.txt").exists() and verify_corpus(out)["kind"] == "minilab.corpus"
    (tmp_path / "empty").mkdir()
    assert cli_main([*cli, "--output-dir", str(tmp_path / "empty")]) == 0
    # without --force an existing output is never touched
    assert cli_main([*cli[:-1], "--output-dir", str(out)]) == 1 and "pass --force" in capsys.readouterr().err
