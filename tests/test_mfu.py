"""MFU: per device, against a measured matmul peak, and never above 100%."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import make_packed

from minilab import training
from minilab.cli import main as cli_main


def test_mfu_is_per_device_and_remeasures_once_then_caps(monkeypatch):
    peaks = iter([1e6, 2e6])
    calls = []

    def fake_peak(device, dtype=torch.float32, n=None):
        calls.append(n)
        return next(peaks)

    monkeypatch.setattr(training, "matmul_peak_flops", fake_peak)
    mfu = training.MFU(torch.device("cpu"), torch.float32, flops_per_token=1000, world_size=2)
    assert mfu(1000) == pytest.approx(0.5)   # 1000 tok/s over 2 processes: 5e5 FLOP/s per device
    assert calls == [None]
    assert mfu(10_000) == 1.0                # 5e6 > 1e6: re-measured at a larger size (2e6), still beaten
    assert calls == [None, 2048] and mfu.peak == 5e6
    assert mfu(5000) == pytest.approx(0.5)
    assert mfu(100_000) == 1.0 and len(calls) == 2   # measured again only once


def test_matmul_peak_takes_the_best_size_on_cpu(monkeypatch):
    sizes = []

    def fake(device, dtype, n):
        sizes.append(n)
        return {1024: 3e10, 1536: 5e10}[n]

    monkeypatch.setattr(training, "_matmul_flops", fake)
    assert training.matmul_peak_flops(torch.device("cpu")) == 5e10 and sizes == [1024, 1536]
    sizes.clear()
    monkeypatch.setattr(training, "_matmul_flops", lambda device, dtype, n: sizes.append(n) or 1e9)
    assert training.matmul_peak_flops(torch.device("cpu"), n=512) == 1e9 and sizes == [512]


def test_a_run_never_logs_mfu_above_one(tmp_path, monkeypatch):
    """A peak measured far too low (a loaded machine) printed MFU of 110-118%: now at most 100%."""
    data = make_packed(tmp_path / "data")
    monkeypatch.setattr(training, "matmul_peak_flops", lambda *a, **k: 1.0)  # 1 FLOP/s: under-measured
    monkeypatch.setattr("minilab.pretrain.matmul_peak_flops", lambda *a, **k: 1.0, raising=False)
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--data_dirs", str(data["packed"]), "--tokenizer_dir", str(data["tokenizer"]),
                     "--output_dir", str(out), "--max_steps", "3", "--arch", "micro",
                     "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
                     "--set", "model.head_dim=16", "--set", "model.intermediate_size=64",
                     "--set", "batch_size=2", "--set", "eval_every=10", "--set", "eval_batches=1",
                     "--set", "register=false", "--set", "tensorboard=false"]) == 0
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(train) == 3
    assert all(0 < r["mfu"] <= 1.0 for r in train), [r["mfu"] for r in train]
    assert all(r["flops_per_s"] > 1.0 for r in train)
