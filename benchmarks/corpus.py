"""Benchmark `minilab corpus` throughput (MB/s), peak RSS and near-duplicate recall/precision.

    python benchmarks/corpus.py [--size-mb 100] [--workers 2] [--repeats 1] [--baseline-pythonpath DIR]
    taskset -c 0,1 python benchmarks/corpus.py --workers 2   # as on a 2-core machine

Generates a synthetic JSON Lines file of --size-mb with planted duplicates (edited copies of
earlier documents, ~5% of words changed, and some exact copies), runs `minilab corpus` from this
tree (and, with --baseline-pythonpath, from another tree, interleaved run by run) in a fresh
process each time, and prints one JSON line: MB/s (input bytes over wall time, start-up
included; the median of --repeats, and the best, which is less disturbed by other load on a
shared machine), peak RSS (summed over the run and its worker processes, which
counts their shared pages more than once; PSS, which shares them out; and the RSS of the largest
single process), recall (planted
duplicates dropped) and precision (duplicate drops that were planted), and the speed ratio to the
baseline. Needs psutil.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOP = ["the", "of", "and", "to", "with", "that", "have", "be", "in", "a", "is", "it", "for", "as", "on"]


def make_jsonl(path: Path, size_mb: float, seed: int = 0, dup_share: float = 0.1,
               unicode_share: float = 0.0) -> dict[int, int]:
    """Write ~size_mb of JSONL ({"text", "id"}) to `path`; returns {duplicate id: original id}.
    `unicode_share` of the original documents hold non-ASCII text (curly quotes, accents), which
    takes the slower cleaning path (ftfy) instead of the ASCII one."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz"[:20]) for _ in range(rng.randint(3, 9)))
             for _ in range(30000)]
    weights = [1 / (i + 10) for i in range(len(vocab))]  # Zipf-like, flattened at the top
    target = int(size_mb * 1e6)
    planted: dict[int, int] = {}
    originals: list[str] = []
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        while written < target:
            if originals and rng.random() < dup_share:
                j = rng.randrange(len(originals))
                words = originals[j].split()
                if rng.random() < 0.8:  # near duplicate: ~5% of the words replaced
                    for k in rng.sample(range(len(words)), max(1, len(words) // 20)):
                        words[k] = rng.choice(vocab)
                text = " ".join(words)
                planted[i] = j
            else:
                n = rng.randint(250, 650)
                words = rng.choices(vocab, weights, k=n)
                for k in range(0, n, 3):
                    words[k] = rng.choice(STOP)
                if rng.random() < unicode_share:
                    for k in range(1, n, 40):
                        words[k] = rng.choice(["“" + words[k] + "”", words[k] + "é", "naïve", "café", "’s"])
                text = " ".join(words).capitalize() + "."
                originals.append(text)
            line = json.dumps({"text": text, "id": i}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return planted


def peak_memory(proc: subprocess.Popen, interval: float = 0.05) -> tuple[float, float, float]:
    """Wait for `proc`; peaks, in MiB, sampled every `interval` seconds, of the summed RSS of it and
    all its descendants (workers included; shared pages counted in each), of their summed PSS
    (shared pages split between them; Linux) and of the RSS of the largest single process."""
    import psutil

    root = psutil.Process(proc.pid)
    peak_sum = peak_pss = peak_one = 0
    while proc.poll() is None:
        rss, pss = [], []
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, AttributeError):  # exited meanwhile; no PSS here
                rss.append(p.memory_info().rss)
                pss.append(p.memory_full_info().pss)
        peak_sum, peak_pss = max(peak_sum, sum(rss)), max(peak_pss, sum(pss))
        peak_one = max(peak_one, max(rss, default=0))
        time.sleep(interval)
    return peak_sum / 2**20, peak_pss / 2**20, peak_one / 2**20


def run_corpus(pythonpath: str, source: Path, out: Path, workers: int | None) -> dict:
    """One `minilab corpus` run in a fresh process: seconds, peak memory, and its manifest."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "minilab", "corpus", "--source", str(source), "--output-dir", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": pythonpath}
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        rss_sum, pss_sum, rss_one = peak_memory(proc)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed; see {out.with_suffix('.log')}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "rss_sum": rss_sum, "pss_sum": pss_sum, "rss_one": rss_one,
            "manifest": manifest, "out": out}


def recall_precision(run: dict, n_docs: int, planted: dict[int, int]) -> tuple[float, float]:
    """Share of planted duplicates dropped, and share of duplicate drops that were planted."""
    kept = set()
    for shard in run["manifest"]["shards"]:
        with open(run["out"] / shard["file"], encoding="utf-8") as f:
            kept.update(int(json.loads(line)["where"].rsplit(":", 1)[1]) - 1 for line in f)
    dropped = set(range(n_docs)) - kept
    drops = run["manifest"]["dropped"]
    n_dup_drops = drops.get("near_duplicate", 0) + drops.get("exact_duplicate", 0)
    hits = len(dropped & planted.keys())
    return hits / max(1, len(planted)), hits / max(1, n_dup_drops)


def summarise(runs: list[dict], size: int, n_docs: int, planted: dict[int, int]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    recall, precision = recall_precision(best, n_docs, planted)
    median = statistics.median(r["seconds"] for r in runs)
    fastest = best["seconds"]
    return {"seconds": round(median, 2), "mb_per_s": round(size / 1e6 / median, 2),
            "best_mb_per_s": round(size / 1e6 / fastest, 2),
            "peak_rss_mb": round(max(r["rss_sum"] for r in runs), 1),
            "peak_pss_mb": round(max(r["pss_sum"] for r in runs), 1),
            "peak_rss_largest_process_mb": round(max(r["rss_one"] for r in runs), 1),
            "kept": best["manifest"]["documents_kept"], "dropped": best["manifest"]["dropped"],
            "recall": round(recall, 4), "precision": round(precision, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=100.0, help="synthetic input size (default 100)")
    ap.add_argument("--unicode-share", type=float, default=0.5,
                    help="share of documents with non-ASCII text, as real text has (default 0.5; 0: all "
                         "ASCII, the fast path)")
    ap.add_argument("--workers", type=int, default=None, help="--workers for this tree (default: its default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tree, interleaved; the median counts")
    ap.add_argument("--baseline-pythonpath", help="src/ of another minilab tree to compare with")
    ap.add_argument("--workdir", help="where to keep the input and outputs (default: a temporary folder)")
    a = ap.parse_args()
    root = Path(a.workdir or tempfile.mkdtemp(prefix="minilab-corpus-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"synthetic-{a.size_mb:g}mb-u{a.unicode_share:g}.jsonl"
    planted_file = source.with_suffix(".planted.json")
    if not planted_file.is_file():  # the same size and seed make the same file: reuse it
        planted = make_jsonl(source, a.size_mb, unicode_share=a.unicode_share)
        planted_file.write_text(json.dumps(planted))
    planted = {int(k): v for k, v in json.loads(planted_file.read_text()).items()}
    size = source.stat().st_size
    with open(source, "rb") as f:
        n_docs = sum(1 for _ in f)
    here = str(Path(__file__).resolve().parents[1] / "src")
    trees = {"this": (here, a.workers)}
    if a.baseline_pythonpath:
        trees["baseline"] = (a.baseline_pythonpath, None)  # an older tree may not know --workers
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(a.repeats):
        for name, (path, workers) in trees.items():
            runs[name].append(run_corpus(path, source, root / f"out-{name}-{i}", workers))
    result = {"size_mb": round(size / 1e6, 1), "unicode_share": a.unicode_share, "documents": n_docs,
              "planted_duplicates": len(planted), "load_average": round(os.getloadavg()[0], 1),
              "cpus": len(os.sched_getaffinity(0)), "workers": a.workers, "repeats": a.repeats,
              **summarise(runs["this"], size, n_docs, planted)}
    if "baseline" in runs:
        base = summarise(runs["baseline"], size, n_docs, planted)
        result["baseline"] = base
        result["speedup_vs_baseline"] = round(base["seconds"] / result["seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
