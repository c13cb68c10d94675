"""Small data the tests build themselves (no downloads): a corpus, a tokenizer, packed tokens."""

from __future__ import annotations

import random
from pathlib import Path

from minilab.data.shards import ShardWriter
from minilab.fsutil import write_json_atomic

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "another", "dog", "ran", "far", "away", "into",
         "green", "hills", "and", "rivers", "people", "often", "speak", "about", "weather", "gardens",
         "music", "books", "rain", "sunshine", "bread", "coffee"]


def make_corpus(path: Path, n_docs: int = 60, seed: int = 0, words=WORDS) -> Path:
    """A corpus directory in the on-disk format `minilab corpus` writes (shards + manifest)."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    w = ShardWriter(path, max_bytes=4000)
    for i in range(n_docs):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + f". Document {i}."
        w.write({"text": text})
    write_json_atomic(path / "manifest.json", {"kind": "minilab.corpus", "shards": w.close()})
    return path


def make_packed(root: Path, *, n_docs: int = 200, vocab_size: int = 300, seq_len: int = 32) -> dict[str, Path]:
    """corpus -> tokenizer -> packed data under `root`; returns their directories."""
    from minilab.data.pack import PackConfig
    from minilab.data.pack import run as pack_run
    from minilab.data.tokenizer import TokenizerConfig
    from minilab.data.tokenizer import run as tok_run

    corpus = make_corpus(root / "corpus", n_docs=n_docs)
    tok_run(TokenizerConfig(output_dir=str(root / "tok"), corpus_dir=str(corpus), vocab_size=vocab_size,
                            model_max_length=seq_len))
    pack_run(PackConfig(corpus_dir=str(corpus), tokenizer_dir=str(root / "tok"), output_dir=str(root / "packed"),
                        seq_len=seq_len, val_fraction=0.1, workers=1))
    return {"corpus": corpus, "tokenizer": root / "tok", "packed": root / "packed"}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped: a leftover named with it is stale."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
