"""A tiny model directory with a real tokenizer, for the generation, serving and export tests."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures import make_corpus


def make_model_dir(root: Path, *, vocab_size: int = 300, max_seq_len: int = 128, tie: bool = True,
                   n_kv_head: int = 2, seed: int = 0) -> Path:
    """corpus -> tokenizer -> a random 2-layer model saved as a minilab/HF directory at root/model.

    The weights are scaled up from the (near-uniform) init so greedy text is varied and the
    logits are peaked, which makes parity checks meaningful."""
    from minilab.data.tokenizer import TokenizerConfig
    from minilab.data.tokenizer import run as tok_run
    from minilab.hf import save_hf_dir
    from minilab.model import ModelConfig, build_model

    corpus = make_corpus(root / "corpus", n_docs=80)
    meta = tok_run(TokenizerConfig(output_dir=str(root / "tok"), corpus_dir=str(corpus), vocab_size=vocab_size,
                                   model_max_length=max_seq_len))
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=meta["vocab_size"], n_layer=2, n_head=4, n_kv_head=n_kv_head,
                                    d_model=64, intermediate_size=128, max_seq_len=max_seq_len,
                                    tie_embeddings=tie))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return save_hf_dir(model, root / "model", tokenizer_dir=root / "tok")


_CACHE: dict[tuple, Path] = {}


def shared_model_dir(**kw) -> Path:
    """`make_model_dir` once per test process and arguments (the tests only read it)."""
    import atexit
    import shutil
    import tempfile

    key = tuple(sorted(kw.items()))
    if key not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="minilab-test-model-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE[key] = make_model_dir(root, **kw)
    return _CACHE[key]
