"""`ScreenedHead`: the greedy token of a large output head read from an int8 copy, exactly.

Why: decoding a model whose weights do not fit the CPU's caches streams every weight from memory
once a token, and the output head is the largest single read (`tiny`: 32 MiB of its 52 a token).
Greedy decoding needs only the head's argmax, not its logits. So the head is also kept as int8
rows with a scale each (a quarter of the bytes) and one token's step reads that: approximate logits
`a_v`, each with a rigorous bound `b_v` on how far the fp32 product's logit can be from it. Only
the rows whose interval [a_v - b_v, a_v + b_v] reaches the best lower bound can hold the maximum;
their fp32 logits are then computed from the fp32 head and the largest wins, lowest id on a tie, as
`argmax` picks. Measured: one candidate in almost every step with random weights, 1.9 on average
(half the steps one) with the demo's trained model; on one thread, `tiny` decodes a token in 2.5 ms
at batch 1 instead of 3.8 with the fp32 head, a batch-8 step in 8.3 ms instead of 13.5; tests hold
the tokens equal to the full product's.

The bound, for hidden state x (fp32), head row w, its int8 row q with bf16 scale s (w~ = s q, exact
in fp32, as the kernel forms it), x_b = bf16(x) (the kernel's input, |x - x_b| <= 2^-9 |x|), K = the
width, u = 2^-24, gamma = 2 K u:
    |x.w - x.w~| <= |x| |w - w~|                     (quantisation, Cauchy-Schwarz)
    |x.w~ - x_b.w~| <= 2^-9 |x| |w~|                  (the bf16 input)
    the kernel's fp32 accumulation <= gamma |x_b| |w~|, its bf16 output <= 2^-7 |a_v|,
    and the fp32 product itself is within gamma |x| |w| of x.w,
so b_v = |x| rho_v + 2^-7 |a_v| with rho_v = |w - w~| + gamma (1.01 |w~| + |w|) + 2^-9 |w~| (each
+1%, and 1e-6 spare), rho_v computed once. `tests/test_screened_head.py` checks every logit's error
against it on the CPU's own kernel. Not exact only where two fp32 logits are within rounding of each
other (then the full and the gathered product, two float orders, may pick differently).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Rows x head elements (vocab x width) a step multiplies from which its argmax through the screen
# beats the fp32 product: below, the head stays in the CPU's caches from one token to the next and
# the screen's fixed cost exceeds what it saves. Measured, ms a step: `micro` (8192 x 128) at 1 row
# 0.57 fp32 / 0.66 screened, 2 rows 0.83 / 0.83, 4 rows 1.26 / 1.15, 8 rows 1.85 / 1.53; `tiny`
# (32768 x 256) 3.8 / 2.5 at 1 row.
SCREEN_PAYS_ELEMENTS = 4 * 2**20
# The heads `use_decode_layout` builds a screen for: those a step of 8 rows (serve's default
# concurrency, a batch of prompts) makes pay
MIN_SCREENED_ELEMENTS = SCREEN_PAYS_ELEMENTS // 8
# Ids a block of the approximate logits holds: `candidates` takes each block's maximum, then looks
# only into the blocks that pass (fp32 maxima of 64-256 ids ran at the speed of one whole-row max)
BLOCK = 128
# The bf16 output's rounding, relative to the approximate logit: 2^-8 |t| <= 2^-7 |a| (+1%)
OUTPUT = 2.0**-7 * 1.01
# Steps of a row count that time the screen and the fp32 head each before the faster is kept
# (`ScreenedHead.tokens`)
TRIALS = 3


def bound(norm, rho, a_abs):
    """b_v = |x| rho_v + OUTPUT |a_v| + 1e-6 (the module docstring's), for Python floats or tensors."""
    return norm * rho + OUTPUT * a_abs + 1e-6


def screen_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def screened_head_bytes(vocab: int, width: int) -> int:
    """Memory a `ScreenedHead` holds besides the head: int8 rows, a bf16 scale and an fp32 bound each,
    for the vocabulary padded to whole `BLOCK`s."""
    return -(-vocab // BLOCK) * BLOCK * (width + 2 + 4)


class ScreenedHead:
    """The exact greedy tokens of `h @ head` from an int8 copy of the head (see the module docstring).
    `head`: the fp32 (width, vocab) weight as the decoding step multiplies it (a view is fine)."""

    def __init__(self, head: torch.Tensor, always: bool = False):
        if head.dtype is not torch.float32 or head.dim() != 2 or head.device.type != "cpu":
            raise ValueError("ScreenedHead takes a 2-D fp32 CPU head")
        self.head, self.version = head, head._version
        vocab, width = head.shape[1], head.shape[0]
        gamma = 2 * width * 2.0**-24
        # rows padded to whole blocks (zero rows, their logits set to -inf): see `candidates`
        padded = -(-vocab // BLOCK) * BLOCK
        self.q = torch.zeros(padded, width, dtype=torch.int8)
        self.scale = torch.ones(padded, dtype=torch.bfloat16)
        self.rho = torch.zeros(padded)
        for start in range(0, vocab, 4096):  # a slice of rows at a time: the temporaries stay small
            w = head.detach()[:, start:start + 4096].t()                                # (rows, K)
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-30).to(torch.bfloat16)     # the kernel's scales
            q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)
            w_q = q * scale.float()[:, None]                                             # exact in fp32
            q_norm = w_q.norm(dim=1)
            # |fp32 logit - approximate logit| <= |x| * rho_v + 2^-7 |a_v| (the module docstring's terms)
            rho = (w - w_q).norm(dim=1) + gamma * (1.01 * q_norm + w.norm(dim=1)) + 2.0**-9 * q_norm
            self.q[start:start + len(w)] = q
            self.scale[start:start + len(w)] = scale
            self.rho[start:start + len(w)] = rho * 1.01
        self.vocab, self.rho_max = vocab, float(self.rho.max())
        # rows from which a step may read the screen rather than the fp32 head (`always`: from one)
        self.min_rows = 1 if always else -(-SCREEN_PAYS_ELEMENTS // (vocab * width))
        self.pays: dict[int, bool] = {}  # rows -> whether the screen ran faster than the fp32 head (`tokens`)
        self.trials: dict[int, dict[bool, list[float]]] = {}  # rows -> each side's times so far
        self.always = always

    def fresh(self, head: torch.Tensor) -> bool:
        """Whether `head` is still the tensor (and the values) this screen was built from."""
        return head.data_ptr() == self.head.data_ptr() and head._version == self.version

    def _approximate(self, h: torch.Tensor) -> torch.Tensor:
        """The approximate logits, fp32 (B, padded vocab), the padding's -inf."""
        a = torch._weight_int8pack_mm(h.to(torch.bfloat16), self.q, self.scale).float()
        if len(self.q) > self.vocab:
            a[:, self.vocab:] = float("-inf")
        return a

    def bounds(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b): approximate logits and how far from each the fp32 product's logit can be, both (B, V);
        h (B, width) fp32."""
        a = self._approximate(h)[:, :self.vocab]
        return a, bound(h.norm(dim=1, keepdim=True), self.rho[:self.vocab], a.abs())

    def candidates(self, h: torch.Tensor) -> list[list[int]]:
        """For each row of h (B, width) fp32, the ids whose interval reaches the row's best lower
        bound, ascending (the maximum of `h @ head` is among them; none when h holds NaN or inf).

        In one pass over the approximate logits (then small tensors): each block of `BLOCK` ids'
        maximum, the row's top id t among them; its lower end L = a_t - b_t bounds the row's maximum
        from below, and an id's upper end a_v + b_v <= a_v + OUTPUT |a_v| + |x| max(rho) + 1e-6 can
        reach L only above a threshold that the top id alone passes in almost every row. Only the
        blocks whose maximum passes are looked into; where ids besides t pass, their own intervals
        decide, as in `bounds`. (Each pass over a (B, V) tensor costs: bf16 reductions, argmax,
        nonzero over it ran 4-20x slower than an fp32 max.)"""
        B = h.shape[0]
        a = self._approximate(h)
        blocks = a.view(B, -1, BLOCK)
        block_max = blocks.amax(dim=2)                                                   # (B, blocks)
        hi, block = block_max.max(dim=1)
        top_block = blocks.gather(1, block.view(B, 1, 1).expand(B, 1, BLOCK))[:, 0]       # (B, BLOCK)
        top = block * BLOCK + top_block.argmax(dim=1)
        # per row, in float64 from fp32 values (NaN stays NaN, and then nothing passes)
        thresholds = []
        for norm, a_top, rho_top in torch.stack((h.norm(dim=1), hi, self.rho.index_select(0, top)), 1).tolist():
            lower = a_top - bound(norm, rho_top, abs(a_top))                             # L
            reach = lower - norm * self.rho_max - 1e-6                 # a_v + OUTPUT |a_v| must reach this
            thresholds.append(min(reach / (1 + OUTPUT), reach / (1 - OUTPUT)) - 1e-12 * (abs(reach) + abs(a_top)))
        threshold = torch.tensor(thresholds, dtype=torch.float64)[:, None]  # compared in float64: no rounding
        passing = block_max >= threshold                                                 # the blocks to look into
        counts = torch.stack((passing.sum(dim=1), (top_block >= threshold).sum(dim=1), top), 1).tolist()
        if all(blocks_in == ids_in == 1 for blocks_in, ids_in, _ in counts):  # only the top id, in every row
            return [[t] for _, _, t in counts]
        rows, passing = passing.nonzero(as_tuple=True)
        inside, at = (blocks[rows, passing] >= threshold[rows]).nonzero(as_tuple=True)
        rows, ids = rows[inside], passing[inside] * BLOCK + at                           # ascending in each row
        norms = h.norm(dim=1).tolist()
        found = []
        for i in range(B):
            v = ids[rows == i]
            v = v[v < self.vocab]       # all of a row passes only when h is inf: none of the padding
            if len(v) > 1:  # each interval [a_v - b_v, a_v + b_v], in float64, against the best lower end
                a_v = a[i, v].double()
                b_v = bound(norms[i], self.rho[v].double(), a_v.abs())
                best_lower = (a_v - b_v).max()
                v = v[a_v + b_v >= best_lower - 1e-12 * (best_lower.abs() + a_v.abs() + b_v)]
            found.append(v.tolist())
        return found

    def tokens(self, h: torch.Tensor, full: Callable[[], list[int]]) -> list[int]:
        """The argmax of each row of `h @ head`: from the screen (`argmax`), or `full()`, the caller's
        fp32 head product and its argmax, whichever ran faster for steps of this many rows.

        Why both: the screen's fixed cost (its int8 product, ~25 small ops, and for each row it
        cannot settle from the int8 copy alone a look at each candidate) can exceed what it saves. On
        random weights nearly every row has one candidate, on trained ones a third of the rows more
        than one (the demo's models: 1.4-1.6 a row), and there a 4096 x 128 head's 8-row step took
        3.3 / 3.0 ms with the screen against 3.0 / 2.2 without. So the first `TRIALS` steps of each
        row count take the two in turn, timed in place (between the step's other products, on the
        model's own states), and the faster serves that row count from then on (`pays`); `always`
        (`use_decode_layout(screen=True)`) takes the screen without timing."""
        rows = len(h)
        use = True if self.always else self.pays.get(rows)
        if use is not None:
            return self.argmax(h) if use else full()
        times = self.trials.setdefault(rows, {True: [], False: []})
        use = len(times[True]) <= len(times[False])                     # in turn, the screen first
        start = time.perf_counter()
        tokens = self.argmax(h) if use else full()
        times[use].append(time.perf_counter() - start)
        if min(map(len, times.values())) >= TRIALS:
            self.pays[rows] = min(times[True]) < min(times[False])
        return tokens

    def argmax(self, h: torch.Tensor) -> list[int]:
        """The argmax of each row of `h @ head` (h: (B, width) fp32), as `(h @ head).argmax(-1)`."""
        tokens = []
        for i, ids in enumerate(self.candidates(h)):
            if len(ids) == 1:  # the usual case
                tokens.append(ids[0])
            elif not ids:  # NaN or inf in h: the bounds say nothing, take the full product's
                tokens.append(int((h[i:i + 1] @ self.head).argmax()))
            else:  # their fp32 logits, as the full product computes each column; lowest id on a tie
                ids = torch.tensor(ids)
                tokens.append(int(ids[(h[i:i + 1] @ self.head.index_select(1, ids)).argmax()]))
        return tokens
