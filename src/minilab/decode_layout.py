"""The decode layout: a `Transformer`'s weights re-stored for fast CPU decoding, values unchanged.

`use_decode_layout` writes it (`Engine.load` does, for inference-only models); `joined` reads it
back (`CachedForward` turns a joined q|k|v or gate|up into one product). The model definition
(`minilab.model`) neither knows nor depends on which layout its weights are in.
"""

from __future__ import annotations

import torch
from torch import nn

from minilab.bf16 import is_plain_linear
from minilab.model import Block, Transformer
from minilab.screened_head import MIN_SCREENED_ELEMENTS, ScreenedHead, screen_available


def plain_model(model: nn.Module) -> bool:
    """Whether `model` is minilab's own `Transformer` with every projection a bias-free nn.Linear (not
    LoRA-wrapped, not quantized): what `CachedForward` decodes and the head screen serves."""
    if type(model) is not Transformer or type(model.model.embed_tokens) is not nn.Embedding \
            or not is_plain_linear(model.lm_head):
        return False
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        if type(block) is not Block or not all(map(is_plain_linear, (
                a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj))):
            return False
    return True


def _decodable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype is torch.float32 and w.dim() == 2 and w.is_contiguous()


def use_decode_layout(model: Transformer, screen: bool | None = None) -> Transformer:
    """Store each plain fp32 linear weight of a CPU model that widens (in <= out) transposed, (in, out)
    contiguous: same Parameter, shape, name and values, now a transposed view. The vector-matrix
    products of decoding then read the weight row after row, 1.3-3x faster on CPU (the large head
    most). A narrowing weight (in > out: the MLP's down projection) keeps (out, in), where MKL's
    row-dot product is the faster one (1.4-1.6x on its own, 6% of a `small` decoding step).
    A block's q, k, v weights share one (in, q+k+v) tensor and gate, up one (in, 2 * inter), each
    weight a column range of it, so `CachedForward` computes them with one product each: fewer,
    longer reads of memory (the per-token cost of a model larger than the CPU's caches).
    Not bf16 weights: torch's bf16 CPU kernel is 3x slower in that layout. For inference-only
    models; export (`save_hf_dir`) writes the same files.
    Also sets `model.decode_screen`: a `ScreenedHead` (an int8 copy of the head, a quarter of its
    bytes, from which greedy steps of enough rows to pay take their exact token, `min_rows`, at the
    row counts where it ran faster than the fp32 head, timed on the first steps: `ScreenedHead.tokens`)
    where the fp32 head has at least `MIN_SCREENED_ELEMENTS` (`screen=None`), always, read by every
    greedy step untimed (`True`), or never (`False`). Returns `model`."""
    with torch.no_grad():
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            for group in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
                if all(map(is_plain_linear, group)) and all(_decodable(lin.weight) for lin in group):
                    fused = torch.cat([lin.weight.t() for lin in group], dim=1)  # (in, sum of outs)
                    start = 0
                    for lin in group:
                        n = lin.weight.shape[0]
                        lin.weight.data = fused[:, start:start + n].t()
                        start += n
        for module in model.modules():
            w = module.weight if type(module) is nn.Linear else None
            if w is not None and _decodable(w) and w.shape[1] <= w.shape[0]:
                w.data = w.data.t().contiguous().t()
    head = model.lm_head.weight
    wanted = head.numel() >= MIN_SCREENED_ELEMENTS if screen is None else screen
    # only where CachedForward decodes (not a quantized or LoRA-wrapped model: its fp32 head would
    # get a copy no step reads)
    model.decode_screen = ScreenedHead(head.t(), always=bool(screen)) if wanted and screen_available() \
        and _decodable(head.t()) and plain_model(model) else None
    return model


def joined(*layers: nn.Linear) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The layers' weights as (in, out) views; one (in, sum of outs) view where they are consecutive
    column ranges of one tensor (as `use_decode_layout` stores q|k|v and gate|up), else a tuple."""
    parts = [lin.weight.t() for lin in layers]
    first, total = parts[0], sum(p.shape[1] for p in parts)
    offset = first.storage_offset()
    for p in parts:
        if p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or p.stride() != (total, 1) \
                or p.storage_offset() != offset:
            return tuple(parts)
        offset += p.shape[1]
    return first.as_strided((first.shape[0], total), (total, 1))
