"""On-disk rows of tokenized fine-tuning examples, the datasets' manifests (tokenizer and chat
template checked) that SFT and DPO load alike, and the weighted, exactly resumable sampler.

A split is three NumPy files (loaded with `allow_pickle=False`, memory-mapped):
`{split}.ids.npy` (all token ids end to end), `{split}.mask.npy` (1 where the token is trained
on) and `{split}.offsets.npy` (row i is ids[offsets[i]:offsets[i+1]]). DPO data uses two such
arrays per split, `{split}.chosen.*` and `{split}.rejected.*`, row i of each forming pair i.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilab.errors import MinilabError, TokenizerMismatchError
from minilab.finetune.templates import IGNORE


def write_rows(directory: Path, prefix: str, rows: list[tuple[list[int], list[bool]]], vocab_size: int) -> dict:
    """Save rows under `directory/{prefix}.*.npy`; returns counts for the manifest."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for r, _ in rows for t in r), dtype=dtype, count=int(offsets[-1]))
    mask = np.fromiter((m for _, ms in rows for m in ms), dtype=np.uint8, count=int(offsets[-1]))
    for name, arr in (("ids", ids), ("mask", mask), ("offsets", offsets)):
        np.save(directory / f"{prefix}.{name}.npy", arr, allow_pickle=False)
    return {"rows": len(rows), "tokens": int(offsets[-1]), "target_tokens": int(mask.sum()),
            "max_row_tokens": int(lengths.max()) if len(rows) else 0}


class Rows:
    """Read-only rows of one split (memory-mapped)."""

    def __init__(self, directory: str | Path, prefix: str):
        directory = Path(directory)
        try:
            self.ids, self.mask, self.offsets = (
                np.load(directory / f"{prefix}.{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in ("ids", "mask", "offsets"))
        except FileNotFoundError as e:
            raise MinilabError(f"{directory}: missing {Path(e.filename).name}; rebuild the data") from None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.ids[a:b], dtype=np.int64), np.asarray(self.mask[a:b], dtype=bool)


def collate(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T-1): targets are the next tokens where trained on, else -100.
    Right padding: with causal attention, pads after a row never change its earlier positions."""
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids)
        x[b, :n] = torch.from_numpy(ids)
        y[b, :n] = torch.from_numpy(np.where(mask, ids, IGNORE))
    return x[:, :-1], y[:, 1:]


def load_data_manifest(directory: str | Path, kind: str) -> dict[str, Any]:
    from minilab.data.shards import load_manifest

    return load_manifest(directory, kind)


def check_data_tokenizer(dirs: list[str], kind: str, tokenizer_sha256: str) -> list[dict[str, Any]]:
    """Manifests of `dirs`; the blocking error when one was tokenized with another tokenizer."""
    manifests = []
    for d in dirs:
        m = load_data_manifest(d, kind)
        if m.get("tokenizer_sha256") != tokenizer_sha256:
            raise TokenizerMismatchError(
                f"Tokenizer mismatch between datasets: {d} was tokenized with tokenizer {m.get('tokenizer_sha256')} "
                f"but the model's tokenizer is {tokenizer_sha256}; rebuild it with --tokenizer-dir set to the "
                "model's tokenizer")
        manifests.append(m)
    return manifests


def load_datasets(data_dirs: list[str], tokenizer_sha: str, kind: str = "sft_data") -> tuple[list[dict], Any]:
    """Manifests of the datasets (tokenizer checked: the blocking error) and their shared template
    (SFT and DPO read their prepared data alike)."""
    from minilab.finetune.templates import ChatTemplate
    from minilab.tokenization import EOS_TOKEN

    manifests = check_data_tokenizer(data_dirs, kind, tokenizer_sha)
    t = manifests[0]["template"]
    for d, m in zip(data_dirs[1:], manifests[1:], strict=True):
        if m["template"]["jinja"] != t["jinja"]:
            raise MinilabError(f"{d} uses chat template '{m['template']['name']}' but {data_dirs[0]} uses "
                               f"'{t['name']}'; build every dataset with one template")
    tok_cfg = Path(manifests[0].get("tokenizer_dir", "")) / "tokenizer_config.json"
    eos = EOS_TOKEN
    if tok_cfg.is_file():
        import json

        eos = json.loads(tok_cfg.read_text(encoding="utf-8")).get("eos_token") or eos
    return manifests, ChatTemplate(t["name"], t["jinja"], t["end_token"], "",
                                   eos if isinstance(eos, str) else EOS_TOKEN)


def data_records(data_dirs: list[str]) -> list[dict[str, Any]]:
    """The datasets as the model manifest records them: absolute path and manifest hash."""
    from minilab.fsutil import sha256_file

    return [{"path": str(Path(d).resolve()), "manifest_sha256": sha256_file(Path(d) / "manifest.json")}
            for d in data_dirs]


class WeightedSampler:
    """An endless, exactly resumable stream of (dataset, row) picks from weighted datasets.

    Draw n picks its dataset from a generator seeded by (seed, n), and the k-th row drawn from
    dataset d is permutation(seed, d, epoch)[k % size]: the whole stream is a pure function of
    the counters, so the state is a few integers and a resumed run draws the same rows.
    Under torchrun, rank r keeps draws r, r + world, r + 2 world, ... The saved state is the
    position at the end of the round (the same on every rank), and a state resumes under another
    number of ranks at the next round of the new one.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int, rank: int = 0, world: int = 1):
        if any(n == 0 for n in sizes):
            raise MinilabError("a fine-tuning dataset has no training rows")
        w = np.asarray(weights if weights is not None else sizes, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise MinilabError("data_weights must be non-negative and not all zero")
        self.probs = w / w.sum()
        self.sizes, self.seed, self.rank, self.world = sizes, seed, rank, world
        self.n = 0
        self.counts = [0] * len(sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _row(self, d: int) -> int:
        k = self.counts[d]
        self.counts[d] += 1
        epoch, i = divmod(k, self.sizes[d])
        if (d, epoch) not in self._perms:
            self._perms = {(d2, e): p for (d2, e), p in self._perms.items() if d2 != d}
            self._perms[(d, epoch)] = np.random.default_rng([self.seed, d, epoch]).permutation(self.sizes[d])
        return int(self._perms[(d, epoch)][i])

    def _pick(self, n: int) -> int:
        return int(np.random.default_rng([self.seed, 1 << 20, n]).choice(len(self.sizes), p=self.probs))

    def next(self) -> tuple[int, int]:
        while True:
            n = self.n
            self.n += 1
            d = self._pick(n)
            row = self._row(d)
            if n % self.world == self.rank:
                return d, row

    def epochs(self) -> list[float]:
        return [round(c / s, 4) for c, s in zip(self.counts, self.sizes, strict=True)]

    def _round_end(self, n: int, counts: list[int]) -> tuple[int, list[int]]:
        """Draw `n` advanced to the next multiple of `world` (the other ranks' draws of the round)."""
        counts = list(counts)
        while n % self.world:
            counts[self._pick(n)] += 1
            n += 1
        return n, counts

    def state_dict(self) -> dict[str, Any]:
        # Rank r stops after its own draw of the round: advanced to the round's end, every rank's
        # state is the same, and resuming from rank 0's file repeats and skips nothing.
        n, counts = self._round_end(self.n, self.counts)
        return {"n": n, "counts": counts, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.counts = self._round_end(int(state["n"]), [int(c) for c in state["counts"]])
