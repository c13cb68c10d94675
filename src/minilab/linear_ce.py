"""The LM head and the cross-entropy in one pass, a chunk of tokens at a time (fp32 training).

`F.cross_entropy(h @ W.T, y)` materializes the (tokens, vocab) logits, keeps them and their
log_softmax for backward, then writes a zero-filled gradient of the same size and the logits'
gradient: four fp32 tensors of tokens x vocab (the planner's `LOGIT_BYTES`: 16 bytes per entry),
each written to and read back from memory. Here each chunk of rows is done in one go while it is in
cache: logits, one exp pass, the loss, then, in the same buffer, the gradient softmax - onehot, and
at once the gradients of the hidden states (p @ W) and of the head (accumulated p.T @ h). Backward
only scales them. The same matmuls (one forward, two backward), no tokens x vocab tensor kept: the
step's memory drops by 16 bytes x tokens x vocab (2 GiB at 4096 tokens and a 32k vocabulary), and
the head + loss of a 2048-token step at vocab 8192, d 256 takes ~200 ms on a 2-core CPU instead of
~290 (benchmarks/train_throughput.py, `tiny` fp32: 0.94-0.98x the peers' step speed before,
1.03-1.17x after). Values equal `F.cross_entropy(..., reduction="sum")`'s up to float rounding
(tested, gradients too).

Used where it is simple: fp32 (no autocast), a plain bias-free head (`Transformer.fused_loss`),
through `training.micro_batch_loss_sum`. Everything else keeps the logits path.
"""

from __future__ import annotations

import torch

# Rows per chunk: as many as keep one chunk's logits near this size (a cache-sized buffer, and
# M large enough for the matmuls to run at full speed); the planner counts two such buffers.
CHUNK_BYTES = 16 * 2**20
MIN_ROWS = 32


def chunk_rows(vocab: int, tokens: int) -> int:
    """Rows of `tokens` that one chunk takes at this vocabulary (what training and the planner use)."""
    return max(1, min(tokens, max(MIN_ROWS, CHUNK_BYTES // (4 * vocab))))


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        n, vocab = h.shape[0], weight.shape[0]
        rows = chunk_rows(vocab, n)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        w_t = weight.t()
        for s in range(0, n, rows):
            hc, yc = h[s:s + rows], targets[s:s + rows]
            logits = torch.mm(hc, w_t)                                                   # (rows, V)
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
            torch.mm(p, weight, out=grad_h[s:s + rows])
            if grad_w is not None:
                grad_w.addmm_(p.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # scaled in place (no second copy of the head's gradient): one backward per forward
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(grad_loss) if ctx.needs_input_grad[0] else None,
                grad_w.mul_(grad_loss) if grad_w is not None else None, None, None)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of `h @ weight.T` (h: (..., d), weight: (V, d)) against `targets` (...),
    positions equal to `ignore_index` skipped: `F.cross_entropy(logits, y, reduction="sum")`,
    without the logits. fp32 only."""
    if h.dtype is not torch.float32 or weight.dtype is not torch.float32:
        raise TypeError("linear_cross_entropy_sum is fp32 only")
    return _LinearCrossEntropySum.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index)
