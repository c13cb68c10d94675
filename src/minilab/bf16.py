"""Matmuls and attention of the model in bf16 on CPUs without bf16 hardware.

Without AVX512/AMX, oneDNN has no bf16 GEMM and torch falls back to a reference kernel that runs
5-50x slower than its fp32 GEMM (0.9 GFLOP/s against 54 on a 2-core AVX2 EPYC), so bf16 autocast
made training ~40x slower than fp32. There, each bf16 matmul of the model is computed as what a
bf16 GEMM is: bf16-rounded operands, exact products and fp32 accumulation, the result rounded to
bf16, but by fp32 kernels on upcast operands (as oneDNN emulates bf16 on CPUs that lack it).
Numerics stay those of bf16 autocast; speed becomes that of fp32. `BF16_MATMUL` forces a path.

The model's layers call `linear` and `attention`; `CachedForward` and `training.py` call
`linear_w` and `emulate_bf16` directly. `is_plain_linear` also says which layers the decode
layout and `CachedForward` may handle as a bare weight (not LoRA-wrapped, not quantized).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BF16_MATMUL = "auto"  # "auto": emulate where the CPU has no bf16 GEMM; "native": torch's kernels; "emulate"


def cpu_has_bf16_gemm() -> bool:
    """Whether torch multiplies bf16 matrices on this CPU with oneDNN (AVX512 or AMX), not a reference loop."""
    global _CPU_BF16_GEMM
    if _CPU_BF16_GEMM is None:
        try:
            _CPU_BF16_GEMM = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _CPU_BF16_GEMM = False
    return _CPU_BF16_GEMM


_CPU_BF16_GEMM: bool | None = None


def emulate_bf16(x: torch.Tensor, rows: int) -> bool:
    """True when a matmul on `x` would run in bf16 (bf16 input or CPU bf16 autocast) on a CPU whose
    bf16 GEMM is torch's slow reference kernel; see BF16_MATMUL and `emulates_gemm`."""
    in_bf16 = x.dtype is torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                            and torch.get_autocast_dtype("cpu") is torch.bfloat16)
    return in_bf16 and emulates_gemm(x.device, rows)


def emulates_gemm(device: torch.device, rows: int) -> bool:
    """Whether a bf16 matmul of `rows` rows on `device` is emulated on fp32 kernels. Not below 32 rows
    (decoding a few tokens): there the reference kernel is memory-bound like fp32, and upcasting the
    weights is not."""
    if device.type != "cpu" or BF16_MATMUL == "native" or (rows < 32 and BF16_MATMUL == "auto"):
        return False
    return BF16_MATMUL == "emulate" or not cpu_has_bf16_gemm()


class _BF16Linear(torch.autograd.Function):
    """y = x @ w.T as a bf16 GEMM (bf16 operands, fp32 accumulation, bf16 result) computed with fp32
    kernels. Saves the bf16 operands (the memory of bf16 autocast); gradients are rounded to bf16
    and returned in the inputs' dtypes, as autocast's cast-backward does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, w.dtype)
        with torch.autocast("cpu", enabled=False):
            return F.linear(xb.float(), wb.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xb, wb = ctx.saved_tensors
        g = grad.to(torch.bfloat16).float()
        gx = gw = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                gx = (g @ wb.float()).to(torch.bfloat16).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                g2, x2 = g.reshape(-1, g.shape[-1]), xb.reshape(-1, xb.shape[-1]).float()
                gw = (g2.T @ x2).to(torch.bfloat16).to(ctx.dtypes[1])
        return gx, gw


def linear_w(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias), its bf16 GEMM emulated where the CPU lacks one."""
    if (x.dtype is torch.bfloat16 or torch.is_autocast_enabled("cpu")) and \
            emulate_bf16(x, x.numel() // max(1, x.shape[-1])):
        return _BF16Linear.apply(x, weight)
    return F.linear(x, weight)


def is_plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`: a plain bias-free nn.Linear through `linear_w` (no Module.__call__), anything
    else (LoRA, quantized layers) simply called."""
    return linear_w(x, layer.weight) if is_plain_linear(layer) else layer(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """scaled_dot_product_attention; in bf16 on a CPU without bf16 GEMM, on bf16-rounded q, k, v upcast
    to fp32 (the fp32 flash kernel; the probabilities stay fp32), the output rounded to bf16."""
    if emulate_bf16(q, q.shape[-2]):
        with torch.autocast("cpu", enabled=False):
            up = [t.to(torch.bfloat16).float() for t in (q, k, v)]
            return F.scaled_dot_product_attention(*up, **kw).to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, **kw)
