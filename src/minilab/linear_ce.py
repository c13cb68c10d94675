"""The LM head and the cross-entropy in one pass, a chunk of tokens at a time (full training).

`F.cross_entropy(h @ W.T, y)` materializes the (tokens, vocab) logits, keeps them and their
log_softmax for backward, then writes a zero-filled gradient of the same size and the logits'
gradient: four fp32 tensors of tokens x vocab (the planner's `LOGIT_BYTES`: 16 bytes per entry,
14 under autocast), each written to and read back from memory. Here each chunk of rows is done in
one go while it is in cache: logits, one exp pass, the loss, then, in the same buffer, the gradient
softmax - onehot, and at once the gradients of the hidden states (p @ W) and of the head
(accumulated p.T @ h). Backward only scales them. The same matmuls (one forward, two backward), no
tokens x vocab tensor kept: the step's memory drops by 14-16 bytes x tokens x vocab (2 GiB at 4096
tokens and a 32k vocabulary), and the head + loss of a 2048-token step at vocab 8192, d 256 takes
~190 ms on a 2-core CPU instead of ~260-290 (benchmarks/train_throughput.py, `tiny` fp32:
0.94-0.98x the peers' step speed before, 1.03-1.17x after). Values equal
`F.cross_entropy(..., reduction="sum")`'s up to float rounding (tested, gradients too).

Under bf16/fp16 autocast the products run in that dtype as autocast's head does (16-bit operands,
logits and logits' gradient; fp32 accumulation, softmax and loss), emulated on fp32 kernels where
`minilab.bf16` emulates a missing bf16 GEMM. Used where it is simple: a plain bias-free head with
fp32 weights (`Transformer.fused_loss`), through `training.micro_batch_loss_sum`. Everything else
keeps the logits path.
"""

from __future__ import annotations

import torch

from minilab.bf16 import emulate_bf16

# Rows per chunk: as many as keep one chunk's logits near this size (a cache-sized buffer, and
# M large enough for the matmuls to run at full speed); the planner counts two such buffers.
CHUNK_BYTES = 16 * 2**20
MIN_ROWS = 32


def chunk_rows(vocab: int, tokens: int) -> int:
    """Rows of `tokens` that one chunk takes at this vocabulary (what training and the planner use)."""
    return max(1, min(tokens, max(MIN_ROWS, CHUNK_BYTES // (4 * vocab))))


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                dtype: torch.dtype, emulate: bool):
        n, vocab = h.shape[0], weight.shape[0]
        rows = chunk_rows(vocab, n)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        low = dtype is not torch.float32
        # the matmuls' operands rounded to `dtype` once (autocast's copies); emulated: upcast back to
        # fp32, the products' results rounded to `dtype` as a 16-bit GEMM's are (minilab.bf16)
        hl, wl = (h.to(dtype), weight.to(dtype)) if low else (h, weight)
        if emulate:
            hl, wl = hl.float(), wl.float()
        w_t = wl.t()
        for s in range(0, n, rows):
            hc, yc = hl[s:s + rows], targets[s:s + rows]
            logits = torch.mm(hc, w_t)                                                   # (rows, V)
            if low:
                logits = logits.to(dtype).float()                  # 16-bit logits, softmax in fp32
            valid = yc != ignore_index
            picked = torch.where(valid, yc, 0)[:, None]
            target = logits.gather(1, picked)
            top = logits.amax(dim=1, keepdim=True)
            p = logits.sub_(top).exp_()                     # one exp pass, in place: softmax * sum
            total = p.sum(dim=1, keepdim=True)
            loss += ((total.log() + top - target)[:, 0] * valid).sum()                  # log-sum-exp - target
            p.div_(total)
            p.scatter_add_(1, picked, torch.full(picked.shape, -1.0, dtype=p.dtype, device=p.device))
            if not bool(valid.all()):
                p.mul_(valid[:, None])                                                   # ignored rows: no gradient
            if not low:
                torch.mm(p, weight, out=grad_h[s:s + rows])
                if grad_w is not None:
                    grad_w.addmm_(p.t(), hc)
                continue
            pl = p.to(dtype)                                # the logits' gradient, 16-bit as autocast's
            if emulate:
                pl = pl.float()
            grad_h[s:s + rows] = torch.mm(pl, wl).to(dtype)
            if grad_w is not None:
                grad_w += torch.mm(pl.t(), hc).to(dtype)    # each chunk's share rounded, summed in fp32
            del logits, p, pl                               # one chunk's buffers at a time (the planner's)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # scaled in place (no second copy of the head's gradient): one backward per forward
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(grad_loss) if ctx.needs_input_grad[0] else None,
                grad_w.mul_(grad_loss) if grad_w is not None else None, None, None, None, None)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of `h @ weight.T` (h: (..., d), weight: (V, d)) against `targets` (...),
    positions equal to `ignore_index` skipped: `F.cross_entropy(logits, y, reduction="sum")`,
    without the logits. h and weight fp32 (the master weights); under bf16 or fp16 autocast the
    products run in that dtype as autocast's head would (16-bit operands and logits, the softmax
    and the loss in fp32), emulated on fp32 kernels where `minilab.bf16` emulates the CPU's bf16 GEMM."""
    if h.dtype is not torch.float32 or weight.dtype is not torch.float32:
        raise TypeError("linear_cross_entropy_sum takes fp32 h and weight (16-bit only through autocast)")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    dtype = autocast_dtype(h.device.type)
    emulate = dtype is torch.bfloat16 and emulate_bf16(h, h.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropySum.apply(h, weight, targets, ignore_index, dtype, emulate)


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast runs matmuls in on this device type now: bf16, fp16, or fp32 when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return torch.float32
    return torch.get_autocast_dtype(device_type)
