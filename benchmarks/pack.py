"""Benchmark `minilab pack` against raw `tokenizers` encode_batch, and its memory growth.

    python benchmarks/pack.py [--docs 2000] [--workers 2] [--memory]

Builds a synthetic corpus (or uses --corpus-dir), trains a small tokenizer once, then in the same
run measures (1) raw `Tokenizer.encode_batch` over the same texts with the same number of worker
processes and (2) `minilab.data.pack.run` end to end (reading shards, hashing, writing .bin/.idx).
The overhead is pack's time over the raw encoder's. `--memory` packs 1x and 10x the corpus in
fresh processes and reports their peak RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minilab.data import pack as packmod
from minilab.data.shards import ShardWriter, iter_corpus
from minilab.data.tokenizer import TokenizerConfig
from minilab.data.tokenizer import run as train_tokenizer
from minilab.fsutil import write_json_atomic


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    path.mkdir(parents=True)
    w = ShardWriter(path, max_bytes=8 << 20)
    for _ in range(n_docs):
        w.write({"text": " ".join(rng.choice(vocab) for _ in range(rng.randint(200, 800))) + "."})
    write_json_atomic(path / "manifest.json", {"kind": "minilab.corpus", "shards": w.close()})
    return path


def raw_encode(corpus: Path, tok_path: str, workers: int, batch: int) -> tuple[int, float]:
    """Tokens and seconds for plain encode_batch over the corpus texts (same worker setup as pack)."""
    t0 = time.perf_counter()
    texts = list(iter_corpus(corpus))
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    if workers <= 1:
        packmod._init_worker(tok_path)
        n = sum(len(ids) for b in batches for ids in packmod._encode(b))
    else:
        with mp.get_context("forkserver").Pool(workers, packmod._init_worker, (tok_path,)) as pool:
            n = sum(len(ids) for out in pool.imap(packmod._encode, batches) for ids in out)
    return n, time.perf_counter() - t0


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS (MiB) of the command and its workers, measured in a fresh wrapper process: this
    process's RUSAGE_CHILDREN is a max over every child so far, so it could not report a smaller peak."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS at 1x and 10x input")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="minilab-bench-"))
    corpus = make_corpus(root / "corpus", a.docs)
    train_tokenizer(TokenizerConfig(output_dir=str(root / "tok"), corpus_dir=str(corpus), vocab_size=8192,
                                    sample_chars=2_000_000))
    tok_path = str(root / "tok" / "tokenizer.json")
    n_raw, t_raw = raw_encode(corpus, tok_path, a.workers, a.batch)
    t0 = time.perf_counter()
    m = packmod.run(packmod.PackConfig(corpus_dir=str(corpus), tokenizer_dir=str(root / "tok"),
                                       output_dir=str(root / "packed"), workers=a.workers, batch_docs=a.batch))
    t_pack = time.perf_counter() - t0
    n_pack = sum(s["tokens"] - s["documents"] for s in m["splits"].values())  # minus the eos tokens
    result = {"docs": a.docs, "workers": a.workers, "tokens": n_raw,
              "raw_encode_tokens_per_s": round(n_raw / t_raw), "pack_tokens_per_s": round(n_pack / t_pack),
              "pack_overhead_pct": round(100 * (t_pack / t_raw - 1), 1)}
    if a.memory:
        # Same word distribution (same seed), 10x the documents: a corpus with another vocabulary would
        # measure the tokenizer's word cache on unseen words, not pack's growth with input size.
        big = make_corpus(root / "corpus10", a.docs * 10, seed=0)
        rss = {}
        for name, c in (("1x", corpus), ("10x", big)):
            rss[name] = peak_rss_mb([sys.executable, "-m", "minilab", "pack", "--corpus-dir", str(c),
                                     "--tokenizer-dir", str(root / "tok"), "--output-dir", str(root / f"p{name}"),
                                     "--workers", str(a.workers)])
        result.update(peak_rss_mb_1x=round(rss["1x"], 1), peak_rss_mb_10x=round(rss["10x"], 1),
                      rss_growth_pct=round(100 * (rss["10x"] / rss["1x"] - 1), 1))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
