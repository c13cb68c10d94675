"""Checkpoints: atomic saves, bitwise round trips, RNG restore, retention."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from minilab import checkpoint as ckpt
from minilab.errors import MinilabError
from minilab.model import ModelConfig, build_model

TINY = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=16)


def make_run(seed: int = 0):
    """A tiny model with a populated AdamW state and a stepped scheduler."""
    torch.manual_seed(seed)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    ids = torch.randint(0, TINY.vocab_size, (2, 8))
    for _ in range(2):
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def save(run_dir, step, model, opt=None, sched=None, **kw):
    meta = {"config": {"train": {"lr": 1e-2}}, "tokens_seen": step * 16, "data_position": {"offset": step},
            "tokenizer_sha256": "ab" * 32}
    return ckpt.save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched, meta=meta, **kw)


def test_round_trip_is_bitwise(tmp_path):
    model, opt, sched = make_run(0)
    path = save(tmp_path, 7, model, opt, sched, metric=2.5)
    expected = draws()  # what the run would have drawn next had it not stopped

    assert path.name == "step-000007" and (path / "COMPLETE").is_file()
    # Tied weights are stored once, under the HF name.
    stored = safetensors.torch.load_file(path / "model.safetensors")
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    # Everything pickled must load with weights_only=True.
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "scheduler.pt", weights_only=True)

    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # scramble every generator
    model2, opt2, sched2 = make_run(1)
    meta = ckpt.load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2)
    assert draws() == expected

    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for key, value in st.items():
            assert torch.equal(value, s2["state"][i][key]), (i, key)
    assert sched.state_dict() == sched2.state_dict()
    assert meta["step"] == 7 and meta["metric"] == 2.5 and meta["tokens_seen"] == 112
    assert meta["model_config"]["d_model"] == 16 and meta["tokenizer_sha256"] == "ab" * 32
    assert meta["config"] == {"train": {"lr": 1e-2}} and meta["data_position"] == {"offset": 7}
    assert "minilab_version" in meta and "wall_time" in meta
    json.loads((path / "rng.json").read_text())  # JSON-safe RNG state


def test_rng_capture_restore_standalone():
    state = ckpt.capture_rng_state()
    json.dumps(state)
    first = draws()
    ckpt.restore_rng_state(state)
    assert draws() == first


def test_load_without_rng_restore_keeps_state(tmp_path):
    model, opt, _ = make_run(0)
    save(tmp_path, 1, model, opt)
    fresh = build_model(TINY)  # built first: initialisation itself draws from the generator
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    meta = ckpt.load_checkpoint(tmp_path / "step-000001", model=fresh, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)
    assert "torch_cpu" in meta["rng"]


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, opt, sched = make_run(0)
    first = save(tmp_path, 1, model, opt, sched)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:  # partially written, then the process "dies"
            fh.write(b"half an optimizer")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, opt, sched, keep_last=1)
    monkeypatch.undo()

    assert ckpt.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # no step-000002, no temp
    ckpt.load_checkpoint(tmp_path, model=build_model(TINY))  # the survivor is intact


def test_hard_kill_leftovers_are_ignored_and_cleaned(tmp_path):
    model, _, _ = make_run(0)
    first = save(tmp_path, 1, model)
    # What SIGKILL mid-save leaves: a hidden temp dir; plus a step dir without its marker.
    (tmp_path / ".step-000002.abc123.tmp").mkdir()
    (tmp_path / ".step-000002.abc123.tmp" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "step-000003").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert ckpt.list_checkpoints(tmp_path) == [first]
    with pytest.raises(MinilabError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "step-000003")
    save(tmp_path, 4, model)
    assert not (tmp_path / ".step-000002.abc123.tmp").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000004"


def test_retention_keeps_last_k_and_best(tmp_path):
    model, _, _ = make_run(0)
    metrics = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 2.0}
    for step, metric in metrics.items():
        save(tmp_path, step, model, keep_last=2, keep_best=True, metric=metric)
        kept = [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)]
        best = min((m, s) for s, m in metrics.items() if s <= step)[1]
        assert kept == sorted({step - 1, step, best} - {0}), kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_retention_without_best_and_keep_all(tmp_path):
    model, _, _ = make_run(0)
    for step in range(1, 4):
        save(tmp_path, step, model)
    assert len(ckpt.list_checkpoints(tmp_path)) == 3  # keep_last=None keeps everything
    save(tmp_path, 4, model, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(MinilabError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    model, _, _ = make_run(0)
    path = save(tmp_path, 1, model)
    other = build_model(TINY.replace(n_layer=2))
    with pytest.raises(MinilabError, match="does not fit") as e:
        ckpt.load_checkpoint(path, model=other)
    assert "\n" not in str(e.value)
    with pytest.raises(MinilabError, match="optimizer.pt"):
        ckpt.load_checkpoint(path, optimizer=torch.optim.AdamW(other.parameters()))


def _three_checkpoints(tmp_path):
    model, opt, _ = make_run(0)
    paths = [save(tmp_path, step, model, opt) for step in (1, 2, 3)]
    return model, opt, paths


def test_meta_records_every_file_size(tmp_path):
    _, _, paths = _three_checkpoints(tmp_path)
    files = json.loads((paths[-1] / "meta.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "optimizer.pt", "rng.json"}
    assert all(files[n] == (paths[-1] / n).stat().st_size for n in files)


def test_truncated_weights_name_the_file_and_the_older_checkpoint(tmp_path):
    model, opt, paths = _three_checkpoints(tmp_path)
    f = paths[-1] / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(MinilabError) as e:
        ckpt.load_checkpoint(tmp_path, model=model, optimizer=opt)
    assert str(e.value) == (f"{f}: 100 bytes, but meta.json records {size:,} (truncated or changed); checkpoint "
                            f"step-000003 is damaged; resume from the next older complete checkpoint instead: "
                            f"--resume {paths[1]}")


def test_garbage_optimizer_state_of_the_right_size_is_one_line(tmp_path):
    model, opt, paths = _three_checkpoints(tmp_path)
    f = paths[-1] / "optimizer.pt"
    f.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(f.stat().st_size)))
    with pytest.raises(MinilabError) as e:
        ckpt.load_checkpoint(paths[-1], model=model, optimizer=opt)
    msg = str(e.value)
    assert msg.startswith(f"{f}: cannot be read (") and "\n" not in msg and f"--resume {paths[1]}" in msg


def test_damaged_only_checkpoint_says_there_is_no_older_one(tmp_path):
    """Also a checkpoint written before sizes were recorded: the failed load itself is the error."""
    model, opt, _ = make_run(0)
    path = save(tmp_path, 1, model, opt)
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(MinilabError, match=r"model.safetensors: cannot be read \(.*\); checkpoint step-000001 is "
                                           r"damaged; there is no older complete checkpoint of this run"):
        ckpt.load_checkpoint(path, model=model, optimizer=opt)
