"""Exact and near-duplicate detection.

Exact: a SHA-256 of the text with case, punctuation and whitespace normalised away, so copies that
differ only in formatting count as the same document. Near: MinHash signatures of word-shingle
sets indexed by LSH bands; a document whose estimated Jaccard similarity with an already kept one
reaches the threshold is dropped. LSH only proposes candidates; each is confirmed against the
signature estimate so the threshold means what it says.

The work is split in two so it can run in parallel: `fingerprint(text)` (normalise, hash,
MinHash) depends on the text alone and runs in any process, while `Deduplicator.check_fingerprint`
keeps the index, whose answers depend on the order documents arrive in, in one place. The
MinHash (`minhash`) is computed as a few numpy operations per document; the LSH banding is
datasketch's optimum for the threshold, and recall and precision on planted near duplicates
match datasketch's MinHash LSH (tests/test_data_corpus.py).

Memory grows with the number of kept documents (16 bytes each for exact dedup, and num_perm
4-byte hash values plus one entry per LSH band for near dedup), not with their length.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from minilab.config import SEED

_NORM = re.compile(r"[\W_]+", re.UNICODE)
_SHIFT = np.uint64(32)
_U64_MAX = np.uint64((1 << 64) - 1)
_BLOCK = 2048  # shingles hashed per numpy operation: bounds the temporary array for huge documents
_SIG_ROWS = 4096  # signatures stored per block of the index


@dataclass
class DedupConfig:
    exact: bool = field(default=True, metadata={"help": "drop exact duplicates (normalised text)"})
    near: bool = field(default=True, metadata={"help": "drop near-duplicates with MinHash LSH"})
    threshold: float = field(default=0.8, metadata={"help": "Jaccard similarity at which a document is a "
                                                            "near-duplicate"})
    num_perm: int = field(default=128, metadata={
        "help": "MinHash permutations (accuracy vs speed; LSH needs at least 8)", "min": 8})
    # Word sets (1-word shingles) by default: with k-word shingles each edited word breaks k
    # shingles, so a copy with 5% of its words changed has Jaccard ≈ 0.9 at k=1 but only ≈ 0.82
    # at k=2 and ≈ 0.74 at k=3, and would slip under a 0.8 threshold. Distinct texts share far
    # fewer word types than that (≈ 0.2-0.4 between chapters of one novel).
    shingle_words: int = field(default=1, metadata={
        "help": "words per shingle (1 catches copies with ~5% of words edited at threshold 0.8)", "min": 1})
    seed: int = field(default=1, metadata={"help": "MinHash seed (fixed so runs are repeatable)", **SEED})


# ASCII letters lower-cased, digits kept, every other ASCII byte a space: `normalise` for ASCII text.
_ASCII_NORM = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 else 32
                    for c in range(256))


def normalise(text: str) -> str:
    """Lower case, words separated by one space, punctuation, underscores and whitespace gone."""
    return " ".join(_NORM.sub(" ", text.lower()).split())


def _normalised_words(text: str) -> list[bytes]:
    """The words of `normalise(text)` as UTF-8, by byte translation when the text is ASCII."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_NORM).split()
    return normalise(text).encode("utf-8").split()


def exact_key(text: str) -> bytes:
    return _key(_normalised_words(text))


def _key(words: list[bytes]) -> bytes:
    return hashlib.sha256(b" ".join(words)).digest()[:16]


class Fingerprint(NamedTuple):
    """What the index needs of one document: its exact key and MinHash signature (None when off)."""

    key: bytes | None
    minhash: np.ndarray | None


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of each permutation: random 64-bit integers, a odd, fixed by the seed."""
    gen = np.random.default_rng(seed)
    a = gen.integers(0, 1 << 64, num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    return a, gen.integers(0, 1 << 64, num_perm, dtype=np.uint64, endpoint=False)


def minhash(shingles: set[bytes], num_perm: int, seed: int) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of a set of byte strings.

    Each permutation is a multiply-shift hash of the shingle's CRC-32, `(a*h + b) mod 2**64`
    keeping the top 32 bits (Dietzfelbinger et al.): no division, so one document's
    shingles x permutations are a few numpy operations.
    """
    a, b = _permutations(num_perm, seed)
    hv = np.fromiter(map(zlib.crc32, shingles), dtype=np.uint64, count=len(shingles))
    low = np.full(num_perm, _U64_MAX, dtype=np.uint64)
    for i in range(0, len(hv), _BLOCK):
        x = np.multiply.outer(hv[i:i + _BLOCK], a)  # wraps around mod 2**64, as intended
        x += b
        np.minimum(low, x.min(axis=0), out=low)
    return (low >> _SHIFT).astype(np.uint32)  # the shift keeps order, so it is taken after the minimum


def fingerprint(text: str, cfg: DedupConfig) -> Fingerprint:
    """A document's exact key and MinHash, from its text alone (safe to compute in a worker)."""
    words = _normalised_words(text)
    key = _key(words) if cfg.exact else None
    if not cfg.near:
        return Fingerprint(key, None)
    n = cfg.shingle_words
    shingles = set(words) if n == 1 else {b" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    return Fingerprint(key, minhash(shingles, cfg.num_perm, cfg.seed))


@lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.2, fn_weight: float = 0.8) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted false positive and negative probability of
    LSH at `threshold` (datasketch's `_optimal_param`, integrated numerically without scipy)."""
    s = np.linspace(0.0, 1.0, 4001)
    best, opt = float("inf"), (0, 0)
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1, dtype=np.float64)[:, None]
        p = 1 - (1 - s ** rows) ** bands  # probability that a pair of similarity s becomes a candidate
        fp = np.trapezoid(np.where(s <= threshold, p, 0), s, axis=1)
        fn = np.trapezoid(np.where(s >= threshold, 1 - p, 0), s, axis=1)
        err = fp * fp_weight + fn * fn_weight
        i = int(np.argmin(err))
        if err[i] < best:
            best, opt = float(err[i]), (bands, i + 1)
    return opt


class Deduplicator:
    """Stateful filter: `check(text)` (or `check_fingerprint(fingerprint(text, cfg))`) ->
    'exact_duplicate', 'near_duplicate' or None (keep)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._seen: set[bytes] = set()
        self._kept = 0
        if cfg.near:
            # Band for a lower threshold than asked and weight recall over precision: candidates are
            # confirmed against the signature estimate below, so an extra candidate costs one
            # comparison while a missed one keeps a duplicate (band collisions are all-or-nothing,
            # so pairs just above the threshold are otherwise missed a fair share of the time).
            bands, rows = lsh_bands(max(0.3, cfg.threshold - 0.15), cfg.num_perm)
            self._ranges = [(4 * i * rows, 4 * (i + 1) * rows) for i in range(bands)]  # in signature bytes
            self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
            self._sigs: list[np.ndarray] = []

    def fingerprint(self, text: str) -> Fingerprint:
        return fingerprint(text, self.cfg)

    def check(self, text: str) -> str | None:
        return self.check_fingerprint(self.fingerprint(text))

    def _signature(self, i: int) -> np.ndarray:
        return self._sigs[i // _SIG_ROWS][i % _SIG_ROWS]

    def check_fingerprint(self, fp: Fingerprint) -> str | None:
        if self.cfg.exact and fp.key in self._seen:
            return "exact_duplicate"
        if self.cfg.near:
            sig = fp.minhash
            raw = sig.tobytes()
            # A band is keyed by the hash of its bytes: an int takes less memory than the bytes, and
            # a collision (1 in 2**64) only proposes one more candidate, which the signature refutes.
            keys = [hash(raw[lo:hi]) for lo, hi in self._ranges]
            seen: set[int] = set()
            for table, k in zip(self._tables, keys, strict=True):
                hit = table.get(k)
                for cand in (() if hit is None else (hit,) if isinstance(hit, int) else hit):
                    if cand in seen:
                        continue
                    seen.add(cand)
                    if np.count_nonzero(self._signature(cand) == sig) / len(sig) >= self.cfg.threshold:
                        return "near_duplicate"
            for table, k in zip(self._tables, keys, strict=True):
                hit = table.get(k)
                if hit is None:
                    table[k] = self._kept  # one id, the common case, without a list per entry
                elif isinstance(hit, int):
                    table[k] = [hit, self._kept]
                else:
                    hit.append(self._kept)
            if self._kept % _SIG_ROWS == 0:
                self._sigs.append(np.empty((_SIG_ROWS, len(sig)), dtype=np.uint32))
            self._sigs[-1][self._kept % _SIG_ROWS] = sig
        if self.cfg.exact:
            self._seen.add(fp.key)
        self._kept += 1
        return None
