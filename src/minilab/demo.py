"""`minilab demo`: the shipped `demo` recipe, the README's main job (same as `minilab run demo`).

built-in corpus -> tokenizer -> packed data -> a `micro` model pretrained for a few CPU minutes ->
eval -> SFT (LoRA) -> DPO -> merge -> eval in the chat format -> HF (with a transformers parity
check) and GGUF export; see src/minilab/recipes/demo.yaml. Finished stages are cached, and an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse

from minilab.cliargs import flag


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--workdir", metavar="DIR", default=None, help="where stage outputs go (default: runs/demo)")
    flag(p, "--models-dir", metavar="DIR", help="registry root (default: $MINILAB_MODELS_DIR or models/)")
    flag(p, "--max-steps", type=int, default=None, help="pretraining steps (default: the recipe's 600)")
    flag(p, "--dry-run", action="store_true", help="print the plan and the disk/memory estimate only")


def main(args: argparse.Namespace) -> int:
    from minilab.recipe import runner

    overrides = [f"stages.pretrain.max_steps={args.max_steps}"] if args.max_steps else []
    ns = argparse.Namespace(recipe="demo", workdir=args.workdir, models_dir=args.models_dir, force=[],
                            from_stage=None, until=None, dry_run=args.dry_run, overrides=overrides)
    return runner.main(ns)
