"""A weighted, deterministic, resumable reader over several packed datasets.

Each packed split is cut into non-overlapping windows of `seq_len + 1` tokens (window i starts
at token i*seq_len, so consecutive windows share one token: the last target of one is the first
input of the next and no token is wasted). Sample k of the global stream comes from dataset
`choice(k)`, drawn with the given weights from a seeded generator in blocks of `_BLOCK` steps, and
is that dataset's next window in a seeded per-epoch permutation. Everything is a function of
(seed, k), so:

* the stream is identical for a seed, whatever the number of ranks;
* rank r of `world_size` takes samples k ≡ r (mod world_size): ranks read disjoint windows
  and together read exactly what one process would;
* `state_dict()` is a few integers, and `load_state_dict()` resumes at exactly the next sample.

A dataset that runs out starts a new epoch with a fresh permutation, so small datasets are
repeated in proportion to their weight; `realised_mix()` reports what was actually read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minilab.errors import ConfigError, MinilabError

log = logging.getLogger("minilab.mixture")

_BLOCK = 4096  # dataset choices drawn per generator call (cheap; recomputed exactly on resume)


class WeightedMixture:
    """Iterate (input, target) int64 arrays of length `seq_len` from weighted packed datasets."""

    def __init__(self, packed_dirs: Sequence[str | Path], weights: Sequence[float] | None, seq_len: int,
                 seed: int, split: str = "train", rank: int = 0, world_size: int = 1,
                 tokenizer_sha256: str | None = None):
        from minilab.data.packed import check_tokenizer_match, open_split

        self.dirs = [str(d) for d in packed_dirs]
        if not self.dirs:
            raise ConfigError("no packed datasets given", key="data")
        weights = list(weights) if weights is not None else [1.0] * len(self.dirs)
        if len(weights) != len(self.dirs) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"need one non-negative weight per dataset with a positive sum, got {weights}",
                              key="weights")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}", key="rank")
        # Datasets packed with different tokenizers cannot be mixed, nor fed to another tokenizer's model.
        self.tokenizer_sha256 = check_tokenizer_match(self.dirs, tokenizer_sha256)
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.rank, self.world_size = rank, world_size
        self.probs = np.asarray(weights, dtype=np.float64) / sum(weights)
        self._tokens = []
        self.n_windows = []
        for d in self.dirs:
            tokens, _offsets, _manifest = open_split(d, split)
            n = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
            if n == 0 and self.probs[len(self._tokens)] > 0:
                raise MinilabError(f"{d}: split '{split}' has {len(tokens)} tokens, fewer than one window "
                                   f"of seq_len {seq_len} + 1")
            self._tokens.append(tokens)
            self.n_windows.append(n)
        self.step = 0  # next global sample index
        self.cursors = [0] * len(self.dirs)  # windows consumed per dataset, all ranks together
        self.counts = [0] * len(self.dirs)  # samples this rank yielded, per dataset
        self._choice_block: tuple[int, np.ndarray] | None = None
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # -- deterministic schedule ------------------------------------------------------------------
    def _choice(self, k: int) -> int:
        b = k // _BLOCK
        if self._choice_block is None or self._choice_block[0] != b:
            rng = np.random.default_rng([self.seed, 0x6D6978, b])
            self._choice_block = (b, rng.choice(len(self.dirs), size=_BLOCK, p=self.probs))
        return int(self._choice_block[1][k % _BLOCK])

    def _window(self, d: int, cursor: int) -> int:
        epoch, i = divmod(cursor, self.n_windows[d])
        key = (d, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != d}  # one epoch each
            rng = np.random.default_rng([self.seed, d, epoch])
            self._perm_cache[key] = rng.permutation(self.n_windows[d])
        return int(self._perm_cache[key][i])

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            k, d = self.step, self._choice(self.step)
            cursor = self.cursors[d]
            self.cursors[d] += 1
            self.step += 1
            if k % self.world_size != self.rank:
                continue  # another rank's sample: advance the schedule without reading it
            start = self._window(d, cursor) * self.seq_len
            window = np.asarray(self._tokens[d][start:start + self.seq_len + 1], dtype=np.int64)
            self.counts[d] += 1
            return window[:-1], window[1:]

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) stacked to shape (batch_size, seq_len)."""
        pairs = [next(self) for _ in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    # -- resume ----------------------------------------------------------------------------------
    def _round_end(self, step: int, cursors: list[int]) -> tuple[int, list[int]]:
        """`step` advanced (without reading) to the next multiple of world_size, with the cursors
        of the samples skipped over."""
        cursors = list(cursors)
        while step % self.world_size:
            cursors[self._choice(step)] += 1
            step += 1
        return step, cursors

    def state_dict(self) -> dict[str, Any]:
        """The schedule position, advanced to the next multiple of world_size.

        Rank r stops right after its own sample, so on its own it would record a position before
        the other ranks' samples of the same round; advancing (without reading) to the round's end
        makes the saved state the same on every rank, and any rank can resume from rank 0's file.
        """
        step, cursors = self._round_end(self.step, self.cursors)
        return {"step": step, "cursors": cursors, "counts": list(self.counts),
                "seed": self.seed, "seq_len": self.seq_len, "split": self.split, "datasets": self.dirs,
                "weights": self.probs.tolist(), "world_size": self.world_size, "rank": self.rank,
                "tokenizer_sha256": self.tokenizer_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at exactly the next sample; refuses a state from a different mixture.

        The schedule is one global sequence whatever the number of ranks (rank r reads samples
        r, r + world, ...), so a state saved by W ranks resumes under another number: the position
        moves on to the next multiple of the new world_size (skipping fewer than world_size
        samples) so that every rank starts the same round."""
        for key in ("seed", "seq_len", "split", "tokenizer_sha256"):
            if state.get(key) != getattr(self, key):
                raise MinilabError(f"cannot resume the data stream: saved {key}={state.get(key)!r} differs "
                                   f"from the current {getattr(self, key)!r}")
        if len(state["cursors"]) != len(self.dirs) or not np.allclose(state["weights"], self.probs):
            raise MinilabError("cannot resume the data stream: the datasets or weights changed")
        self.step, self.cursors = self._round_end(int(state["step"]), [int(c) for c in state["cursors"]])
        if state.get("world_size", self.world_size) != self.world_size:
            log.info("data stream saved by %s rank(s), resumed by %d: continuing at global sample %d",
                     state.get("world_size"), self.world_size, self.step)
        if state.get("rank") == self.rank and state.get("world_size") == self.world_size:
            self.counts = [int(c) for c in state.get("counts", self.counts)]

    def realised_mix(self) -> dict[str, dict[str, float]]:
        """Per dataset: target weight, samples this rank read, realised share, epochs seen."""
        total = sum(self.counts) or 1
        report = {d: {"weight": float(p), "samples": c, "share": c / total,
                      "epochs": self.cursors[i] / max(self.n_windows[i], 1)}
                  for i, (d, p, c) in enumerate(zip(self.dirs, self.probs, self.counts, strict=True))}
        log.info("data mix: %s", ", ".join(f"{Path(d).name} {r['share']:.1%} (target {r['weight']:.1%}, "
                                             f"{r['epochs']:.2f} epochs)" for d, r in report.items()))
        return report
