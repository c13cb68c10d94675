"""The LM head and the cross-entropy in one pass, a chunk of tokens at a time (training, evaluation).

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
`minilab.bf16` emulates a missing bf16 GEMM. A frozen head (LoRA, QLoRA) skips its product. Per
token (`reduction="none"`, DPO's log-probs: a different upstream gradient per token) see
`_LinearCrossEntropyPerToken`; under `no_grad` only the loss is computed. Used, through
`training.micro_batch_loss_sum` and `dpo.pair_logps`, by every training and evaluation of a model
whose logits are its plain bias-free head's: minilab's Transformer (`Transformer.fused_loss`, also under PEFT) and the
transformers architectures of `HF_FUSED_TYPES` (`finetune.models.LogitsOnly`). Everything else
(a biased or LoRA-wrapped head, scaled logits, torch.compile) keeps the logits path.
"""

from __future__ import annotations

import torch

from minilab.bf16 import emulates_gemm, is_plain_linear

# Rows per chunk: as many as keep one chunk's fp32 logits near this size. On a CPU a cache-sized
# buffer, M already large enough for its matmuls. On a GPU each chunk costs a dozen kernel
# launches and memory passes, and its products need thousands of rows to fill the chip. Measured
# on an H200 (bf16 autocast, head + loss, forward and backward, against the logits path):
# 16k tokens x 32k vocabulary, head trained, 16 / 64 / 256 MiB chunks 4.4 / 1.8 / 1.26x the time,
# holding 0.7 / 0.8 / 1.1 GiB of the logits path's 6.0; Qwen2's 152k vocabulary at 256 MiB 1.5x the
# time, 1.4 of 14.2 GiB; a whole small-preset bf16 step (8 x 1,024 tokens) ~1.1x, 3.7 of 6.2 GiB.
CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}
MIN_ROWS = 32
# transformers causal LMs whose logits are lm_head(model(...).last_hidden_state), soft-capped where
# `final_logit_softcapping` is set (Gemma 2's default); never scaled (Cohere, Granite scale theirs);
# checked for a plain head
HF_FUSED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"})
# False: every model keeps the logits path (benchmarks/finetune_memory.py compares the two; the
# planner still counts the fused line)
FUSE = True


def chunk_rows(vocab: int, tokens: int, device_type: str = "cpu") -> int:
    """Rows of `tokens` that one chunk takes at this vocabulary on this kind of device (what
    training and the planner use; accelerators other than CUDA, such as MPS, take its size)."""
    return max(1, min(tokens, max(MIN_ROWS, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"]) // (4 * vocab))))


class _Products:
    """The head's products for one call, in `dtype`: the operands rounded to it once (as autocast's
    copies); emulated, upcast back to fp32 with each product's result rounded to `dtype` as a 16-bit
    GEMM's is (minilab.bf16). With `softcap` (Gemma 2) the logits are cap * tanh(logits / cap)."""

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, emulate: bool,
                 softcap: float | None):
        self.dtype, self.low, self.emulate, self.softcap = dtype, dtype is not torch.float32, emulate, softcap
        self.h, self.w = h.to(dtype), weight.to(dtype)
        if emulate:
            self.h, self.w = self.h.float(), self.w.float()
        self.dcap: torch.Tensor | None = None   # this chunk's d(capped)/d(logits), for `backward`

    def logits(self, s: int, rows: int, grad: bool) -> torch.Tensor:
        """fp32 logits of rows s:s+rows (16-bit logits upcast, as autocast's head + fp32 loss)."""
        logits = torch.mm(self.h[s:s + rows], self.w.t())                               # (rows, V)
        logits = logits.to(self.dtype).float() if self.low else logits
        if self.softcap is not None:
            t = logits.div_(self.softcap).tanh_()
            self.dcap = torch.mul(t, t).neg_().add_(1) if grad else None                # 1 - tanh^2
            logits = t.mul_(self.softcap)
        return logits

    def backward(self, g: torch.Tensor, s: int, rows: int, grad_h: torch.Tensor, grad_w: torch.Tensor | None):
        """From the logits' gradient `g` (fp32, rows x V): h's gradient into grad_h[s:s+rows], the
        head's added to grad_w (fp32; None for a frozen head)."""
        if self.dcap is not None:                            # through the soft-cap
            g, self.dcap = g.mul_(self.dcap), None
        hc = self.h[s:s + rows]
        if not self.low:
            torch.mm(g, self.w, out=grad_h[s:s + rows])
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc)
            return
        g = g.to(self.dtype)                                 # the logits' gradient, 16-bit as autocast's
        if self.emulate:
            g = g.float()
        grad_h[s:s + rows] = torch.mm(g, self.w).to(self.dtype)
        if grad_w is not None:
            grad_w += torch.mm(g.t(), hc).to(self.dtype)      # each chunk's share rounded, summed in fp32


def _chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of fp32 logits: each row's loss (log-sum-exp - target logit, 0 where ignored), its
    log-sum-exp, and (`grad`) in the logits' own buffer their gradient softmax - onehot (0 on
    ignored rows); one exp pass, one scaling pass (the softmax's division and the ignored rows'
    zeros together, without asking the device whether any row is ignored)."""
    valid = targets != ignore_index
    picked = torch.where(valid, targets, 0)[:, None]
    target = logits.gather(1, picked)
    top = logits.amax(dim=1, keepdim=True)
    p = logits.sub_(top).exp_()                             # in place: softmax * sum
    total = p.sum(dim=1, keepdim=True)
    lse = (total.log() + top)[:, 0]
    loss = (lse - target[:, 0]) * valid
    if not grad:
        return loss, lse, None
    keep = valid.to(p.dtype)[:, None]
    p.mul_(keep / total)
    p.scatter_add_(1, picked, -keep)
    return loss, lse, p


def _grad_buffers(h: torch.Tensor, weight: torch.Tensor, head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 gradient accumulators for h and (`head`: not frozen) the head."""
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if head else None
    return torch.empty(h.shape, dtype=torch.float32, device=h.device), grad_w


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed loss; every gradient computed in forward (the upstream gradient is one scalar)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                dtype: torch.dtype, emulate: bool, softcap: float | None):
        n, rows = h.shape[0], chunk_rows(weight.shape[0], h.shape[0], h.device.type)
        grad_h, grad_w = _grad_buffers(h, weight, ctx.needs_input_grad[1])
        ctx.dtypes = (h.dtype, weight.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        prod = _Products(h, weight, dtype, emulate, softcap)
        for s in range(0, n, rows):
            rows_loss, _, p = _chunk(prod.logits(s, rows, True), targets[s:s + rows], ignore_index, grad=True)
            loss += rows_loss.sum()
            prod.backward(p, s, rows, grad_h, grad_w)
            del p                                           # one chunk's buffers at a time
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # scaled in place (no second copy of the head's gradient): one backward per forward
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                grad_w.mul_(grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None) + (None,) * 5


class _LinearCrossEntropyPerToken(torch.autograd.Function):
    """Each token's loss (DPO's log-probabilities; evaluation). A token's upstream gradient only
    scales its own row of h's gradient, so with a frozen head (LoRA, QLoRA) that is computed in
    forward and scaled in backward; a trained head's gradient sums over tokens with their upstream
    gradients, so then backward recomputes each chunk's logits from the saved log-sum-exp. Without
    gradients (`torch.no_grad`), only the loss."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                dtype: torch.dtype, emulate: bool, softcap: float | None, grads: bool):
        n, rows = h.shape[0], chunk_rows(weight.shape[0], h.shape[0], h.device.type)
        prod = _Products(h, weight, dtype, emulate, softcap)
        ctx.args, ctx.dtypes = (ignore_index, dtype, emulate, softcap), (h.dtype, weight.dtype)
        ctx.recompute = grads and ctx.needs_input_grad[1]
        in_forward = grads and not ctx.recompute                  # h's gradient now, per row
        grad_h = _grad_buffers(h, weight, False)[0] if in_forward else None
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, rows):
            out[s:s + rows], lse[s:s + rows], p = _chunk(prod.logits(s, rows, in_forward), targets[s:s + rows],
                                                         ignore_index, grad=in_forward)
            if in_forward:
                prod.backward(p, s, rows, grad_h, None)
            del p
        if ctx.recompute:
            ctx.save_for_backward(h, weight, targets, lse)
        elif in_forward:
            ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.recompute:
            (grad_h,) = ctx.saved_tensors
            return (grad_h.mul_(grad_out.float()[:, None]).to(ctx.dtypes[0]),) + (None,) * 7
        h, weight, targets, lse = ctx.saved_tensors
        ignore_index, dtype, emulate, softcap = ctx.args
        n, rows = h.shape[0], chunk_rows(weight.shape[0], h.shape[0], h.device.type)
        grad_h, grad_w = _grad_buffers(h, weight, True)
        prod = _Products(h, weight, dtype, emulate, softcap)
        for s in range(0, n, rows):
            yc = targets[s:s + rows]
            valid = yc != ignore_index
            g = (grad_out[s:s + rows].float() * valid)[:, None]
            p = prod.logits(s, rows, True).sub_(lse[s:s + rows, None]).exp_().mul_(g)  # g x softmax
            p.scatter_add_(1, torch.where(valid, yc, 0)[:, None], -g)                  # - g at the target
            prod.backward(p, s, rows, grad_h, grad_w)
            del p
        return (grad_h.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                grad_w.to(ctx.dtypes[1])) + (None,) * 6


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "sum", softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` (h: (..., d), weight: (V, d)) against `targets` (...),
    positions equal to `ignore_index` skipped: `F.cross_entropy(logits, y, reduction=...)` for
    "sum" (a scalar) or "none" (targets' shape, 0 where ignored), without the logits. The products
    run in autocast's dtype where it is on (16-bit operands and logits, the softmax and the loss in
    fp32, as autocast's head), else in the head's dtype (fp32, or a 16-bit model's); bf16 is
    emulated on fp32 kernels where `minilab.bf16` emulates the CPU's bf16 GEMM. A head that needs no
    gradient (LoRA, QLoRA) skips its product. `softcap`: logits soft-capped to cap * tanh(logits / cap)
    before the loss (Gemma 2's `final_logit_softcapping`)."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', not {reduction!r}")
    shape = targets.shape
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    dtype = autocast_dtype(h.device.type) or weight.dtype
    emulate = dtype is torch.bfloat16 and emulates_gemm(h.device, h.shape[0])
    # gradients are computed in forward: only where they will be used (not in evaluation)
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(h.device.type, enabled=False):
        if reduction == "sum" and grads:
            return _LinearCrossEntropySum.apply(h, weight, targets, ignore_index, dtype, emulate, softcap)
        out = _LinearCrossEntropyPerToken.apply(h, weight, targets, ignore_index, dtype, emulate, softcap, grads)
    return out.view(shape) if reduction == "none" else out.sum()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type now (bf16, fp16), None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def peft_base(module):
    """The model a PEFT wrapper holds (its LoRA layers injected in place; its forward passes our
    keyword arguments through), else `module` itself."""
    return module.get_base_model() if hasattr(type(module), "get_base_model") else module


def hf_fuses_loss(lm) -> bool:
    """Whether a transformers causal LM (its LoRA layers injected, if any) may train through
    `linear_cross_entropy(lm.model(ids).last_hidden_state, lm.lm_head.weight, ...)`."""
    config = getattr(lm, "config", None)
    return getattr(config, "model_type", None) in HF_FUSED_TYPES and hasattr(lm, "model") \
        and is_plain_linear(lm.get_output_embeddings())
