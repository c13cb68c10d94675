"""`minilab demo`: the built-in end-to-end run on a CPU, the README's main job.

built-in corpus -> tokenizer -> packed data -> a `micro` model pretrained for a few minutes ->
HF export + registry entry -> proof that transformers loads it with the same logits -> a sample.

Each stage is skipped when its output is already complete, and pretraining resumes from its
last checkpoint, so re-running after an interruption continues instead of starting over.
(`minilab run recipes/demo.yaml` will replace this with fingerprinted stage caching.)
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from minilab.cli import flag

log = logging.getLogger("minilab.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--workdir", default=".", help="where data/, tokenizers/, runs/ and models/ go (default: here)")
    flag(p, "--max-steps", type=int, default=600, help="pretraining steps (default 600, a few CPU minutes)")
    flag(p, "--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default 4096)")


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def main(args: argparse.Namespace) -> int:
    from minilab.data.corpus import CorpusConfig
    from minilab.data.corpus import run as run_corpus
    from minilab.data.pack import PackConfig
    from minilab.data.pack import run as run_pack
    from minilab.data.sources import SourceConfig
    from minilab.data.tokenizer import TokenizerConfig
    from minilab.data.tokenizer import run as run_tokenizer

    work = Path(args.workdir)
    corpus_dir, tok_dir = work / "data/corpus/default", work / "tokenizers/default"
    packed_dir, run_dir = work / "data/packed/default", work / "runs/demo-micro"
    models_dir = work / "models"
    timings: dict[str, float] = {}

    t = _stage("corpus: the built-in default text, cleaned, deduplicated and sharded")
    if not (corpus_dir / "manifest.json").exists():
        run_corpus(CorpusConfig(output_dir=str(corpus_dir), sources=[SourceConfig(path="default")]))
    timings["corpus"] = time.perf_counter() - t

    t = _stage(f"tokenizer: byte-level BPE, vocab {args.vocab_size}")
    if not (tok_dir / "tokenizer.json").exists():
        run_tokenizer(TokenizerConfig(output_dir=str(tok_dir), corpus_dir=str(corpus_dir),
                                      vocab_size=args.vocab_size, model_max_length=256))
    timings["tokenizer"] = time.perf_counter() - t

    t = _stage("pack: tokenize and pack into 256-token sequences")
    if not (packed_dir / "manifest.json").exists():
        run_pack(PackConfig(corpus_dir=str(corpus_dir), tokenizer_dir=str(tok_dir), output_dir=str(packed_dir),
                            seq_len=256, val_fraction=0.05))
    timings["pack"] = time.perf_counter() - t

    t = _stage(f"pretrain: a micro model, {args.max_steps} steps on the CPU")
    result = pretrain_micro(tok_dir, packed_dir, run_dir, models_dir, args.max_steps)
    timings["pretrain"] = time.perf_counter() - t

    t = _stage("eval: perplexity and bits per byte on held-out text, generations, report with plots")
    report = evaluate_demo(run_dir, packed_dir, work)
    timings["eval"] = time.perf_counter() - t

    t = _stage("check: transformers loads the export and gives the same logits")
    max_diff = parity_check(run_dir / "final")
    timings["check"] = time.perf_counter() - t

    print("\n== summary")
    for stage, seconds in timings.items():
        print(f"  {stage:<10} {seconds:7.1f} s")
    unigram = unigram_entropy(packed_dir)
    print(f"  validation loss {result['val_loss']:.3f} nats/token vs unigram entropy {unigram:.3f} "
          f"(a model that learned nothing but word frequencies)")
    print(f"  transformers parity: max |logits difference| {max_diff:.2e}")
    print(f"  eval report: {report}")
    print(f"  model: {run_dir / 'final'}  registry name: {result['name']}")
    print(f"  list the registry: minilab models list --models-dir {models_dir}")
    return 0


def pretrain_micro(tok_dir: Path, packed_dir: Path, run_dir: Path, models_dir: Path, max_steps: int) -> dict:
    from minilab import registry
    from minilab.pretrain import PretrainConfig, run
    from minilab.training import OptimConfig

    final = run_dir / "final"
    if (final / "manifest.json").exists():
        manifest = registry.read_manifest(final)
        print(f"  already trained: {final}")
        return {"val_loss": manifest["metrics"]["val_loss"], "name": manifest.get("name")}
    cfg = PretrainConfig(data_dirs=[str(packed_dir)], tokenizer_dir=str(tok_dir), output_dir=str(run_dir),
                         arch="micro", batch_size=16, max_steps=max_steps, eval_every=max(1, max_steps // 6),
                         ckpt_every=max(1, max_steps // 4), optim=OptimConfig(lr=2e-3), dataset_name="default",
                         precision="fp32", models_dir=str(models_dir))
    return run(cfg, resume="auto")


PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy said that", "The weather at Bath was",
           "She could not help thinking"]


def evaluate_demo(run_dir: Path, packed_dir: Path, work: Path) -> Path:
    """`minilab eval` on the demo model; returns the path of its report.md."""
    from minilab.evaluate.stage import EvalConfig
    from minilab.evaluate.stage import run as run_eval
    from minilab.fsutil import write_text_atomic

    prompts = work / "data" / "demo-prompts.txt"
    write_text_atomic(prompts, "\n".join(PROMPTS) + "\n")
    out = run_dir / "eval"
    run_eval(EvalConfig(model_path=str(run_dir / "final"), output_dir=str(out), data_dirs=[str(packed_dir)],
                        prompts_file=str(prompts), max_new_tokens=32))
    return out / "report.md"


def parity_check(model_dir: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from minilab.loading import load_model_for_inference

    ours = load_model_for_inference(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"exported model disagrees with transformers: max diff {diff}")
    return diff


def unigram_entropy(packed_dir: Path) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: the loss floor of a bag-of-tokens model."""
    import numpy as np

    from minilab.data.pack import open_split

    tokens, _offsets, _manifest = open_split(packed_dir, "train")
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) if len(p) else math.nan
