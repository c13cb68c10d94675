"""`minilab corpus` at speed: the numpy MinHash against datasketch, the ASCII and ftfy shortcuts
against the general paths, the worker pool (same output for any count), progress, and the
multi-machine recipe (per-shard runs, then one global pass)."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from test_data_corpus import edit, prose

from minilab.cli import main as cli_main
from minilab.data.clean import QualityConfig, QualityFilter, clean_text
from minilab.data.corpus import CorpusConfig, run
from minilab.data.dedup import DedupConfig, Deduplicator
from minilab.data.shards import iter_corpus, verify_corpus
from minilab.data.sources import SourceConfig
from minilab.errors import MinilabError


def _datasketch_dedup(texts: list[str], threshold: float) -> list[bool]:
    """The previous implementation (datasketch MinHash LSH, same banding and confirmation): kept?"""
    from datasketch import MinHash, MinHashLSH

    from minilab.data.dedup import normalise

    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.15), num_perm=128, weights=(0.2, 0.8))
    sigs, kept = [], []
    for t in texts:
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([w.encode() for w in set(normalise(t).split())])
        dup = any(m.jaccard(sigs[c]) >= threshold for c in lsh.query(m))
        if not dup:
            lsh.insert(len(sigs), m)
            sigs.append(m)
        kept.append(not dup)
    return kept


def test_near_dup_recall_and_precision_match_datasketch():
    """Planted copies with 2% or 5% of words edited (Jaccard about 0.96 and 0.9) and with 30% edited
    (about 0.55, not duplicates): the numpy MinHash finds as many duplicates as datasketch did and
    no more false ones. (Pairs within a few hundredths of the threshold go either way in both: a
    128-permutation estimate has a standard deviation of about 0.03.)"""
    rng = random.Random(11)
    originals = [prose(rng, 300) for _ in range(300)]
    copies = [edit(rng, originals[i], rng.choice([0.02, 0.05, 0.3])) for i in range(300)]
    texts = originals + copies

    def words(t):
        return set(t.lower().replace(".", "").split())

    truth = [False] * 300 + [len(words(c) & words(o)) / len(words(c) | words(o)) >= 0.8
                             for c, o in zip(copies, originals, strict=True)]
    d = Deduplicator(DedupConfig(threshold=0.8))
    ours = [d.check(t) is None for t in texts]
    theirs = _datasketch_dedup(texts, 0.8)

    def recall_precision(kept):
        dropped = [not k for k in kept]
        tp = sum(a and b for a, b in zip(dropped, truth, strict=True))
        return tp / sum(truth), tp / max(1, sum(dropped))

    (r_ours, p_ours), (r_ds, p_ds) = recall_precision(ours), recall_precision(theirs)
    assert all(ours[:300]), "distinct documents are all kept"
    assert sum(truth) > 150 and r_ours >= r_ds - 0.02 and r_ours >= 0.97, (r_ours, r_ds)
    assert p_ours >= p_ds - 0.02 and p_ours >= 0.97, (p_ours, p_ds)


def test_lsh_bands_are_datasketchs_optimum():
    from datasketch.lsh import _optimal_param

    from minilab.data.dedup import lsh_bands

    for threshold, num_perm in ((0.65, 128), (0.3, 64), (0.85, 256), (0.5, 16)):
        assert lsh_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.2, 0.8)


def test_fingerprints_from_another_process_give_the_same_answers():
    """check_fingerprint with fingerprints computed elsewhere answers as check(text) does."""
    import pickle

    from minilab.data.dedup import fingerprint

    rng = random.Random(12)
    originals = [prose(rng, 150) for _ in range(40)]
    texts = originals + [edit(rng, t) for t in originals[:10]] + [originals[3]] + ["Ünïcode wörds " * 20]
    cfg = DedupConfig()
    direct = Deduplicator(cfg)
    via = Deduplicator(cfg)
    a = [direct.check(t) for t in texts]
    b = [via.check_fingerprint(pickle.loads(pickle.dumps(fingerprint(t, cfg)))) for t in texts]
    assert a == b and a.count("near_duplicate") == 10 and a.count("exact_duplicate") == 1


def test_ascii_fast_paths_equal_the_general_ones(monkeypatch):
    """clean_text and the quality rules take shortcuts for ASCII text; they must give what ftfy, NFC
    and the per-character rules give (forced here by making every text look non-ASCII)."""
    from minilab.data import clean

    rng = random.Random(13)
    alphabet = list("ab cd  E\t\n\n\n\r&;#.…12 x_-") + ["&amp;", "\x1b[31m", "\x00", "\x0c", "   ", "\r\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += [prose(rng, 40) for _ in range(200)] + ["a1 22 333 b  \n\n\n c " * 8, "## ... 1 2 3 " * 10]
    texts += ["the of " + " ".join(rng.choice(["12", "x1", "a.", "--", "Of", "THE_x"]) for _ in range(20))
              for _ in range(300)]  # around the alphabetic-word and stop-word limits
    filters = [QualityFilter(QualityConfig(min_chars=1, min_words=1, language=lang)) for lang in (None, "en")]
    fast = [(clean_text(t), clean_text(t, fix_encoding=False)) for t in texts]
    fast_q = [[q.check(t) for t in texts] for q in filters]
    monkeypatch.setattr(clean, "_is_ascii", lambda text: False)
    assert fast == [(clean_text(t), clean_text(t, fix_encoding=False)) for t in texts]
    assert fast_q == [[q.check(t) for t in texts] for q in filters]
    assert {"alpha_word_ratio", "language", "repeated_2gram", None} <= set(fast_q[0] + fast_q[1])


def test_fixtext_equals_ftfy():
    """fixtext.fix_text runs ftfy's steps only where they can act: it must return exactly what
    ftfy.fix_text(text, normalization="NFC") returns, on mojibake (UTF-8 read as Latin-1,
    Windows-1252, MacRoman, Windows-1251, doubly), entities, ligatures, full-width text, curly
    quotes, line breaks, controls, surrogates, combining accents and random Unicode."""
    import ftfy

    from minilab.data import fixtext

    assert fixtext._FAST is not None  # the installed ftfy is the pipeline the shortcut was written for
    rng = random.Random(17)
    words = ["café", "naïve", "résumé", "Zürich", "São", "Ærø", "niño", "€5", "£3", "¿qué?", "¡sí!", "it’s",
             "“quoted”", "‘q’", "—", "–", "…", "œuvre", "×²", "°C", "µm", "Москва", "Ελλάδα", "東京", "ｆｕｌｌ",
             "ﬁne", "ﬂow", "e\u0301", "A\u030a", "\u00a0", "\u00ad", "\r\n", "\r", "\u2028", "\x85", "\x07", "\x1b[1m",
             "&amp;", "&eacute;", "&#x2019;", "<b>", "\ufeff", "\u200b", "\ud83d", "🙂", "the", "of", "and", "a", "x"]
    def mangle(t):
        enc = rng.choice(["latin-1", "cp1252", "mac_roman", "cp1251", "cp437"])
        t2 = t.encode("utf-8", "surrogatepass").decode(enc, errors="replace")
        return t2 if rng.random() < 0.8 else t2.encode("utf-8", "surrogatepass").decode("latin-1", "replace")
    texts = ['âœ” No problems', "ГўВЂВ.a", "&macr;\\_(ã\x83\x84)_/&macr;", "Ã© at the start", "x\nÃ  y",
             "Ã¢â‚¬â„¢"]
    for _ in range(4000):
        t = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        t = "\n".join([t] * rng.randint(1, 3)) if rng.random() < 0.2 else t
        texts.append(mangle(t) if rng.random() < 0.3 else t)
    texts += ["".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 40))) for _ in range(1000)]
    for t in texts:
        assert fixtext.fix_text(t) == ftfy.fix_text(t, normalization="NFC"), repr(t)
    assert sum(fixtext._may_need_ftfy(t) for t in texts) < len(texts)  # the shortcut is taken


def _mixed_sources(tmp_path, n=150):
    rng = random.Random(14)
    docs = [prose(rng, 60) for _ in range(n)]
    src = tmp_path / "src"
    src.mkdir()
    lines = docs + [edit(rng, docs[i]) for i in range(0, n, 7)] + [docs[3].upper()]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines) + "{broken\n")
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": prose(rng, 50)}) + "\n" for _ in range(60))
    return [SourceConfig(path=str(src / "a.jsonl"), weight=0.7),
            SourceConfig(path=str(src / "b.jsonl.gz"), weight=1.5, max_tokens=500)]


def test_output_is_identical_for_any_number_of_workers(tmp_path, monkeypatch):
    from minilab import parallel
    from minilab.data import corpus

    monkeypatch.setattr(corpus, "_CHUNK_DOCS", 16)  # many chunks, so 2 workers really share the work
    pools = []
    real_pool = parallel.worker_pool

    def spy(workers, *a, **k):
        pools.append(workers)
        return real_pool(workers, *a, **k)

    monkeypatch.setattr(parallel, "worker_pool", spy)
    sources = _mixed_sources(tmp_path)
    out = {}
    for workers in (1, 2):
        cfg = CorpusConfig(output_dir=str(tmp_path / f"w{workers}"), name="c", sources=sources, workers=workers,
                           quality=QualityConfig(min_chars=20, min_words=5), shard_max_bytes=8000)
        m = run(cfg)
        shards = {s["file"]: (tmp_path / f"w{workers}" / s["file"]).read_bytes() for s in m["shards"]}
        for key in ("created", "seconds"):
            m.pop(key)
        m["config"].pop("workers"), m["config"].pop("output_dir")
        out[workers] = (m, shards, (tmp_path / f"w{workers}" / "rejects.jsonl").read_text())
    assert pools == [2], "two workers run in a pool, one in this process"
    assert out[1] == out[2]
    m = out[1][0]
    assert len(out[1][1]) > 2 and m["dropped"]["near_duplicate"] > 5 and m["dropped"]["sampled_out"] > 10
    assert m["rejects"] == {"malformed JSON": 1}


def test_workers_flag_and_key(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": prose(random.Random(15), 60)}) + "\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["corpus", "--source", str(src), "--output-dir", str(tmp_path / "o"), "--workers", "-1"])
    assert e.value.code == 2 and "--workers: must be ≥ 0, got -1" in capsys.readouterr().err
    assert cli_main(["corpus", "--source", str(src), "--output-dir", str(tmp_path / "o"), "--set", "workers=3",
                     "--set", "quality.min_chars=20", "--set", "quality.min_words=5"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["workers"] == 3
    assert cli_main(["corpus", "--source", str(src), "--output-dir", str(tmp_path / "p"), "--set", "workers=-2"]) != 0
    err = capsys.readouterr().err
    assert "workers" in err and "Traceback" not in err


def test_progress_shows_mb_per_second_and_eta_of_the_input_bytes(tmp_path, monkeypatch, capsys):
    from minilab.data import corpus
    from minilab.progress import ByteProgress

    monkeypatch.setattr(ByteProgress, "quiet_s", 0.0)  # a log file gets lines once a run takes a while
    monkeypatch.setattr(corpus, "_CHUNK_DOCS", 16)
    rng = random.Random(16)
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_text("".join(json.dumps({"text": prose(rng, 80)}) + "\n" for _ in range(200)))
    with gzip.open(packed, "wt") as f:
        f.writelines(json.dumps({"text": prose(rng, 80)}) + "\n" for _ in range(40))
    total = plain.stat().st_size + packed.stat().st_size
    assert cli_main(["corpus", "--source", str(plain), "--source", str(packed), "--output-dir",
                     str(tmp_path / "o"), "--workers", "1", "--set", "quality.min_chars=20"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("corpus ")]
    assert len(lines) >= 5 and all(" MB/s " in ln and " ETA " in ln for ln in lines), lines
    assert lines[-1].startswith(f"corpus {total / 1e6:.1f}/{total / 1e6:.1f} MB ") and "240 docs" in lines[-1]
    done = [float(ln.split()[1].split("/")[0]) for ln in lines]
    assert done == sorted(done) and all(f"/{total / 1e6:.1f} MB" in ln for ln in lines)


def test_per_shard_runs_then_a_global_pass_over_their_shards(tmp_path):
    """The multi-machine recipe (docs/stages/01-corpus.md): each input shard is its own `minilab
    corpus` run, and one more run with the glob of their shards as source removes the duplicates
    that crossed shards."""
    rng = random.Random(17)
    docs = [prose(rng, 80) for _ in range(60)]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:30]))
    crossing = [edit(rng, t) for t in docs[:10]] + [docs[12]]  # copies of part 0's text in part 1
    (raw / "part-1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[30:] + crossing))
    q = ["--set", "quality.min_chars=20", "--set", "quality.min_words=5"]
    for i in range(2):
        assert cli_main(["corpus", "--source", str(raw / f"part-{i}.jsonl"), "--output-dir",
                         str(tmp_path / "parts" / f"part-{i}"), "--compression", "zstd", *q]) == 0
    assert sum(json.loads((tmp_path / "parts" / f"part-{i}" / "manifest.json").read_text())["documents_kept"]
               for i in range(2)) == 71  # each part alone has no duplicates
    assert cli_main(["corpus", "--source", str(tmp_path / "parts" / "*" / "shard-*.jsonl*"), "--output-dir",
                     str(tmp_path / "merged"), *q]) == 0
    m = verify_corpus(tmp_path / "merged")
    assert m["documents_kept"] == 60 and m["dropped"] == {"near_duplicate": 10, "exact_duplicate": 1}
    assert sorted(iter_corpus(tmp_path / "merged")) == sorted(docs)
    assert [f["format"] for f in m["sources"][0]["files"]] == ["jsonl", "jsonl"]


def test_a_dead_worker_stops_the_run_in_one_line():
    """With multiprocessing.Pool a killed worker's task was never answered: the run hung forever."""
    from minilab.parallel import ordered_map, worker_pool

    with worker_pool(2, int) as pool:
        assert list(ordered_map(pool, abs, [-1, -2, 3], 2)) == [1, 2, 3]
        with pytest.raises(MinilabError, match="worker process died"):
            list(ordered_map(pool, os._exit, [3, 4, 5], 2))
