"""A tiny registered base model with its tokenizer and prepared SFT/DPO data, built locally."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures import make_packed

from minilab.model import ModelConfig, build_model

TINY = dict(vocab_size=300, d_model=32, n_layer=2, n_head=2, n_kv_head=2, head_dim=16, intermediate_size=64,
            max_seq_len=96)


def make_base(root: Path, models_dir: Path, seed: int = 0) -> dict[str, Path | str]:
    """tokenizer -> random tiny model -> HF dir registered as a pretrain model."""
    from minilab import registry
    from minilab.hf import save_hf_dir
    from minilab.tokenization import tokenizer_fingerprint

    d = make_packed(root)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**TINY))
    base = save_hf_dir(model, root / "base", tokenizer_dir=d["tokenizer"])
    name = registry.make_name("llama", model.num_params(), "tiny", "pretrain", root=models_dir)
    registry.write_manifest(base, name=name, training_type="pretrain",
                            tokenizer_sha256=tokenizer_fingerprint(d["tokenizer"]))
    registry.register(base, name, root=models_dir, link=True)
    return {**d, "base": base, "name": name}


def make_sft_data(base: Path, out: Path, **kw) -> Path:
    from minilab.finetune.sft_data import SFTDataConfig, run

    run(SFTDataConfig(sources=kw.pop("sources", ["demo"]), tokenizer_dir=str(base), output_dir=str(out),
                      max_len=kw.pop("max_len", 48), limit=kw.pop("limit", 64), **kw))
    return out


def tune_cfg(cls, base, data, out, **kw):
    """A fast config of `cls` (SFTConfig or DPOConfig) for tests."""
    cfg = cls(base_model=str(base), data_dirs=[str(d) for d in data], output_dir=str(out),
              batch_size=kw.pop("batch_size", 4), max_steps=kw.pop("max_steps", 6),
              eval_every=kw.pop("eval_every", 100), eval_batches=1,
              ckpt_every=kw.pop("ckpt_every", 100), max_new_tokens=4, eval_prompts=["Hello"], device="cpu", **kw)
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_frac = 0.0
    return cfg


def run_job(cls_run, cfg, resume=None):
    """Run a fine-tuning job in-process and return it (model, optimizer, ... stay inspectable)."""
    from minilab import distributed

    info, device = distributed.init(torch.device("cpu"))
    job = cls_run(cfg, info, device)
    job.result = job.fit(resume)
    return job
