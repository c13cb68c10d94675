"""Muon + AdamW as one optimizer: which parameters each half trains, the shared schedule, and an
exact resume of both halves' state."""

from __future__ import annotations

import io

import pytest
import torch

from minilab.errors import ConfigError
from minilab.model import ModelConfig, build_model
from minilab.optimizers import MuonAdamW

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(CFG, "cpu")


def _opt(model):
    return MuonAdamW(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def _steps(model, opt, n: int, start: int = 0, same_batch: bool = False) -> list[float]:
    losses = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(0 if same_batch else i)
        x = torch.randint(0, CFG.vocab_size, (4, 17), generator=g)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_muon_trains_the_block_matrices_and_adamw_the_rest():
    model = _model()
    opt = _opt(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon and all(".layers." in n and n.endswith("proj.weight") for n in muon)
    assert any("embed_tokens" in n for n in adamw) and any("norm" in n for n in adamw)
    assert not muon & adamw
    assert muon | adamw == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)


def test_the_schedule_sets_both_halves():
    model = _model()
    opt = _opt(model)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, opt, 1)
    # lr 0: no update at all, not even decoupled weight decay (it is scaled by lr)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_training_fits_a_batch_about_as_adamw_does():
    """30 steps on one batch at lr 1e-2: Muon+AdamW memorises it (measured 4.16 -> 0.31; AdamW
    alone 4.16 -> 0.11); a sign error or a lost half would leave it near log(64) = 4.16."""
    model = _model()
    losses = _steps(model, _opt(model), 30, same_batch=True)
    assert losses[0] > 4.0 and losses[-1] < 1.0


def test_state_saves_and_resumes_exactly():
    straight = _model()
    opt = _opt(straight)
    _steps(straight, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": opt.state_dict()}, buf)
    _steps(straight, opt, 3, start=3)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = _opt(resumed)
    opt2.load_state_dict(saved["optimizer"])
    _steps(resumed, opt2, 3, start=3)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_an_adamw_state_is_refused():
    model = _model()
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="Muon"):
        _opt(model).load_state_dict(adamw_state)


def test_a_model_without_block_matrices_is_a_config_error():
    class OnlyEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(8, 4)

    with pytest.raises(ConfigError, match="optimizer muon"):
        MuonAdamW(OnlyEmbedding(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)


def test_muon_with_fsdp_is_refused_in_one_line(tmp_path, capsys):
    from minilab.cli import main as cli_main

    code = cli_main(["pretrain", "--data_dirs", str(tmp_path), "--tokenizer_dir", str(tmp_path), "--output_dir",
                     str(tmp_path / "run"), "--set", "parallel=fsdp", "--set", "optim.optimizer=muon"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "optim.optimizer" in err and "fsdp" in err
    assert not (tmp_path / "run").exists()
