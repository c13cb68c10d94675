"""CUDA-only paths: bf16/fp16 pretraining steps (fused AdamW, GradScaler), resume within the stated
tolerance, the fp16 loss scale surviving a resume, QLoRA with bitsandbytes on the GPU, the
planner's VRAM estimate against `torch.cuda.max_memory_allocated`, and the fused head + loss
(linear_ce) under CUDA autocast and on a 4-bit transformers Llama.

Skipped as a whole where CUDA is not available (CI), so they cost nothing there. On a GPU machine
(all green on an H200 on 2026-12-04, 2 minutes):

    PYTHONPATH=src python -m pytest -q tests/test_cuda.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from fixtures import make_packed  # noqa: E402

from minilab import distributed  # noqa: E402
from minilab.pretrain import PretrainConfig, PretrainRun  # noqa: E402

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
SMALL_ARCH = {"n_layer": 2, "d_model": 64, "n_head": 2, "head_dim": 32, "intermediate_size": 128}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("cuda-data"))


def _cfg(data, out: Path, **kw) -> PretrainConfig:
    kw = {"arch": "micro", "model": dict(SMALL_ARCH), "batch_size": 8, "device": "cuda", "eval_every": 1000,
          "eval_batches": 2, "ckpt_every": 1000, "register": False, "tensorboard": False, **kw}
    cfg = PretrainConfig(data_dirs=[str(data["packed"])], tokenizer_dir=str(data["tokenizer"]), output_dir=str(out),
                         **kw)
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_frac = 0.0
    return cfg


def _losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def _run(cfg: PretrainConfig, resume: str | None = None) -> PretrainRun:
    info, device = distributed.init(torch.device(cfg.device))
    job = PretrainRun(cfg, info, device)
    job.result = job.fit(resume)
    return job


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_steps_on_cuda(data, tmp_path, precision):
    job = _run(_cfg(data, tmp_path / precision, precision=precision, max_steps=12))
    assert next(job.model.parameters()).device.type == "cuda"
    assert all(g["fused"] for g in job.optimizer.param_groups)  # fused AdamW on CUDA
    assert (job.scaler is not None) == (precision == "fp16")
    if job.scaler is not None:
        assert job.scaler.is_enabled() and job.scaler.get_scale() > 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
        logits = job.model(torch.zeros(1, 8, dtype=torch.long, device="cuda"))
    assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    losses = _losses(tmp_path / precision)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses  # it learns
    assert (tmp_path / precision / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_verify_resume_within_cuda_tolerance(data, tmp_path, precision):
    from minilab.verify_resume import CUDA_TOLERANCE, verify

    result = verify(_cfg(data, tmp_path / "unused", precision=precision), steps=8, work=tmp_path / "verify")
    print(precision, result)
    assert result["tolerance"] == CUDA_TOLERANCE
    assert result["match"], result


def test_fp16_loss_scale_survives_resume(data, tmp_path):
    out = tmp_path / "run"
    first = PretrainRun(_cfg(data, out, precision="fp16", max_steps=4, ckpt_every=4), *_init())
    first.scaler = torch.amp.GradScaler("cuda", init_scale=1024.0, growth_interval=2)  # grows during the run
    first.fit(None)
    scale = first.scaler.get_scale()
    assert scale != 2.0**16  # differs from what a fresh scaler starts at
    ckpt = out / "checkpoints" / "step-000004"
    assert (ckpt / "scaler.pt").is_file()
    # A resumed run (default scaler, 2**16) continues with the saved scale, not a fresh one.
    second = PretrainRun(_cfg(data, out, precision="fp16", max_steps=4, ckpt_every=4), *_init())
    second.restore(str(ckpt))
    assert second.scaler.get_scale() == scale
    assert second.scaler.state_dict()["_growth_tracker"] == first.scaler.state_dict()["_growth_tracker"]


def _init():
    return distributed.init(torch.device("cuda"))


def test_qlora_on_cuda_trains_adapters_only(tmp_path):
    import bitsandbytes as bnb
    from finetune_fixtures import make_base, make_sft_data, tune_cfg
    from safetensors.torch import load_file

    from minilab.finetune.sft import SFTConfig, SFTRun

    b = make_base(tmp_path / "base", tmp_path / "registry")
    sft_data = make_sft_data(b["base"], tmp_path / "sft-data")
    results = {}
    for method in ("lora", "qlora"):
        cfg = tune_cfg(SFTConfig, b["name"], [sft_data], tmp_path / method, models_dir=str(tmp_path / "registry"),
                       method=method, max_steps=6, register=False, precision="bf16")
        cfg.device = "cuda"
        job = SFTRun(cfg, *_init())
        q = {n: m.weight.data.clone() for n, m in job.tune.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert len(q) == (2 * 7 if method == "qlora" else 0)
        assert all(w.device.type == "cuda" and w.dtype == torch.uint8 for w in q.values())  # packed NF4 codes
        torch.cuda.reset_peak_memory_stats()
        job.fit(None)
        results[method] = torch.cuda.max_memory_allocated()
        now = {n: m.weight.data for n, m in job.tune.model.named_modules() if n in q}
        assert all(torch.equal(now[n], w) for n, w in q.items())  # 4-bit base untouched
        losses = _losses(tmp_path / method)
        assert all(torch.isfinite(torch.tensor(losses)))
        adapters = load_file(str(tmp_path / method / "final" / "adapters" / "adapter_model.safetensors"))
        assert adapters and all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    print("peak allocated during fit (bytes):", results)


PLANNER_CONFIGS = ["tiny-full-fp32-b8-s512", "tiny-full-bf16-b8-s512", "small-full-bf16-b4-s512",
                   "small-lora-bf16-b4-s512", "small-qlora-bf16-b4-s512-gc", "small-infer-bf16-b8-s512"]


def test_planner_vram_estimate_within_tolerance():
    """Each configuration in a fresh process (benchmarks/planner_accuracy.py --device cuda): the
    planner's peak against max_memory_allocated, within the docs' stated +-15%."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "planner_accuracy.py"), "--device", "cuda",
                          "--only", *PLANNER_CONFIGS, "--jobs", "3"],
                         capture_output=True, text=True, env=env, timeout=600)
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    print("\n".join(json.dumps(r) for r in rows))
    measured = {r["config"]: r for r in rows if "ratio" in r}
    assert sorted(measured) == sorted(PLANNER_CONFIGS), out.stdout + out.stderr[-2000:]
    for name, r in measured.items():
        assert 0.85 <= r["ratio"] <= 1.15, \
            f"{name}: predicted {r['predicted_mib']} MiB, measured {r['measured_mib']} MiB"


def test_fused_head_on_cuda_rounds_as_autocast_and_holds_no_logits():
    # Under bf16 autocast on cuBLAS the fused head + loss equals autocast's logits path within bf16
    # rounding (loss and both gradients), is as close to the exact fp32 gradients, and its peak
    # memory holds one chunk of logits instead of all of them.
    import torch.nn.functional as F

    from minilab.linear_ce import chunk_rows, linear_cross_entropy

    torch.manual_seed(0)
    n, vocab, d = 16_384, 32_000, 256                            # 8 chunks on CUDA
    h = torch.randn(n, d, device="cuda", requires_grad=True)
    w = (torch.randn(vocab, d, device="cuda") * 0.05).requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    y[::7] = -100

    def run(loss_fn, autocast=True):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        (loss / 3.0).backward()
        torch.cuda.synchronize()
        return loss.item(), h.grad.clone(), w.grad.clone(), torch.cuda.max_memory_allocated() - base

    exact = run(lambda: F.cross_entropy(h @ w.t(), y, reduction="sum"), autocast=False)
    ref = run(lambda: F.cross_entropy(F.linear(h, w).float(), y, reduction="sum"))
    fused = run(lambda: linear_cross_entropy(h, w, y))
    assert fused[0] == pytest.approx(ref[0], rel=1e-4)
    eps = torch.finfo(torch.bfloat16).eps
    err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    for i in (1, 2):
        assert err(fused[i], ref[i]) < 2 * eps
        assert err(fused[i], exact[i]) <= 1.1 * err(ref[i], exact[i])
    print(f"peak above inputs: logits path {ref[3] / 2**20:.0f} MiB, fused {fused[3] / 2**20:.0f} MiB")
    assert chunk_rows(vocab, n, "cuda") < n
    assert ref[3] > n * vocab * 4 and fused[3] < 0.25 * ref[3]


def test_qlora_on_a_transformers_llama_fuses_the_head_like_the_logits_path(monkeypatch):
    # A hub architecture (transformers Llama) with its linear layers in bitsandbytes NF4 and LoRA
    # adapters, behind LogitsOnly as `minilab sft --method qlora` runs it: the fused head + loss
    # gives the logits path's loss and adapter gradients under bf16 autocast.
    from transformers import LlamaConfig, LlamaForCausalLM

    from minilab.finetune.models import LogitsOnly, default_targets, quantize_4bit
    from minilab.loading import wrap_lora
    from minilab.training import fuses_loss, token_loss_sum

    torch.manual_seed(0)
    dev = torch.device("cuda")
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=5000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    assert quantize_4bit(hf, default_targets("llama"), dev) == 2 * 7
    model = LogitsOnly(wrap_lora(hf, {"r": 8}).to(dev)).train()
    x = torch.randint(0, 5000, (4, 129), device=dev)
    ids, y = x[:, :-1], x[:, 1:].clone()
    y[0, :10] = -100

    def loss_and_grads(fused: bool):
        monkeypatch.setattr("minilab.linear_ce.FUSE", fused)
        assert fuses_loss(model) == fused
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=y) if fused else token_loss_sum(model(ids), y)
        (loss / 100.0).backward()
        return loss.item(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}

    ref, fused = loss_and_grads(False), loss_and_grads(True)
    assert fused[0] == pytest.approx(ref[0], rel=1e-3)
    assert sorted(fused[1]) == sorted(ref[1]) and len(ref[1]) == 2 * 2 * 7
    for k, g in ref[1].items():
        torch.testing.assert_close(fused[1][k], g, atol=0.05 * g.abs().max().item(), rtol=0.05, msg=k)
