"""Memory estimates: inference and training (full, LoRA, QLoRA), each term its own line.

Formulas and sources are in `shared/reference/memory-formulas.md` and `docs/planner.md`; the
constants marked *calibrated* were fitted to measured CPU peaks by `benchmarks/planner_accuracy.py`,
and the CUDA terms (`target="cuda"`) checked against `torch.cuda.max_memory_allocated` by its
`--device cuda` mode (within 6.1% on an H200, 2026-12-04).

Peak training memory is not the sum of every line: parameter gradients appear during backward
while the saved activations are being freed. The planner takes the larger of two phases:

- backward: weights + optimizer state + master copy + saved activations + logits/loss tensors
  (+ the dequant and LoRA temporaries), plus all gradients on a CPU (glibc rarely reuses the
  freed blocks for them); on CUDA the caching allocator does, so the larger of the saved tensors
  and the gradients;
- optimizer step: weights + optimizer state + master copy + all gradients + the step's
  temporaries (foreach AdamW's fp32 sqrt(v) per parameter on a CPU; none for the fused CUDA kernel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from minilab.errors import ConfigError
from minilab.linear_ce import chunk_rows
from minilab.planner.anatomy import Anatomy, nf4_bytes, weight_bytes
from minilab.screened_head import MIN_SCREENED_ELEMENTS, screened_head_bytes

METHODS = ("inference", "full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd")
ATTENTION = ("sdpa", "flash", "eager")
# Bytes per trainable parameter of optimizer state. bnb 8-bit Adam: two uint8 states plus one fp32
# absmax per 256-value block each.
OPTIMIZER_STATE = {"adamw": 8.0, "paged-adamw": 8.0, "adamw-8bit": 2 * (1 + 4 / 256),
                   "paged-adamw-8bit": 2 * (1 + 4 / 256), "sgd": 4.0}
CUDA_CONTEXT = 512 * 2**20   # CUDA context + cuBLAS workspace: 0.3-1 GiB in practice (reference 3.)
CPU_RUNTIME = 400 * 2**20    # Python + torch (+ transformers) libraries resident before any tensor
# Logits and loss tensors per (token x vocab entry), *calibrated* on CPU fp32: logits, log_softmax
# output, its gradient and the logits' gradient (4 fp32 tensors); 16-bit adds the fp32 upcast.
LOGIT_BYTES = {"fp32": 16, "16bit": 14}
# LoRA's forward allocates the base output, the adapter output, its scaled copy and their sum for
# every targeted linear. They are freed at once, but glibc's malloc (dynamic mmap threshold) keeps
# the memory resident: with MALLOC_MMAP_THRESHOLD_=131072 the excess disappears. Measured on CPU it
# is this many adapter-output widths per token per block (*calibrated* with the fused head, whose
# small logits no longer hide it; it varies 1-3x with size, and one run's RSS by up to 25%).
LORA_TRANSIENT = 2.75


@dataclass
class PlanRequest:
    """What to plan for. Defaults follow the common recipes of each method."""

    method: str = "full"
    batch_size: int = 1
    seq_len: int = 512
    precision: str | None = None          # None: fp32 on CPU, bf16-mixed (full) or bf16 on CUDA
    grad_checkpointing: bool | None = None  # None: on for QLoRA (PEFT's prepare_model_for_kbit_training)
    attention: str = "sdpa"
    optimizer: str = "adamw"
    lora_rank: int = 8
    lora_targets: list[str] | None = None   # module name suffixes; None = every decoder linear
    double_quant: bool = True
    target: str = "cpu"                     # "cpu" or "cuda": where the run happens
    kv_dtype: str | None = None             # inference KV cache dtype; default the compute dtype
    quant: str | None = None                # inference weights: None (compute dtype), "int8" or "nf4"

    def resolved(self) -> PlanRequest:
        """A copy with the None defaults filled in and every choice checked."""
        r = PlanRequest(**asdict(self))
        for name, value, allowed in (("method", r.method, METHODS), ("attention", r.attention, ATTENTION),
                                     ("optimizer", r.optimizer, OPTIMIZERS), ("target", r.target, ("cpu", "cuda"))):
            if value not in allowed:
                raise ConfigError(f"'{value}' is not one of {', '.join(allowed)}", key=name)
        if r.precision is None:
            r.precision = "fp32" if r.target == "cpu" else ("bf16-mixed" if r.method == "full" else "bf16")
        if r.precision not in PRECISIONS:
            raise ConfigError(f"'{r.precision}' is not one of {', '.join(PRECISIONS)}", key="precision")
        if r.quant not in (None, "int8", "nf4"):
            raise ConfigError(f"'{r.quant}' is not one of int8, nf4", key="quant")
        if r.grad_checkpointing is None:
            r.grad_checkpointing = r.method == "qlora"
        for key in ("batch_size", "seq_len", "lora_rank"):
            if getattr(r, key) <= 0:
                raise ConfigError("must be positive", key=key)
        return r


@dataclass
class Line:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    lines: list[Line]
    peak: int                      # the model's working memory at its peak (what the benchmark measures)
    runtime: int                   # CUDA context / Python + torch: its own line, added for the verdict
    phases: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0

    @property
    def total(self) -> int:
        return self.peak + self.runtime

    def to_dict(self) -> dict[str, Any]:
        return {"lines": [asdict(x) for x in self.lines], "peak_bytes": self.peak, "runtime_bytes": self.runtime,
                "total_bytes": self.total, "phases": self.phases, "trainable_params": self.trainable_params}


def _is16(precision: str) -> bool:
    return precision != "fp32"


def lora_params(an: Anatomy, rank: int, targets: list[str] | None) -> int:
    """Adapter parameters: r * (in + out) for every targeted linear (A is r x in, B is out x r)."""
    chosen = [lin for lin in an.linears if lin.quantized and
              (targets is None or lin.name.rsplit(".", 1)[-1] in targets)]
    if not chosen:
        raise ConfigError(f"no linear layer matches {targets}; names in this model: "
                          f"{', '.join(sorted({lin.name.rsplit('.', 1)[-1] for lin in an.linears}))}",
                          key="lora_targets")
    return sum(rank * (lin.in_features + lin.out_features) for lin in chosen)


def layer_activation_elems(an: Anatomy, frozen: bool, attention: str, seq_len: int) -> tuple[int, int]:
    """(norm-path elements, matmul-path elements) saved for backward per token by one block.

    Counted from what autograd keeps in a LLaMA block (RMSNorm input, normalised value and
    output: 3h per norm; RoPE'd q and k, v, the attention output and its reshaped copy; SwiGLU's
    gate, silu, up and product: 4I). Frozen norms (LoRA) keep only their input and output. Eager
    attention also keeps the s x s probabilities of every head (twice: softmax output and its
    cast), which SDPA/flash kernels never materialise.
    """
    q = an.n_head * an.head_dim
    norm = (2 if frozen else 3) * an.hidden * 2
    matmul = 3 * q + 2 * an.kv_width + 4 * an.intermediate
    if attention == "eager":
        matmul += 2 * an.n_head * seq_len
    return norm, matmul


def _lora_transients(an: Anatomy, req: PlanRequest) -> int:
    """Temporaries of the LoRA-wrapped linears' forward passes (see LORA_TRANSIENT)."""
    per_layer = sum(lin.out_features for lin in an.linears if lin.quantized and
                    (req.lora_targets is None or lin.name.rsplit(".", 1)[-1] in req.lora_targets)) / an.n_layer
    layers = 1 if req.grad_checkpointing else an.n_layer
    act = 2 if _is16(req.precision) else 4
    return int(LORA_TRANSIENT * per_layer * layers * req.batch_size * req.seq_len * act)


def _adapted_in_features(an: Anatomy, req: PlanRequest) -> float:
    """Input widths of the linears that get adapters, summed per block."""
    return sum(lin.in_features for lin in an.linears if lin.quantized and
               (req.lora_targets is None or lin.name.rsplit(".", 1)[-1] in req.lora_targets)) / an.n_layer


def cuda_block_bytes(an: Anatomy, req: PlanRequest, frozen: bool) -> int:
    """Bytes saved for backward per token by one block on CUDA (counted from the tensors autograd
    keeps, checked against max_memory_allocated). F.rms_norm's fused kernel keeps its fp32 input
    (and the rms), not the normalised value, where input and weight are fp32; the 16-bit path
    keeps the fp32 upcast (and, its weight trained, the normalised value). A linear keeps its
    input: one tensor per norm, but autocast casts it once per linear (q, k, v; gate, up). With
    adapters in 16 bits each adapted linear keeps a fresh copy (PEFT casts the input to the
    adapter's fp32 and autocast back) and the frozen base none; bitsandbytes' 4-bit layer keeps one
    more. The attention keeps rotated q and k, v and its output (whose reshape for o_proj is a
    view); SwiGLU its 4 I-wide tensors, the product being down_proj's input."""
    act = 2 if _is16(req.precision) else 4
    norms = 2 * an.hidden * 4 * (2 if not frozen and req.precision in ("bf16", "fp16") else 1)
    q = an.n_head * an.head_dim
    attn = (2 * q + 2 * an.kv_width) * act + (2 * an.n_head * req.seq_len * act if req.attention == "eager" else 0)
    if frozen and _is16(req.precision):  # the adapted linears' copies (one is the product), gate, up, silu
        kept = _adapted_in_features(an, req) * (2 if req.method == "qlora" else 1) + 3 * an.intermediate
    else:                                # the linears' inputs, gate, up, silu and their product
        kept = (5 if req.precision.endswith("-mixed") else 2) * an.hidden + 4 * an.intermediate
    return int(norms + attn + kept * act)


def activation_bytes(an: Anatomy, req: PlanRequest, frozen: bool) -> tuple[int, str]:
    """Saved activations of all blocks for one micro-batch, and how they were counted."""
    tokens = req.batch_size * req.seq_len
    act = 2 if _is16(req.precision) else 4
    # Under autocast the residual stream and norms stay fp32; with 16-bit weights they are 16-bit.
    resid = 4 if req.precision in ("fp32", "bf16-mixed", "fp16-mixed") else 2
    if req.target == "cuda":
        per_layer = tokens * cuda_block_bytes(an, req, frozen)
    else:
        norm, matmul = layer_activation_elems(an, frozen, req.attention, req.seq_len)
        per_layer = tokens * (norm * resid + matmul * act)
    if req.grad_checkpointing:
        # Only each block's input is kept; one block is recomputed (and held) during its backward.
        return an.n_layer * tokens * an.hidden * resid + per_layer, "checkpointed: L x input + one block"
    return an.n_layer * per_layer, f"{an.n_layer} blocks x {per_layer / tokens:.0f} B/token"


def _logits(an: Anatomy, req: PlanRequest, tokens_with_logits: int, training: bool) -> int:
    if not training:
        return tokens_with_logits * an.vocab * (2 if _is16(req.precision) else 4)
    if not an.fused_loss:  # as training.fuses_loss decides, in every method (LoRA never wraps the head)
        return tokens_with_logits * an.vocab * LOGIT_BYTES["16bit" if _is16(req.precision) else "fp32"]
    # head and loss fused (minilab.linear_ce): the gradients of the hidden states and (full training)
    # of the head, computed in forward and held until backward (tied, the embedding's own gradient
    # and their sum join them at the end of backward), and a chunk of rows at a time: in fp32 two
    # chunks of logits (*calibrated* by benchmarks/planner_accuracy.py); in 16 bits the 16-bit
    # copies of h and the head, one chunk's 16-bit logits, their fp32 copy, its 16-bit gradient
    # and 16-bit share of the head's gradient. On CUDA (measured) the caching allocator reuses the
    # chunk's buffers, and a tied head's gradient meets the embedding's only at the end of
    # backward, when the activations are freed: one chunk, one head gradient.
    cuda = req.target == "cuda"
    rows = chunk_rows(an.vocab, tokens_with_logits, req.target)
    head = an.vocab * an.hidden if req.method == "full" else 0
    held = 4 * (tokens_with_logits * an.hidden + (3 if an.tied and not cuda else 1) * head)
    chunk = 4 * rows * an.vocab if an.logit_softcap else 0  # the soft-cap's fp32 derivative, one chunk
    if req.precision == "fp32":
        return held + chunk + 4 * (1 if cuda else 2) * rows * an.vocab
    return held + chunk + 2 * (tokens_with_logits + an.vocab) * an.hidden + 6 * rows * an.vocab + 2 * head


def _runtime(req: PlanRequest) -> Line:
    if req.target == "cuda":
        return Line("runtime", "CUDA context + workspace", CUDA_CONTEXT, "not in max_memory_allocated")
    return Line("runtime", "Python + torch runtime", CPU_RUNTIME, "resident before the first tensor")


def plan_inference(an: Anatomy, req: PlanRequest) -> MemoryPlan:
    """Weights + KV cache for batch x context + prefill transients (logits, one block) + runtime."""
    fmt = req.quant or ("fp32" if req.precision == "fp32" else "bf16")
    wbytes = weight_bytes(an, fmt, req.double_quant)
    kv_item = {"fp32": 4, "int8": 1}.get(req.kv_dtype or ("fp32" if req.precision == "fp32" else "bf16"), 2)
    tokens = req.batch_size * req.seq_len
    kv = 2 * an.n_layer * an.kv_width * kv_item * tokens
    lines = [Line("weights", f"weights ({fmt})", wbytes),
             Line("kv_cache", f"KV cache ({req.batch_size} x {req.seq_len} tokens)", kv,
                  f"{2 * an.n_layer * an.kv_width * kv_item} B/token, {an.n_kv_head} KV heads")]
    if an.sliding_window and an.sliding_window < req.seq_len:
        rolling = 2 * an.n_layer * an.kv_width * kv_item * req.batch_size * an.sliding_window
        lines[-1].note += f"; {rolling / 2**20:.0f} MiB with a rolling {an.sliding_window}-token window"
    act = 2 if _is16(req.precision) else 4
    # No autograd: only one block's intermediates live at once (SwiGLU's three I-wide tensors,
    # q/k/v and the attention output).
    block = tokens * (3 * an.intermediate + 4 * an.hidden) * act
    logits = _logits(an, req, tokens, training=False)
    lines += [Line("activations", "prefill activations (one block)", block),
              Line("logits", "prefill logits (every position)", logits, "generate keeps only the last: b x V")]
    screen = 0
    if req.target == "cpu" and fmt == "fp32" and an.vocab * an.hidden >= MIN_SCREENED_ELEMENTS:
        screen = screened_head_bytes(an.vocab, an.hidden)
        lines.append(Line("screen", "greedy screen (int8 copy of the head)", screen,
                          "use_decode_layout: greedy steps read it instead of the fp32 head"))
    # on CUDA the head's logits reuse the blocks' freed transients (measured: 0.98 of the peak
    # for small and base at batch 8-16, where their sum said 1.09); glibc keeps them on a CPU
    peak = wbytes + kv + screen + (max(block, logits) if req.target == "cuda" else block + logits)
    return MemoryPlan(lines + [_runtime(req)], peak, _runtime(req).bytes, {"prefill": peak})


def plan_training(an: Anatomy, req: PlanRequest) -> MemoryPlan:
    """Full fine-tuning, LoRA or QLoRA: one line per term, peak = max(backward, step)."""
    lines: list[Line] = []
    full = req.method == "full"
    w16 = req.precision in ("bf16", "fp16")
    if req.method == "qlora":
        quant = sum(nf4_bytes(lin.weight_numel, req.double_quant) for lin in an.linears if lin.quantized)
        other = an.params - an.quantized_numel
        lines += [Line("weights", "weights, decoder linears (nf4" + (", double quant)" if req.double_quant else ")"),
                       quant),
                  Line("upcast", "embeddings/head/norms upcast to fp32 (PEFT)", other * 4,
                       "prepare_model_for_kbit_training casts non-4-bit params to fp32")]
        weights = quant + other * 4
    else:
        wb = 2 if (w16 or (req.method == "lora" and _is16(req.precision))) else 4
        weights = an.params * wb
        lines.append(Line("weights", f"weights ({'16-bit' if wb == 2 else 'fp32'})", weights))
    trainable = an.params if full else lora_params(an, req.lora_rank, req.lora_targets)
    if full:
        grad_b = 2 if w16 else 4
        master = 4 * trainable if w16 else 0
    else:
        lines.append(Line("adapters", f"LoRA adapters (r={req.lora_rank}, fp32)", 4 * trainable,
                          f"{trainable:,} params"))
        grad_b, master = 4, 0
        weights += 4 * trainable
    grads = grad_b * trainable
    optim = int(OPTIMIZER_STATE[req.optimizer] * trainable)
    lines.append(Line("grads", f"gradients ({'16-bit' if grad_b == 2 else 'fp32'})", grads))
    note = "paged: may spill to host RAM at peaks" if req.optimizer.startswith("paged") else ""
    lines.append(Line("optimizer", f"optimizer state ({req.optimizer})", optim, note))
    if master:
        lines.append(Line("master", "fp32 master weights", master))
    # the fused head rounds its weight itself, for the head's forward only (in the logits line)
    autocast = 2 * (an.params - (an.vocab * an.hidden if an.fused_loss else 0)) \
        if (req.precision.endswith("-mixed") and full) else 0
    if autocast:
        lines.append(Line("autocast", "16-bit weight copies (autocast cache)", autocast, "during forward/backward"))
    acts, how = activation_bytes(an, req, frozen=not full)
    lines.append(Line("activations", f"activations ({req.attention}"
                      + (", checkpointing)" if req.grad_checkpointing else ")"), acts, how))
    logits = _logits(an, req, req.batch_size * req.seq_len, training=True)
    lines.append(Line("logits", "head + loss fused, by chunks (linear_ce)" if an.fused_loss
                      else "logits + loss (fp32 upcast, grads)", logits))
    dequant = 0
    if req.method == "qlora":
        dequant = max(lin.weight_numel for lin in an.linears if lin.quantized) * 2
        lines.append(Line("dequant", "dequantized weight (largest linear, bf16)", dequant, "per-layer temporary"))
    lora_tmp = 0
    if not full and req.target == "cpu":  # the CUDA caching allocator reuses them at once (measured)
        lora_tmp = _lora_transients(an, req)
        lines.append(Line("lora_tmp", "LoRA forward temporaries", lora_tmp,
                          f"{LORA_TRANSIENT} x adapter outputs per token (calibrated)"))
    # foreach AdamW keeps one fp32 sqrt(v) per parameter during the step (CPU peaks, calibrated);
    # the fused CUDA kernel minilab uses there, 8-bit and SGD update in place.
    step_tmp = 4 * trainable if req.optimizer in ("adamw", "paged-adamw") and req.target == "cpu" else 0
    lines.append(Line("step_tmp", "optimizer-step temporaries", step_tmp,
                      "foreach AdamW sqrt(v)" if step_tmp else "updated in place"))
    fixed = weights + optim + master
    saved = acts + logits + dequant + lora_tmp
    if req.target == "cuda":
        # Gradients are written into the blocks the freed activations leave in the caching
        # allocator: the peak is at the start of backward, or all gradients at its end (measured).
        backward = fixed + autocast + max(saved, grads)
    else:
        # On CPU the freed blocks (many, small, other sizes) are rarely reused for the gradients:
        # measured peaks match the full sum (calibrated).
        backward = fixed + autocast + saved + grads
    step = fixed + grads + step_tmp
    lines.append(_runtime(req))
    return MemoryPlan(lines, max(backward, step), _runtime(req).bytes,
                      {"backward": backward, "optimizer_step": step}, trainable)


def plan_memory(an: Anatomy, req: PlanRequest) -> MemoryPlan:
    req = req.resolved()
    return plan_inference(an, req) if req.method == "inference" else plan_training(an, req)
