"""Packed token data as `minilab pack` writes it, read and checked: what pretraining, evaluation
and the mixture share, so no stage reads another stage's module to open its input.

A packed directory holds, per split (train, val), `SPLIT.bin` (every document's tokens followed
by eos, uint16 when the vocabulary fits, else uint32) and `SPLIT.idx` (uint64 document start
offsets plus the final length), and `manifest.json` (tokenizer fingerprints, counts, dtype,
seq_len and the SHA-256 of every file). Before anything reads the files they are checked against
the manifest (`check_packed`), and data packed with another tokenizer is refused
(`check_tokenizer_match`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from minilab.errors import MinilabError, TokenizerMismatchError
from minilab.fsutil import sha256_file

log = logging.getLogger("minilab.pack")

SPLITS = ("train", "val")


def token_dtype(vocab_size: int):
    import numpy as np

    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def check_tokenizer_match(packed_dirs: Iterable[str | Path], tokenizer_sha256: str | None,
                          encoding_sha256: str | None = None) -> str:
    """Refuse packed data made with another tokenizer; returns the shared fingerprint.

    Every directory must carry the same tokenizer fingerprint, equal to `tokenizer_sha256`
    when one is given. A mismatch means token ids would be read with the wrong vocabulary
    (loss ~10 instead of ~4), so it is a blocking `TokenizerMismatchError`. Tokenizers that
    differ only in their chat template encode alike: data whose recorded encoding fingerprint
    equals `encoding_sha256` (or the first directory's) is accepted.
    """
    from minilab.data.shards import load_manifest

    expected, expected_from = tokenizer_sha256, "the tokenizer in use"
    expected_encoding = encoding_sha256
    for d in packed_dirs:
        manifest = load_manifest(d, "packed")
        got, got_encoding = manifest["tokenizer_sha256"], manifest.get("tokenizer_encoding_sha256")
        if expected is None:
            expected, expected_from = got, str(d)
            expected_encoding = expected_encoding or got_encoding
        elif got != expected and not (got_encoding and got_encoding == expected_encoding):
            raise TokenizerMismatchError(
                f"Tokenizer mismatch between datasets: {d} was packed with tokenizer {got} but "
                f"{expected_from} has {expected}; re-pack it with that tokenizer "
                f"(minilab pack --tokenizer-dir ... --output-dir {d} --force)")
        elif got != expected:
            log.info("%s: packed with a tokenizer that differs from %s only in its chat template "
                     "(the same token ids)", d, expected_from)
    if expected is None:
        raise MinilabError("no packed datasets given")
    return expected


def check_packed(packed_dir: str | Path, splits: Iterable[str] = SPLITS, verify: bool = False) -> dict[str, Any]:
    """Check a packed directory's files against its manifest.json before anything reads them.

    Always: every split's .bin and .idx file is there and has the size the manifest's counts give
    (tokens x dtype size; (documents + 1) x 8 bytes of offsets), so a truncated, emptied or missing
    file is refused instead of silently trained on. With `verify`, each file's SHA-256 is compared
    with the manifest too (catches a changed byte; reads every byte). Returns the manifest.
    """
    import numpy as np

    from minilab.data.shards import load_manifest

    packed_dir = Path(packed_dir)
    manifest = load_manifest(packed_dir, "packed")
    redo = f"re-pack it (minilab pack --output-dir {packed_dir} --force)"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in splits:
        if split not in manifest["splits"]:
            raise MinilabError(f"{packed_dir}: no split '{split}' (have {', '.join(manifest['splits'])})")
        info = manifest["splits"][split]
        expected = {"bin": (int(info["tokens"]) * itemsize, f"{int(info['tokens']):,} tokens"),
                    "idx": ((int(info["documents"]) + 1) * 8, f"{int(info['documents']):,} documents")}
        for kind, (size, what) in expected.items():
            path = packed_dir / f"{split}.{kind}"
            if not path.is_file():
                raise MinilabError(f"{path}: missing (manifest.json lists it); {redo}")
            got = path.stat().st_size
            if got != size:
                raise MinilabError(f"{path}: {got:,} bytes, but manifest.json records {what} ({size:,} bytes): "
                                   f"the file is truncated or changed; {redo}")
            if verify and sha256_file(path) != info[f"{kind}_sha256"]:
                raise MinilabError(f"{path}: SHA-256 differs from manifest.json (the file changed after "
                                   f"packing); {redo}")
    return manifest


def open_split(packed_dir: str | Path, split: str = "train", verify: bool = False):
    """(tokens memmap, doc offsets, manifest) of one split, after `check_packed` (sizes; `verify`:
    SHA-256 too)."""
    import numpy as np

    packed_dir = Path(packed_dir)
    manifest = check_packed(packed_dir, (split,), verify)
    if manifest["splits"][split]["tokens"] == 0:
        return np.zeros(0, dtype=manifest["dtype"]), np.zeros(1, np.uint64), manifest
    tokens = np.memmap(packed_dir / f"{split}.bin", dtype=manifest["dtype"], mode="r")
    offsets = np.fromfile(packed_dir / f"{split}.idx", dtype=np.uint64)
    return tokens, offsets, manifest


def unigram_entropy(packed_dir: str | Path) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: the loss of a model that
    learned word frequencies and nothing else."""
    import numpy as np

    tokens, _offsets, _manifest = open_split(packed_dir, "train")
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
