"""DPO: the sigmoid loss against hand values, training on a small fixed set (reward accuracy on the
training pairs > 0.9, loss < log 2) with one model copy in memory, precomputed reference
log-probs, and `minilab eval --dpo`."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from finetune_fixtures import make_base, run_job, tune_cfg

from minilab.finetune.dpo import DPOConfig, DPORun, dpo_loss
from minilab.finetune.dpo_data import DPODataConfig, to_triplet
from minilab.finetune.dpo_data import run as dpo_data_run
from minilab.model import Transformer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    models = root / "registry"
    b = make_base(root, models)
    data = root / "pairs"
    m = dpo_data_run(DPODataConfig(sources=["demo"], tokenizer_dir=str(b["base"]), output_dir=str(data),
                                   template="chatml", max_len=96, limit=60, val_fraction=0.2))
    return {**b, "data": data, "models": models, "manifest": m}


def test_loss_and_shapes():
    loss, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                            beta=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))))
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    assert to_triplet(hh) == ([{"role": "user", "content": "hi"}], "hello", "go away")
    orca = {"system": "s", "question": "q", "chosen": "c", "rejected": "r"}
    assert to_triplet(orca)[0][0] == {"role": "system", "content": "s"}


def test_dpo_learns_the_training_pairs(setup, tmp_path):
    assert setup["manifest"]["constructed"] and setup["manifest"]["counts"]["pairs_kept"] >= 16
    cfg = tune_cfg(DPOConfig, setup["name"], [setup["data"]], tmp_path / "run", max_steps=80,
                   models_dir=str(setup["models"]), batch_size=8)

    def transformers() -> int:
        gc.collect()
        return sum(type(o) is Transformer for o in gc.get_objects())

    # counted from before the run: an earlier test's served model may still be alive (FastAPI's
    # bounded lru caches of route callables keep a server's closures, and so its Engine)
    before = transformers()
    job = run_job(DPORun, cfg)
    # One model copy: a single Transformer instance holds the weights (the reference is the
    # same module with the adapters switched off).
    assert transformers() == before + 1
    chosen, rejected = job.train[0]
    idx = list(range(len(chosen)))
    job.tune.model.eval()
    pi_c, pi_r = job.score(job.train[0], idx, reference=False)
    ref_c, ref_r = job.score(job.train[0], idx, reference=True)
    loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1)
    acc = (rc > rr).float().mean().item()
    print(f"DPO on {len(idx)} training pairs: reward accuracy {acc:.3f}, loss {loss.mean().item():.4f}")
    assert acc > 0.9 and loss.mean().item() < math.log(2)
    assert job.result["name"].endswith("-dpo-v1")
    marker = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (marker["kind"], marker["stage"]) == ("minilab.run", "dpo")  # cleanup knows the run as minilab's
    # precompute_ref gives the same reference log-probs as the switched-off adapters.
    job.precompute_reference()
    assert torch.allclose(torch.as_tensor(job.ref[0][:, 0], dtype=torch.float32), ref_c, atol=1e-4)


def test_eval_dpo(setup, tmp_path):
    from minilab.evaluate.preference import preference_eval

    cfg = tune_cfg(DPOConfig, setup["name"], [setup["data"]], tmp_path / "run", max_steps=8,
                   models_dir=str(setup["models"]), precompute_ref=True)
    job = run_job(DPORun, cfg)
    r = preference_eval(job.result["final_dir"], [str(setup["data"])], registry_root=str(setup["models"]))[0]
    assert r["pairs"] > 0 and 0 <= r["win_rate"] <= 1
    assert set(r["perplexity"]) == {"policy", "reference"}
    assert r["perplexity"]["policy"]["chosen"] > 1


def _evals(run_dir):
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "eval"}


def test_full_dpo_resume_validates_against_the_starting_weights(setup, tmp_path):
    """Full-weight DPO (precomputed reference): the val reference is the starting weights' score
    even after a resume, so the resumed run's val metrics equal the uninterrupted run's; every
    checkpoint's val loss is the eval of its own step."""
    import shutil

    from minilab.checkpoint import read_meta

    kw = dict(method="full", precompute_ref=True, max_steps=6, ckpt_every=3, eval_every=3, keep_last=5,
              register=False, models_dir=str(setup["models"]))
    run_job(DPORun, tune_cfg(DPOConfig, setup["name"], [setup["data"]], tmp_path / "a", **kw))
    a = _evals(tmp_path / "a")
    assert sorted(a) == [0, 3, 6]
    assert a[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    for step in (3, 6):
        assert read_meta(tmp_path / "a" / "checkpoints" / f"step-00000{step}")["metric"] == a[step]["val_loss"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000003", tmp_path / "b" / "checkpoints" / "step-000003")
    shutil.copy(tmp_path / "a" / "reference_logps.npz", tmp_path / "b")
    run_job(DPORun, tune_cfg(DPOConfig, setup["name"], [setup["data"]], tmp_path / "b", **kw), resume="auto")
    b = _evals(tmp_path / "b")
    assert sorted(b) == [6] and b[6]["val_loss"] == a[6]["val_loss"]
    assert b[6]["val_reward_margin"] == a[6]["val_reward_margin"]


def test_tokens_seen_counts_the_trained_tokens(setup, tmp_path):
    """tokens_seen (checkpoint, metrics, manifest) is the answer tokens of every chosen and rejected
    row trained on, as SFT counts its trained tokens; it was always 0."""
    from minilab import registry
    from minilab.checkpoint import read_meta
    from minilab.finetune.rows import Rows, WeightedSampler

    cfg = tune_cfg(DPOConfig, setup["name"], [setup["data"]], tmp_path / "run", max_steps=2, ckpt_every=1,
                   register=False, models_dir=str(setup["models"]))
    run_job(DPORun, cfg)
    chosen, rejected = Rows(setup["data"], "train.chosen"), Rows(setup["data"], "train.rejected")
    sampler = WeightedSampler([len(chosen)], None, cfg.seed, 0, 1)  # the run's draws, again
    per_step = [sum(int(rows[i][1][1:].sum()) for _, i in (sampler.next() for _ in range(cfg.batch_size))
                    for rows in (chosen, rejected)) for _ in range(2)]  # the first token is never a target
    assert per_step[0] > 0
    for step in (1, 2):
        assert read_meta(tmp_path / "run" / "checkpoints" / f"step-00000{step}")["tokens_seen"] == sum(per_step[:step])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records if r["kind"] == "train"] == [per_step[0], sum(per_step)]
    assert registry.read_manifest(tmp_path / "run" / "final")["metrics"]["tokens_seen"] == sum(per_step)
