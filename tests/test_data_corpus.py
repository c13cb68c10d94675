"""`minilab corpus`: sources, cleaning, quality filters, dedup, bad input, manifest and data card."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from minilab.cli import main as cli_main
from minilab.data.clean import QualityConfig, QualityFilter, clean_text
from minilab.data.corpus import CorpusConfig, run
from minilab.data.dedup import DedupConfig, Deduplicator
from minilab.data.shards import iter_corpus, verify_corpus
from minilab.data.sources import SourceConfig, strip_wikitext
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
        assert "empty corpus" in str(e) and "unreadable" in str(e)
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
