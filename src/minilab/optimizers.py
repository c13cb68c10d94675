"""Muon for the hidden matrices, AdamW for the rest, as one optimizer.

Muon (Keller Jordan et al., 2024; `torch.optim.Muon`) replaces each 2-D weight's momentum update
by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations), so every direction of
the matrix learns at the same rate instead of a few dominant ones. It is made for the matrices
inside the transformer blocks only: embeddings, the output head and the norms' vectors keep
AdamW (modded-nanogpt, nanochat and Moonlight all split it so).

The learning rate is shared with AdamW through Moonlight's rule (`adjust_lr_fn=
"match_rms_adamw"`, Liu et al., 2025, "Muon is Scalable for LLM Training"): each matrix's update
is scaled to 0.2 * sqrt(max(rows, cols)), the RMS an AdamW update has, so one `lr`, one weight
decay and one schedule drive both halves and a recipe tuned for AdamW is a fair start for Muon.

`MuonAdamW` looks like one `torch.optim.Optimizer` to the training loop: `param_groups` (the
schedule sets each group's `lr`), `step`, `zero_grad`, and a `state_dict` holding both halves'
state, saved and restored with the checkpoint like AdamW's (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minilab.errors import ConfigError


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every parameter that trains, a tied one once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def adamw_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: weight decay on 2-D+ weights except embeddings, none on norms and embeddings."""
    decays = [p.dim() >= 2 and "embed" not in name for name, p in named]
    decay = [p for (_, p), d in zip(named, decays, strict=True) if d]
    no_decay = [p for (_, p), d in zip(named, decays, strict=True) if not d]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention and MLP projections): what Muon trains."""
    return p.dim() == 2 and "embed" not in name and "lm_head" not in name


class MuonAdamW:
    """Muon over the hidden matrices and AdamW over everything else, stepped together."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, momentum: float = 0.95, fused: bool = False):
        matrices, rest = [], []
        for name, p in trainable(model):
            (matrices if is_hidden_matrix(name, p) else rest).append((name, p))
        if not matrices:
            raise ConfigError("optimizer muon: the model has no 2-D weights inside its blocks to train with it; "
                              "use optimizer adamw", key="optim.optimizer")
        self.muon = torch.optim.Muon([p for _, p in matrices], lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     nesterov=True, adjust_lr_fn="match_rms_adamw")
        groups = [g for g in adamw_groups(rest, weight_decay) if g["params"]]
        # (adapters alone, e.g. LoRA's A and B, are all block matrices: no AdamW half then)
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused) if groups else None
        self.halves = [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.halves for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        return {k: v for o in self.halves for k, v in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.halves:
            o.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for o in self.halves:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"} or (state["adamw"] is None) != (self.adamw is None):
            raise ValueError("not this Muon+AdamW optimizer's state (was the checkpoint written with optimizer "
                             "adamw, or for other trainable parameters?)")
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])


def reset_state(optimizer: Any) -> None:
    """Forget every step taken (moments, momentum buffers, step counts): the next step is the
    first, for AdamW and for both halves of a `MuonAdamW`."""
    for o in getattr(optimizer, "halves", [optimizer]):
        o.state.clear()
