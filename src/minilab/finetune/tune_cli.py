"""The command-line pieces `minilab sft` and `minilab dpo` share: their common flags, the config
keys those flags set, and how a run's result (or its dry-run plan) is printed.

Kept out of sft.py so that neither verb imports the other's stage module.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """Flags SFT and DPO share."""
    from minilab.cliargs import add_config_flags, flag

    flag(p, "--base-model", metavar="NAME|DIR|HUB_ID", help="model to fine-tune")
    flag(p, "--data-dirs", nargs="+", metavar="DIR", help="prepared datasets")
    flag(p, "--data-weights", nargs="+", type=float, metavar="W", help="sampling weight per dataset")
    flag(p, "--output-dir", metavar="DIR", help="run directory")
    p.add_argument("--method", choices=["lora", "qlora", "full"], help="default lora")
    flag(p, "--max-steps", type=int, metavar="N", help="optimizer steps")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint or a given one")
    flag(p, "--dry-run", action="store_true", help="print the resource plan and exit")
    add_config_flags(p, "Keys: those of the verb's config (lora.r, optim.lr, batch_size, ...).")


# The flags `add_tune_arguments` adds that are config keys of SFT and DPO alike.
TUNE_FLAGS = ("base_model", "data_dirs", "data_weights", "output_dir", "method", "max_steps")


def print_result(result: dict[str, Any], dry_run: bool) -> None:
    from minilab.fsutil import human_bytes

    if dry_run:
        plan = result["plan"]
        print(f"params {plan['params']:,} ({plan['trainable']:,} trainable); peak memory "
              f"~{human_bytes(plan['memory'])}; disk ~{human_bytes(plan['disk'])}")
        return
    if result["final_dir"] is None:  # a torchrun rank other than 0: rank 0 wrote and reports the model
        return
    print(f"final model: {result['final_dir']}")
    if result.get("name"):
        print(f"registry name: {result['name']}")
