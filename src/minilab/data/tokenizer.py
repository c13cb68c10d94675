"""`minilab tokenizer`: train a byte-level BPE or Unigram tokenizer once, freeze it, fingerprint it.

The output directory is a standard Hugging Face tokenizer (`tokenizer.json`,
`tokenizer_config.json` with a ChatML `chat_template`, `special_tokens_map.json`) that
`transformers.AutoTokenizer.from_pretrained(dir)` loads and that encodes exactly like the
`tokenizers` object it came from, plus `minilab_tokenizer.json` holding its fingerprint.

The fingerprint is a SHA-256 over the tokenizer's *content* (the canonical JSON of the model,
normaliser, pre-tokeniser and special tokens, and the chat template), never its path or a
timestamp, so the same tokenizer copied elsewhere keeps its identity. Every later manifest
records it; `pack` and the mixture reader refuse data packed with a different one.

The *encoding* fingerprint is the same hash without the chat template: what decides the token
ids of a text. Packed data records both, so a model whose template changed in SFT (same
vocabulary, same ids) can still be scored on the data it was pretrained on.

This module is the stage only; loading a tokenizer, both fingerprints, the special-token
defaults and the ChatML template are the library's, in `minilab.tokenization`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minilab.errors import ConfigError, MinilabError
from minilab.fsutil import atomic_dir, write_json_atomic
from minilab.stage import Stage
from minilab.tokenization import (
    BOS_TOKEN,
    CHAT_END,
    CHAT_START,
    CHATML_TEMPLATE,
    EOS_TOKEN,
    META,
    PAD_TOKEN,
    UNK_TOKEN,
    encoding_fingerprint,
    tokenizer_fingerprint,
)

log = logging.getLogger("minilab.tokenizer")


@dataclass
class TokenizerConfig:
    """How to train (or adopt) a tokenizer."""

    output_dir: str = field(metadata={"help": "directory to write the tokenizer into"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus directory to train on"})
    type: Literal["bpe", "unigram"] = field(default="bpe", metadata={
        "help": "byte-level BPE (no unknown tokens, GPT-2/Llama-3 style) or Unigram (SentencePiece style)"})
    vocab_size: int = field(default=32768, metadata={
        "help": "vocabulary size including special tokens; an upper bound: a small corpus may support "
                "fewer (the tokenizer then warns and records both)"})
    min_frequency: int = field(default=2, metadata={"help": "BPE: minimum pair count to merge", "min": 0})
    sample_chars: int = field(default=0, metadata={
        "help": "train on at most this many characters of the corpus (0 = all)", "min": 0})
    bos_token: str = field(default=BOS_TOKEN, metadata={"help": "beginning-of-sequence token"})
    eos_token: str = field(default=EOS_TOKEN, metadata={"help": "end-of-document token (pack appends it)"})
    pad_token: str = field(default=PAD_TOKEN, metadata={"help": "padding token"})
    unk_token: str = field(default=UNK_TOKEN, metadata={"help": "unknown token"})
    extra_special_tokens: list[str] = field(default_factory=lambda: [CHAT_START, CHAT_END], metadata={
        "help": "further special tokens; the ChatML tokens are always included"})
    model_max_length: int = field(default=1024, metadata={"help": "recorded as the tokenizer's max length",
                                                          "min": 1})
    from_pretrained: str | None = field(default=None, metadata={
        "help": "adopt an existing tokenizer (HF model directory or hub id) instead of training"})
    force: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def validate(self) -> None:
        if not self.corpus_dir and not self.from_pretrained:
            raise ConfigError("give a corpus to train on (--corpus-dir) or --from an existing tokenizer",
                              key="corpus_dir")
        if not self.from_pretrained and self.vocab_size < (least := self.min_vocab_size()):
            raise ConfigError(f"vocab_size {self.vocab_size} is too small: at least {least} (the 256-byte "
                              f"alphabet, {len(self.special_tokens())} special tokens and some merges)",
                              key="vocab_size")

    def min_vocab_size(self) -> int:
        return max(300, 256 + len(self.special_tokens()) + 16)

    def special_tokens(self) -> list[str]:
        tokens = [self.bos_token, self.eos_token, self.pad_token, self.unk_token, CHAT_START, CHAT_END]
        tokens += self.extra_special_tokens
        return list(dict.fromkeys(tokens))  # de-duplicated, order kept: ids 0.. are stable


def _corpus_texts(corpus_dir: str, sample_chars: int) -> tuple[Iterator[str], dict[str, Any]]:
    from minilab.data.shards import iter_corpus, manifest_hash, verify_corpus

    manifest = verify_corpus(corpus_dir)  # never train on shards that differ from their manifest

    def texts() -> Iterator[str]:
        used = 0
        for text in iter_corpus(corpus_dir, manifest):
            yield text
            used += len(text)
            if sample_chars and used >= sample_chars:
                return

    return texts(), {"corpus_dir": str(corpus_dir), "corpus_manifest_sha256": manifest_hash(corpus_dir)}


def train_tokenizer(cfg: TokenizerConfig, texts: Iterator[str]):
    """A `tokenizers.Tokenizer` trained on `texts` per `cfg` (special tokens get the first ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = cfg.special_tokens()
    if cfg.type == "bpe":
        tok = Tokenizer(models.BPE())
        # Byte-level: every byte is in the alphabet, so no text is ever unknown.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=cfg.vocab_size, special_tokens=specials,
                                          unk_token=cfg.unk_token, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_config(cfg: TokenizerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, special_tokens_map.json) for a trained tokenizer."""
    extras = [t for t in cfg.special_tokens() if t not in
              (cfg.bos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token)]
    special_map = {"bos_token": cfg.bos_token, "eos_token": cfg.eos_token, "pad_token": cfg.pad_token,
                   "unk_token": cfg.unk_token, "additional_special_tokens": extras}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map,
               # No automatic bos/eos: AutoTokenizer must encode exactly like tokenizer.json.
               "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
               "model_max_length": cfg.model_max_length, "chat_template": CHATML_TEMPLATE}
    return tok_cfg, special_map


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id (`org/name`, which never starts with '.'): absolute, ./,
    ../, ~, or more than one '/'."""
    return (value.startswith(("/", "~", ".")) or value.count("/") > 1 or "\\" in value
            or Path(value).is_absolute())


def _adopt_pretrained(cfg: TokenizerConfig, out: Path) -> dict[str, Any]:
    """Copy an existing fast tokenizer into `out`, adding any extra special tokens."""
    from transformers import AutoTokenizer  # heavy; only for this path

    src = cfg.from_pretrained
    if _looks_like_path(src) and not Path(src).expanduser().is_dir():
        what = "not a directory" if Path(src).expanduser().exists() else "no such directory"
        raise MinilabError(f"--from {src}: {what} (give a tokenizer or model directory, or a hub id "
                           "such as HuggingFaceTB/SmolLM2-135M)")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.from_pretrained)
    except (OSError, ValueError) as e:
        raise MinilabError(f"cannot load tokenizer '{cfg.from_pretrained}': {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise MinilabError(f"tokenizer '{cfg.from_pretrained}' has no tokenizer.json (a fast tokenizer "
                           "is required so the fingerprint covers its content)")
    extra = [t for t in cfg.extra_special_tokens if t not in tok.get_vocab()]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    return {"source": "pretrained", "from": cfg.from_pretrained, "added_special_tokens": extra,
            "vocab_size": len(tok)}


def run(cfg: TokenizerConfig) -> dict[str, Any]:
    """Train or adopt the tokenizer described by `cfg`; returns its `minilab_tokenizer.json`."""
    from minilab.owned import check_output

    out = Path(cfg.output_dir)
    check_output(out, cfg.force, {"tokenizer"}, reading=tuple(p for p in (cfg.corpus_dir, cfg.from_pretrained)
                                                              if p and Path(p).exists()))
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        if cfg.from_pretrained:
            meta = _adopt_pretrained(cfg, tmp)
        else:
            texts, provenance = _corpus_texts(cfg.corpus_dir, cfg.sample_chars)
            tok = train_tokenizer(cfg, texts)
            tok.save(str(tmp / "tokenizer.json"))
            tok_cfg, special_map = hf_config(cfg)
            write_json_atomic(tmp / "tokenizer_config.json", tok_cfg)
            write_json_atomic(tmp / "special_tokens_map.json", special_map)
            meta = {"source": "trained", "type": cfg.type, "vocab_size": tok.get_vocab_size(),
                    "requested_vocab_size": cfg.vocab_size, "sample_chars": cfg.sample_chars, **provenance}
        meta = {"sha256": tokenizer_fingerprint(tmp), "encoding_sha256": encoding_fingerprint(tmp), **meta,
                "eos_token": cfg.eos_token,
                "chat_end_token": CHAT_END}
        write_json_atomic(tmp / META, meta)
    log.info("tokenizer %s: vocab %d, sha256 %s", out, meta["vocab_size"], meta["sha256"])
    if meta.get("requested_vocab_size", 0) > meta["vocab_size"]:
        log.warning("warning: vocab_size %d asked for, but this corpus supports only %d tokens (no pair is "
                    "frequent enough to merge further), so the tokenizer has %d; both are recorded in %s. Train "
                    "on more text for a larger vocabulary.", meta["requested_vocab_size"], meta["vocab_size"],
                    meta["vocab_size"], META)
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import add_config_flags, flag

    flag(p, "--corpus-dir", help="corpus directory (from `minilab corpus`) to train on")
    flag(p, "--output-dir", help="where to write the tokenizer")
    flag(p, "--vocab-size", type=int, help="vocabulary size (default 32768)")
    p.add_argument("--type", choices=["bpe", "unigram"], help="tokenizer model (default bpe)")
    flag(p, "--sample-chars", type=int, help="train on at most this many characters (default all)")
    p.add_argument("--from", dest="from_pretrained", metavar="DIR_OR_ID",
                   help="adopt an existing HF tokenizer instead of training one")
    flag(p, "--extra-special-token", action="append", default=[], metavar="TOKEN",
         help="add a special token (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_config_flags(p, "Keys: those of TokenizerConfig (output_dir, corpus_dir, vocab_size, ...).")


def main(args: argparse.Namespace) -> int:
    from minilab.cliargs import config_from_args

    extra = args.extra_special_token
    cfg = config_from_args(TokenizerConfig, args, flags={
        "output_dir": args.output_dir, "corpus_dir": args.corpus_dir, "vocab_size": args.vocab_size,
        "type": args.type, "sample_chars": args.sample_chars, "from_pretrained": args.from_pretrained,
        "extra_special_tokens": [CHAT_START, CHAT_END, *extra] if extra else None, "force": args.force})
    meta = run(cfg)
    print(f"tokenizer written to {cfg.output_dir} (vocab {meta['vocab_size']}, sha256 {meta['sha256']})")
    return 0


STAGE = Stage("tokenizer", TokenizerConfig, run=run, metric=lambda r, cfg: f"vocab {r['vocab_size']:,}",
              estimate=lambda ctx, cfg: {"disk": cfg.vocab_size * 120, "memory": None, "note": "tokenizer.json"},
              output_facts=("vocab_size",))
