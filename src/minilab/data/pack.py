"""`minilab pack`: tokenize a corpus and pack it into flat token files for pretraining.

Output (`data/packed/<name>/`):
  train.bin / val.bin   every document's tokens followed by eos, concatenated (uint16 when the
                        vocabulary fits, else uint32), read later as a numpy memmap
  train.idx / val.idx   uint64 document start offsets into the .bin, plus the final length
  manifest.json         tokenizer fingerprint, corpus manifest hash, tokens per split, dtype,
                        seq_len, seed, and the SHA-256 of every file written

Documents go to train or val as whole documents (no leakage of a document across splits), by a
seeded draw over document indices, so the split is reproducible. Tokenization runs in worker
processes on batches (`encode_batch`) and results are written as they arrive, so memory stays
flat whatever the corpus size. Reading and checking packed data (`open_split`, `check_packed`,
`check_tokenizer_match`) is `minilab.data.packed`, shared by every stage that reads it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilab.config import SEED
from minilab.data.packed import SPLITS, token_dtype
from minilab.errors import MinilabError
from minilab.fsutil import atomic_dir, sha256_file, write_json_atomic
from minilab.stage import Stage

log = logging.getLogger("minilab.pack")

@dataclass
class PackConfig:
    """How to tokenize and pack a corpus."""

    corpus_dir: str = field(metadata={"help": "corpus directory (from `minilab corpus`)"})
    tokenizer_dir: str = field(metadata={"help": "tokenizer directory (from `minilab tokenizer`)"})
    output_dir: str = field(metadata={"help": "directory to write the packed data into"})
    seq_len: int = field(default=1024, metadata={"help": "training sequence length (tokens)", "min": 1})
    val_fraction: float = field(default=0.01, metadata={
        "help": "share of documents held out (pretraining evaluates on them, so more than 0)", "gt": 0, "lt": 1})
    seed: int = field(default=1234, metadata={"help": "seed of the train/val document split", **SEED})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0 = all CPU cores)", "min": 0})
    batch_docs: int = field(default=256, metadata={"help": "documents per encode_batch call", "min": 1})
    force: bool = field(default=False, metadata={"help": "replace an existing output directory"})


def _val_mask(n_docs: int, fraction: float, seed: int):
    """Boolean mask of the documents held out for validation (at least one when fraction > 0)."""
    import numpy as np

    mask = np.zeros(n_docs, dtype=bool)
    if fraction > 0 and n_docs > 1:
        n_val = min(n_docs - 1, max(1, round(n_docs * fraction)))
        mask[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask


# Worker state: each process loads the tokenizer once, not once per batch.
_TOK = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOK
    from minilab.tokenization import load_tokenizer

    _TOK = load_tokenizer(tokenizer_path, verify=False)  # `run` checked it before starting the workers


def _encode(batch: list[str]) -> list[list[int]]:
    return [e.ids for e in _TOK.encode_batch(batch, add_special_tokens=False)]


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_stream(texts: Iterator[str], tokenizer_path: str, workers: int,
                  batch_docs: int) -> Iterator[list[int]]:
    """Token ids of each text, in order, encoded in `workers` processes (1 = in this process)."""
    from minilab.parallel import ordered_map, worker_pool

    # Workers use one tokenizer thread each: N processes x N Rayon threads would oversubscribe.
    if workers > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with worker_pool(workers, _init_worker, (tokenizer_path,)) as pool:
        # At most 2 batches per worker in flight, results taken in order.
        for ids in ordered_map(pool, _encode, _batches(texts, batch_docs), 2 * workers):
            yield from ids


def _write_splits(tmp: Path, cfg: PackConfig, eos_id: int, dtype, n_docs: int) -> dict[str, Any]:
    """Stream every document's tokens (+eos) into train/val .bin files and their .idx offsets."""
    import numpy as np

    from minilab.data.shards import iter_corpus
    from minilab.parallel import resolve_workers

    val = _val_mask(n_docs, cfg.val_fraction, cfg.seed)
    bins = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115 - closed below
    idxs = {s: open(tmp / f"{s}.idx", "wb") for s in SPLITS}  # noqa: SIM115
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    workers = resolve_workers(cfg.workers)
    tok_path = str(Path(cfg.tokenizer_dir) / "tokenizer.json")
    try:
        for i, ids in enumerate(encode_stream(iter_corpus(cfg.corpus_dir), tok_path, workers, cfg.batch_docs)):
            split = "val" if i < n_docs and val[i] else "train"
            c = counts[split]
            np.array([c["tokens"]], dtype=np.uint64).tofile(idxs[split])
            ids.append(eos_id)  # eos marks the document boundary inside packed windows
            np.asarray(ids, dtype=dtype).tofile(bins[split])
            c["tokens"] += len(ids)
            c["documents"] += 1
        for s in SPLITS:
            np.array([counts[s]["tokens"]], dtype=np.uint64).tofile(idxs[s])
    finally:
        for f in (*bins.values(), *idxs.values()):
            f.close()
    return counts


def run(cfg: PackConfig) -> dict[str, Any]:
    """Pack `cfg.corpus_dir` with `cfg.tokenizer_dir`; returns the written manifest."""
    from minilab.data.shards import manifest_hash, verify_corpus
    from minilab.owned import check_output
    from minilab.tokenization import EOS_TOKEN, encoding_fingerprint, load_tokenizer, read_tokenizer_meta

    out = Path(cfg.output_dir)
    check_output(out, cfg.force, {"packed"}, reading=(cfg.corpus_dir, cfg.tokenizer_dir))
    corpus = verify_corpus(cfg.corpus_dir)
    tok_meta = read_tokenizer_meta(cfg.tokenizer_dir)
    tok = load_tokenizer(cfg.tokenizer_dir, verify=False)  # read_tokenizer_meta just checked it
    eos = tok_meta.get("eos_token", EOS_TOKEN)
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise MinilabError(f"{cfg.tokenizer_dir}: eos token {eos!r} is not in the vocabulary")
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    n_docs = sum(s["documents"] for s in corpus["shards"])
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        counts = _write_splits(tmp, cfg, eos_id, dtype, n_docs)
        if counts["train"]["tokens"] < cfg.seq_len + 1:
            raise MinilabError(f"{cfg.corpus_dir}: only {counts['train']['tokens']} training tokens, fewer "
                               f"than one sequence of seq_len {cfg.seq_len} + 1; use more text or a "
                               "shorter --seq-len")
        if 0 < counts["val"]["tokens"] < cfg.seq_len + 1:
            log.warning("validation split has only %d tokens (< seq_len + 1)", counts["val"]["tokens"])
        splits = {s: {**counts[s], "bin_sha256": sha256_file(tmp / f"{s}.bin"),
                      "idx_sha256": sha256_file(tmp / f"{s}.idx")} for s in SPLITS}
        manifest = {
            "kind": "minilab.packed", "tokenizer_sha256": tok_meta["sha256"],
            "tokenizer_encoding_sha256": encoding_fingerprint(cfg.tokenizer_dir),
            "tokenizer_dir": str(cfg.tokenizer_dir), "vocab_size": vocab, "eos_id": eos_id,
            "corpus_dir": str(cfg.corpus_dir), "corpus_manifest_sha256": manifest_hash(cfg.corpus_dir),
            "dtype": dtype.__name__, "seq_len": cfg.seq_len, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "splits": splits,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    dt = time.perf_counter() - t0
    total = sum(c["tokens"] for c in counts.values())
    log.info("packed %d tokens in %.1fs (%.0f tokens/s): train %d, val %d", total, dt, total / max(dt, 1e-9),
             counts["train"]["tokens"], counts["val"]["tokens"])
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import add_config_flags, flag

    flag(p, "--corpus-dir", help="corpus directory (from `minilab corpus`)")
    flag(p, "--tokenizer-dir", help="tokenizer directory (from `minilab tokenizer`)")
    flag(p, "--output-dir", help="where to write train/val .bin/.idx and manifest.json")
    flag(p, "--seq-len", type=int, help="sequence length (default 1024)")
    flag(p, "--val-fraction", type=float, help="share of documents for validation (default 0.01)")
    p.add_argument("--seed", type=int, help="seed of the train/val split (default 1234)")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_config_flags(p, "Keys: those of PackConfig (corpus_dir, tokenizer_dir, output_dir, seq_len, ...).")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    cfg = config_from_args(PackConfig, args, flags={
        "corpus_dir": args.corpus_dir, "tokenizer_dir": args.tokenizer_dir, "output_dir": args.output_dir,
        "seq_len": args.seq_len, "val_fraction": args.val_fraction, "seed": args.seed,
        "workers": args.workers, "force": args.force})
    m = manifest = run(cfg)
    print(f"packed into {cfg.output_dir}: train {m['splits']['train']['tokens']:,} tokens, "
          f"val {manifest['splits']['val']['tokens']:,} tokens ({m['dtype']}, seq_len {m['seq_len']})")
    return 0


# ---- the recipe stage ---------------------------------------------------------------------------
def _estimate(ctx: Any, cfg: PackConfig) -> dict[str, Any]:
    import json

    m = Path(cfg.corpus_dir) / "manifest.json"
    if m.is_file():
        tokens = int(json.loads(m.read_text(encoding="utf-8")).get("approx_tokens", 0))
        return {"disk": tokens * 2, "memory": None, "note": f"~{tokens:,} tokens x 2 bytes"}
    return {"disk": None, "memory": None, "note": "known once the corpus exists"}


STAGE = Stage(
    "pack", PackConfig, run=run, estimate=_estimate, output_facts=("seq_len",),
    metric=lambda r, cfg: f"{r['splits']['train']['tokens']:,} train / {r['splits']['val']['tokens']:,} val tokens")
