"""Exact and near-duplicate detection.

Exact: a SHA-256 of the text with case, punctuation and whitespace normalised away, so copies that
differ only in formatting count as the same document. Near: MinHash signatures of word-shingle
sets indexed in a MinHash LSH (`datasketch`); a document whose estimated Jaccard similarity with
an already kept one reaches the threshold is dropped. LSH only proposes candidates; each is
confirmed against the signature estimate so the threshold means what it says.

Memory grows with the number of kept documents (16 bytes each for exact dedup, and num_perm
hash values plus the LSH bands for near dedup), not with their length.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from minilab.config import SEED

_NORM = re.compile(r"[\W_]+", re.UNICODE)


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


def normalise(text: str) -> str:
    return " ".join(_NORM.sub(" ", text.lower()).split())


def exact_key(text: str) -> bytes:
    return hashlib.sha256(normalise(text).encode("utf-8")).digest()[:16]


class Deduplicator:
    """Stateful filter: `check(text)` -> 'exact_duplicate', 'near_duplicate' or None (keep)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._seen: set[bytes] = set()
        self._lsh = None
        self._kept = 0
        if cfg.near:
            from datasketch import MinHashLSH

            # Band for a lower threshold than asked and weight recall over precision: candidates are
            # confirmed against the signature estimate below, so an extra candidate costs one
            # comparison while a missed one keeps a duplicate (band collisions are all-or-nothing,
            # so pairs just above the threshold are otherwise missed a fair share of the time).
            lsh_threshold = max(0.3, cfg.threshold - 0.15)
            self._lsh = MinHashLSH(threshold=lsh_threshold, num_perm=cfg.num_perm, weights=(0.2, 0.8))
            self._sigs: dict[int, object] = {}

    def _minhash(self, text: str):
        from datasketch import MinHash

        words = normalise(text).split()
        n = self.cfg.shingle_words
        shingles = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def check(self, text: str) -> str | None:
        if self.cfg.exact:
            key = exact_key(text)
            if key in self._seen:
                return "exact_duplicate"
        if self._lsh is not None:
            m = self._minhash(text)
            for cand in self._lsh.query(m):
                if m.jaccard(self._sigs[cand]) >= self.cfg.threshold:
                    return "near_duplicate"
            self._lsh.insert(self._kept, m)
            self._sigs[self._kept] = m
        if self.cfg.exact:
            self._seen.add(key)
        self._kept += 1
        return None
