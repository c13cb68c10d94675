"""Shared training helpers: LR schedule, AdamW groups, token-normalised gradient accumulation."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minilab import host_memory
from minilab.model import ModelConfig, build_model
from minilab.training import OptimConfig, accumulate_gradients, lr_at, make_optimizer

CFG = dict(vocab_size=97, n_layer=2, n_head=2, d_model=32, intermediate_size=64, max_seq_len=32)


def test_lr_schedule_warmup_peak_and_floor():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1 / 11)           # non-zero first step
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rising through warmup
    assert lrs[10] == pytest.approx(1.0)              # the peak right after warmup
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1)             # the floor at the end
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_no_weight_decay_on_norms_and_embeddings():
    model = build_model(ModelConfig(**CFG))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all("norm" not in names[i] and "embed" not in names[i] for i in decayed)
    assert any("q_proj" in names[i] for i in decayed)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params()  # the tied head is one parameter, listed once


def _step(model, batches):
    # SGD, so the weight change is the accumulated gradient itself: Adam's first step is about
    # lr * sign(g), which turns float noise in near-zero gradients into lr-sized differences.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, n = accumulate_gradients(model, batches, "fp32", torch.device("cpu"))
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return loss, n, grads


def test_batch8_accum1_equals_batch2_accum4():
    torch.manual_seed(0)
    x = torch.randint(0, 97, (8, 17))
    inputs, targets = x[:, :-1], x[:, 1:]
    a = build_model(ModelConfig(**CFG))
    b = build_model(ModelConfig(**CFG))
    b.load_state_dict(a.state_dict())
    loss_a, n_a, grads_a = _step(a, [(inputs, targets)])
    loss_b, n_b, grads_b = _step(b, [(inputs[i:i + 2], targets[i:i + 2]) for i in range(0, 8, 2)])
    assert n_a == n_b == 8 * 16
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], atol=1e-6, rtol=1e-5, msg=k)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (pa - pb).abs().max().item() <= 1e-5, k


def test_accumulation_weights_tokens_not_micro_batches():
    # Two micro-batches with 15 and 3 valid targets: the step's loss is the mean over 18 tokens,
    # not the mean of the two micro-batch means.
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG))
    x = torch.randint(0, 97, (2, 16))
    y1, y2 = torch.randint(0, 97, (1, 16)), torch.randint(0, 97, (1, 16))
    y1[0, :1] = -100
    y2[0, 3:] = -100
    loss, n = accumulate_gradients(model, [(x[:1], y1), (x[1:], y2)], "fp32", torch.device("cpu"))
    assert n == 18
    with torch.no_grad():
        logits = model(x)
        ref = torch.nn.functional.cross_entropy(logits.view(-1, 97), torch.cat([y1, y2], 0).view(-1),
                                                ignore_index=-100)
    assert loss == pytest.approx(ref.item(), abs=1e-5)


def test_bf16_autocast_runs_on_cpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG))
    x = torch.randint(0, 97, (2, 17))
    loss, _ = accumulate_gradients(model, [(x[:, :-1], x[:, 1:])], "bf16", torch.device("cpu"))
    assert abs(loss - math.log(97)) < 0.2
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_throughput_and_target_counts():
    from minilab.training import count_targets, throughput

    assert throughput(4 * 2 * 32 * 2, 0.5) == 1024.0  # batch 4 x accum 2 x seq 32 x 2 ranks in 0.5 s
    assert throughput(10, 0.0) == 10 / 1e-9  # a step faster than the clock: finite, never a ZeroDivisionError
    y = torch.tensor([[1, -100, 3], [-100, -100, 5]])
    assert count_targets([y, y[:1]]) == 3 + 2


@pytest.mark.parametrize("vocab,batch,seq", [(97, 2, 16), (40_000, 5, 30)])  # one chunk; several (104 rows)
def test_fused_head_and_loss_equal_the_logits_path(vocab, batch, seq):
    # The fp32 training step never builds the logits (minilab.linear_ce): its loss and every
    # gradient equal F.cross_entropy over the logits', ignored positions included.
    from minilab.linear_ce import chunk_rows
    from minilab.training import fuses_loss

    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG, "vocab_size": vocab})
    model = build_model(cfg)
    x = torch.randint(0, vocab, (batch, seq + 1))
    ids, y = x[:, :-1], x[:, 1:].clone()
    y[0, :5] = -100
    y[-1, -7:] = -100
    assert fuses_loss(model)
    if vocab > 1000:
        assert chunk_rows(vocab, y.numel()) < y.numel()  # the chunk loop is exercised
    _assert_fused_equals_logits_path(model, ids, y)


@pytest.mark.parametrize("dtype,matmul", [(torch.bfloat16, "native"), (torch.bfloat16, "emulate"),
                                          (torch.float16, "native")])
def test_fused_head_under_autocast_rounds_as_autocast_does(dtype, matmul, monkeypatch):
    # Under bf16/fp16 autocast the fused head runs its products in 16 bits like autocast's head (on
    # fp32 kernels where minilab.bf16 emulates the CPU's bf16 GEMM): the loss equals the logits
    # path's, every gradient is within 16-bit rounding of it and as close to the exact fp32 gradient
    # (not much closer: the products do run in 16 bits).
    import torch.nn.functional as F

    from minilab import bf16
    from minilab.linear_ce import linear_cross_entropy

    monkeypatch.setattr(bf16, "BF16_MATMUL", matmul)
    torch.manual_seed(0)
    n, vocab, d = 700, 40_000, 48                                  # several chunks (104 rows each)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(vocab, d) * 0.05).requires_grad_()
    y = torch.randint(0, vocab, (n,))
    y[::7] = -100

    def run(loss_fn, autocast=True):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = loss_fn()
        (loss / 3.0).backward()
        return loss.item(), h.grad.clone(), w.grad.clone()

    exact = run(lambda: F.cross_entropy(h @ w.t(), y, reduction="sum"), autocast=False)
    ref = run(lambda: F.cross_entropy(bf16.linear_w(h, w).float(), y, reduction="sum"))
    fused = run(lambda: linear_cross_entropy(h, w, y))
    assert fused[0] == pytest.approx(ref[0], rel=1e-6)
    eps = torch.finfo(dtype).eps
    for i in (1, 2):
        err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        assert err(fused[i], ref[i]) < 2 * eps
        assert 0.25 * err(ref[i], exact[i]) < err(fused[i], exact[i]) <= 1.05 * err(ref[i], exact[i])


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_fused_loss_and_its_gradients(frozen_head, dtype, softcap):
    # reduction="none" (DPO's log-probs): each token's loss as F.cross_entropy's, and the gradients
    # under a different upstream gradient per token (a frozen head: h's gradient from forward, scaled
    # per token; a trained head: each chunk's logits recomputed in backward).
    import torch.nn.functional as F

    from minilab.bf16 import linear_w
    from minilab.linear_ce import linear_cross_entropy

    torch.manual_seed(0)
    n, vocab, d = 300, 40_000, 24                                   # several chunks (104 rows)
    h = torch.randn(3, n // 3, d, requires_grad=True)
    w = (torch.randn(vocab, d) * 0.05).requires_grad_(not frozen_head)
    y = torch.randint(0, vocab, (3, n // 3))
    y[1, :9] = -100
    upstream = torch.randn(3, n // 3)

    def run(fn):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            out = fn()
        (out * upstream).sum().backward()
        return out.detach(), h.grad.clone(), None if frozen_head else w.grad.clone()

    def capped(logits):  # Gemma 2's final_logit_softcapping
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

    ref = run(lambda: F.cross_entropy(capped(linear_w(h, w).float()).transpose(1, 2), y, reduction="none"))
    fused = run(lambda: linear_cross_entropy(h, w, y, reduction="none", softcap=softcap))
    assert fused[0].shape == y.shape and bool((fused[0][y == -100] == 0).all())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype is torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(fused[0], ref[0], **tol)
    for i in (1, 2)[: 1 if frozen_head else 2]:
        err = ((fused[i] - ref[i]).norm() / ref[i].norm()).item()
        assert err < (1e-5 if dtype is torch.float32 else 1e-2)


def test_dpo_pair_logps_fused_equal_the_logits_path():
    from minilab.finetune.dpo import pair_logps
    from minilab.loading import wrap_lora

    torch.manual_seed(0)
    model = wrap_lora(build_model(ModelConfig(**CFG)), {"r": 4})
    chosen = [(np.arange(3, 15), np.arange(12) >= 5)]              # (token ids, trained-on mask)
    rejected = [(np.arange(20, 29), np.arange(9) >= 4)]
    grads = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("minilab.linear_ce.FUSE", fused)
            c, r, n = pair_logps(model, chosen, rejected, 0, "fp32", torch.device("cpu"))
        (c - 2 * r).sum().backward()
        grads[fused] = (c.detach(), r.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()
                                                  if p.requires_grad})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])
    assert grads[True][2] == grads[False][2] == 12
    for k, g in grads[False][3].items():
        torch.testing.assert_close(grads[True][3][k], g, atol=2e-6, rtol=1e-4, msg=k)


def _loss_and_grads(model, ids, y, fused: bool):
    """Summed loss (/3) and every trainable gradient, through the fused head or the logits."""
    from minilab.training import token_loss_sum

    model.zero_grad(set_to_none=True)
    loss = (model(ids, targets=y) if fused else token_loss_sum(model(ids), y)) / 3.0
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_fused_equals_logits_path(model, ids, y):
    ref, fused = _loss_and_grads(model, ids, y, False), _loss_and_grads(model, ids, y, True)
    assert fused[0] == pytest.approx(ref[0], rel=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradients computed in forward
        assert model(ids, targets=y).item() / 3.0 == pytest.approx(ref[0], rel=1e-6)
    assert sorted(fused[1]) == sorted(ref[1])
    for k, g in ref[1].items():
        torch.testing.assert_close(fused[1][k], g, atol=2e-6, rtol=1e-4, msg=k)


def test_fused_loss_for_a_plain_head_in_any_precision():
    from minilab.training import accumulate_gradients, fuses_loss, micro_batch_loss_sum

    torch.manual_seed(0)
    model = build_model(ModelConfig(**CFG))
    x = torch.randint(0, 97, (2, 17))
    ids, y = x[:, :-1], x[:, 1:]
    assert fuses_loss(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):              # the training step's autocast: fused
        fused = model(ids, targets=y)
    assert micro_batch_loss_sum(model, ids, y, "bf16", torch.device("cpu")).item() == fused.item()
    accumulate_gradients(model, [(ids, y)], "bf16", torch.device("cpu"))
    assert model.lm_head.weight.grad.dtype is torch.float32
    assert not fuses_loss(torch.compile(model))  # compiled: the logits path (no graph break)
    with pytest.MonkeyPatch.context() as mp:     # the switch benchmarks/finetune_memory.py compares with
        mp.setattr("minilab.linear_ce.FUSE", False)
        assert not fuses_loss(model)
    model16 = build_model(ModelConfig(**CFG)).to(torch.bfloat16)   # 16-bit weights: bf16 products
    assert fuses_loss(model16)
    ref, fus = _loss_and_grads(model16, ids, y, False), _loss_and_grads(model16, ids, y, True)
    assert fus[0] == pytest.approx(ref[0], rel=1e-3)
    for k, g in ref[1].items():
        assert fus[1][k].dtype is torch.bfloat16
        torch.testing.assert_close(fus[1][k].float(), g.float(), atol=0.05 * g.abs().max().item(), rtol=0.05,
                                   msg=k)
    model.lm_head = torch.nn.Linear(32, 97, bias=True)
    assert not fuses_loss(model)
    with pytest.raises(ValueError, match="bias-free head"):
        model(ids, targets=y)


def test_lora_fuses_the_frozen_head_on_minilab_and_transformers_models():
    # LoRA/QLoRA keep the head frozen: the fused path skips its product and returns only the hidden
    # states' gradient; the adapters' gradients equal the logits path's. Also for a transformers
    # model behind LogitsOnly (a whitelisted architecture, plain head; Gemma 2's logits soft-capped),
    # not for a biased head.
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    from minilab.finetune.models import LogitsOnly
    from minilab.loading import wrap_lora
    from minilab.training import fuses_loss

    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 17))
    ids, y = x[:, :-1], x[:, 1:].clone()
    y[0, :4] = -100
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1))
    small = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    gemma3 = Gemma3ForCausalLM(Gemma3TextConfig(**small))          # tied, no logit soft-capping
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=2.0))   # logits capped to +-2
    for model in (wrap_lora(build_model(ModelConfig(**CFG)), {"r": 4}),
                  LogitsOnly(_wrap_lora_hf(hf)), LogitsOnly(hf), LogitsOnly(gemma3), LogitsOnly(gemma2)):
        assert fuses_loss(model)
        _assert_fused_equals_logits_path(model, ids, y)
    phi = LogitsOnly(PhiForCausalLM(PhiConfig(**small)))           # a biased head: the logits path
    assert not fuses_loss(phi)
    with pytest.raises(ValueError, match="plain head"):
        phi(ids, targets=y)


def _wrap_lora_hf(hf):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))


def test_planner_counts_the_fused_head_only_where_training_fuses_it():
    # training minilab's model or a whitelisted transformers architecture keeps a chunk of logits,
    # not 14-16 bytes x tokens x vocab (LoRA: without the head's gradient); GPT-2 keeps the full line.
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from minilab.linear_ce import chunk_rows
    from minilab.planner.anatomy import inspect_model
    from minilab.planner.memory import LOGIT_BYTES, PlanRequest, plan_memory

    cfg = ModelConfig(**{**CFG, "vocab_size": 32768, "max_seq_len": 1024})
    ours = inspect_model(build_model(cfg, "meta"))
    tokens = 4 * 1024

    def logits(an, **req):
        plan = plan_memory(an, PlanRequest(batch_size=4, seq_len=1024, **req))
        return next(line for line in plan.lines if line.key == "logits")

    fused = logits(ours, method="full", precision="fp32")
    assert "fused" in fused.label
    rows = chunk_rows(32768, tokens)
    assert fused.bytes == 4 * (2 * rows * 32768 + tokens * 32 + 3 * 32768 * 32)  # tied: 3 head-sized grads
    full = tokens * 32768 * LOGIT_BYTES["fp32"]
    assert fused.bytes < full / 20
    lora = logits(ours, method="lora", precision="fp32")        # a frozen head: h's gradient only
    assert lora.bytes == 4 * (2 * rows * 32768 + tokens * 32)
    mixed = logits(ours, method="full", precision="bf16-mixed")  # + 16-bit copies, one 16-bit chunk
    assert mixed.bytes == fused.bytes - 8 * rows * 32768 + 2 * (tokens + 32768) * 32 + 6 * rows * 32768 \
        + 2 * 32768 * 32
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=32768, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2))
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32768, n_embd=32, n_layer=2, n_head=2))
    assert logits(inspect_model(llama), method="qlora", precision="bf16").bytes < full / 20
    assert logits(inspect_model(gpt2), method="full", precision="fp32").bytes == full
    assert logits(inspect_model(gpt2), method="lora", precision="bf16").bytes == tokens * 32768 * LOGIT_BYTES["16bit"]
    with torch.device("meta"):  # Gemma 2's soft-cap: its derivative for one chunk more
        small = dict(vocab_size=32768, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        capped, plain = (Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=cap)) for cap in (30.0, None))
    assert logits(inspect_model(capped), method="lora", precision="bf16").bytes == \
        logits(inspect_model(plain), method="lora", precision="bf16").bytes + 4 * rows * 32768
    # on CUDA: larger chunks (fewer launches), one of them at a time, a tied head's gradient once
    rows = chunk_rows(32768, tokens, "cuda")
    assert 16 * chunk_rows(32768, tokens) == rows < tokens
    assert logits(ours, method="full", precision="fp32", target="cuda").bytes == \
        4 * (rows * 32768 + tokens * 32 + 32768 * 32)


FREED_MEMORY_SCRIPT = """
import json, resource, torch
from minilab import host_memory

def steps(n):  # minor page faults of each of n steps that allocate and write 120 MiB of tensors, then free them
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step = [torch.empty(b // 4).fill_(1.0) for b in (64 * 2**20, 16 * 2**20, 40 * 2**20)]
        del step
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20

out = {"default": steps(4)}
with host_memory.reuse_freed_memory() as kept:
    steps(4)
    out.update(kept=kept, reused=steps(8), rss_in=rss_mib())
out["rss_after"] = rss_mib()
out["after"] = steps(8)
try:
    with host_memory.reuse_freed_memory():
        steps(4)
        out["rss_in_2"] = rss_mib()
        raise RuntimeError("a step failed")
except RuntimeError:
    out["rss_after_2"] = rss_mib()
print(json.dumps(out))
"""


@pytest.mark.skipif(host_memory._glibc() is None or not Path("/proc/self/statm").exists(), reason="glibc on Linux")
def test_training_loops_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    """In a fresh process (another test's loop would have left its heap behind): by default glibc
    maps fresh pages for a step's large tensors and unmaps them when they are freed; inside
    `reuse_freed_memory` the freed blocks serve the next steps (most take no fault once the heap has
    grown, in 2-3 steps; glibc's aligned allocations miss a freed block now and then); after it,
    also after an exception, the free memory goes back to the system, and the freed blocks of later
    steps are still reused (glibc's fixed defaults would map fresh pages for each)."""
    run = subprocess.run([sys.executable, "-c", FREED_MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    if out["kept"] < 64 * 2**20:
        pytest.skip(f"this glibc keeps freed blocks up to {out['kept']} bytes only")
    fresh = min(out["default"])
    assert fresh >= 64 // 2                            # the 64 MiB tensor's pages at least, 2 MiB at the most
    assert sorted(out["reused"])[4] < fresh // 8 and sum(out["reused"]) < 2 * fresh, out
    assert sorted(out["after"])[4] < fresh // 8, out
    for suffix in ("", "_2"):
        assert out["rss_in" + suffix] - out["rss_after" + suffix] > 100, out  # the 120 MiB handed back


def test_freed_memory_setting_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    with host_memory.reuse_freed_memory() as kept:
        assert kept == 0
