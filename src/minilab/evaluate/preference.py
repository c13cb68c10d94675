"""`minilab eval --dpo DIR`: a preference-tuned policy against its reference on held-out pairs.

Win rate: the fraction of held-out pairs on which the policy's implicit reward prefers the chosen
answer, beta * ((pi_c - ref_c) - (pi_r - ref_r)) > 0 (ties count as losses), i.e. on which the
policy moved towards the chosen answer relative to the reference. Perplexity of the chosen and
of the rejected answers (answer tokens only) under the policy and under the reference shows
whether the gain came from raising the chosen answers or from lowering the rejected ones.

The reference of an adapter model is its base with the adapters switched off (one copy in
memory); of a full model, its registry parent.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from minilab.errors import MinilabError


def _models(model_dir: Path, device: torch.device, registry_root: str | None):
    """(policy, reference-context factory, reference model or None)."""
    from minilab.loading import load_model, load_model_for_inference
    from minilab.registry import read_manifest

    if (model_dir / "adapters" / "adapter_config.json").is_file() or (model_dir / "adapter_config.json").is_file():
        policy = load_model(model_dir, device=device, registry_root=registry_root).eval()
        return policy, policy.disable_adapter, None
    parent = read_manifest(model_dir).get("parent")
    if not parent:
        raise MinilabError(f"{model_dir}: a full model without a registry parent has no reference for --dpo")
    policy = load_model_for_inference(model_dir, device=device, registry_root=registry_root)
    return policy, contextlib.nullcontext, load_model_for_inference(parent, device=device, registry_root=registry_root)


@torch.no_grad()
def _logps(model, rows, idx: list[int], pad_id: int, device) -> tuple[torch.Tensor, int]:
    from minilab.finetune.rows import collate
    from minilab.training import model_sequence_logprobs

    x, y = collate([rows[i] for i in idx], pad_id)
    device = torch.device(device)
    return model_sequence_logprobs(model, x.to(device), y.to(device), "fp32", device).cpu(), int((y != -100).sum())


def preference_eval(model_path: str | Path, data_dirs: list[str], *, beta: float = 0.1, split: str = "val",
                    device: str | torch.device = "cpu", registry_root: str | None = None,
                    batch_size: int = 8) -> list[dict[str, Any]]:
    """Win rate and chosen/rejected perplexities per DPO dataset (from `minilab dpo-data`)."""
    from minilab.finetune.rows import Rows, check_data_tokenizer
    from minilab.registry import read_manifest, resolve_model_dir
    from minilab.tokenization import pad_id_of

    model_dir = resolve_model_dir(model_path, registry_root)
    tok_sha = read_manifest(model_dir).get("tokenizer_sha256")
    if tok_sha:
        check_data_tokenizer(data_dirs, "dpo_data", tok_sha)
    device = torch.device(device)
    policy, ref_ctx, ref_model = _models(model_dir, device, registry_root)
    pad = pad_id_of(model_dir)
    results = []
    for d in data_dirs:
        chosen, rejected = Rows(d, f"{split}.chosen"), Rows(d, f"{split}.rejected")
        if len(chosen) == 0:
            raise MinilabError(f"{d}: no {split} pairs to evaluate on")
        sums = {k: [] for k in ("pc", "pr", "rc", "rr")}
        tokens = {"c": 0, "r": 0}
        for a in range(0, len(chosen), batch_size):
            idx = list(range(a, min(a + batch_size, len(chosen))))
            for side, rows in (("c", chosen), ("r", rejected)):
                lp, n = _logps(policy, rows, idx, pad, device)
                sums["p" + side].append(lp)
                tokens[side] += n
                with ref_ctx():
                    sums["r" + side].append(_logps(ref_model or policy, rows, idx, pad, device)[0])
        pc, pr, rc, rr = (torch.cat(sums[k]) for k in ("pc", "pr", "rc", "rr"))
        margin = beta * ((pc - rc) - (pr - rr))
        ppl = {who: {"chosen": math.exp(-float(c.sum()) / tokens["c"]),
                     "rejected": math.exp(-float(r.sum()) / tokens["r"])}
               for who, c, r in (("policy", pc, pr), ("reference", rc, rr))}
        results.append({"data": str(d), "split": split, "pairs": len(chosen), "beta": beta,
                        "win_rate": float((margin > 0).float().mean()), "mean_margin": float(margin.mean()),
                        "perplexity": ppl})
    return results
