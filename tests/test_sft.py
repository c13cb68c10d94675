"""SFT with LoRA (acceptance: frozen base bitwise, merged == base + adapter, PEFT interop), exact
resume, QLoRA on the CPU, full fine-tuning and a transformers-backed base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from finetune_fixtures import TINY, make_base, make_sft_data, run_job, tune_cfg
from safetensors.torch import load_file

from minilab.cli import main as cli
from minilab.finetune.sft import SFTConfig, SFTRun


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    models = root / "registry"
    b = make_base(root, models)
    data = make_sft_data(b["base"], root / "sft-data")
    return {**b, "data": data, "models": models}


def _cfg(setup, out, **kw):
    return tune_cfg(SFTConfig, setup["name"], [setup["data"]], out, models_dir=str(setup["models"]), **kw)


def test_lora_acceptance(setup, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from minilab import registry
    from minilab.loading import load_model_for_inference

    before = load_file(str(setup["base"] / "model.safetensors"))
    job = run_job(SFTRun, _cfg(setup, tmp_path / "run"))
    final = tmp_path / "run" / "final"
    assert (final / "adapters" / "adapter_config.json").is_file()
    marker = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (marker["kind"], marker["stage"]) == ("minilab.run", "sft")  # cleanup knows the run as minilab's
    assert (final / "adapters" / "adapter_model.safetensors").is_file()
    manifest = registry.read_manifest(final)
    assert manifest["name"].endswith("-lora-v1") and manifest["parent"] == setup["name"]
    assert manifest["base_model"]["fingerprint"] == registry.read_manifest(setup["base"])["fingerprint"]
    # Every base weight bitwise unchanged, in memory and on disk.
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in job.tune.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(state[k], v) for k, v in before.items())
    after = load_file(str(setup["base"] / "model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    adapters = load_file(str(final / "adapters" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    x = torch.randint(0, TINY["vocab_size"], (2, 20))
    model = job.tune.model.eval()
    with torch.no_grad():
        ours = model(x)
        merged = load_model_for_inference(manifest["name"], registry_root=setup["models"])(x)
        print(f"merged vs base+adapter: max |diff| {(merged - ours).abs().max().item():.2e}")
        assert (merged - ours).abs().max().item() <= 1e-5
        hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(setup["base"]), str(final / "adapters"))
        print(f"PEFT on HF base vs ours: max |diff| {(hf(input_ids=x).logits - ours).abs().max().item():.2e}")
        assert (hf(input_ids=x).logits - ours).abs().max().item() <= 1e-4
    # The model's tokenizer carries the training template and stops at its end of turn.
    gen = json.loads((final / "generation_config.json").read_text())
    assert len(gen["eos_token_id"]) == 2
    assert "<|im_start|>" in json.loads((final / "tokenizer_config.json").read_text())["chat_template"]


def _train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_resume_is_exact(setup, tmp_path):
    kw = dict(max_steps=6, ckpt_every=3, keep_last=5, register=False, lora={"r": 4, "dropout": 0.1})
    from minilab.finetune.common import LoraSettings

    kw["lora"] = LoraSettings(r=4, dropout=0.1)
    run_job(SFTRun, _cfg(setup, tmp_path / "a", **kw))
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000003", tmp_path / "b" / "checkpoints" / "step-000003")
    run_job(SFTRun, _cfg(setup, tmp_path / "b", **kw), resume="auto")
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)
    wa = load_file(str(tmp_path / "a" / "final" / "adapters" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "adapters" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Checkpoints hold the adapters only, not the frozen base.
    ckpt = load_file(str(tmp_path / "a" / "checkpoints" / "step-000003" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)


def test_qlora_trains_on_cpu(setup, tmp_path):
    import bitsandbytes as bnb

    from minilab.finetune.merge import merge
    from minilab.loading import load_model_for_inference

    cfg = _cfg(setup, tmp_path / "q", method="qlora", max_steps=4)
    from minilab import distributed

    info, device = distributed.init(torch.device("cpu"))
    job = SFTRun(cfg, info, device)
    quantized = {n: m.weight.data.clone() for n, m in job.tune.model.named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7
    # QLoRA checkpoints activations by default (as PEFT's prepare_model_for_kbit_training), as planned
    assert job.tune.grad_checkpointing and job.tune.peft.get_base_model().config.gradient_checkpointing
    job.fit(None)
    now = {n: m.weight.data for n, m in job.tune.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert all(torch.equal(now[n], q) for n, q in quantized.items())  # 4-bit base untouched
    final = tmp_path / "q" / "final"
    adapters = load_file(str(final / "adapters" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    # Merge: onto the full-precision base, equal to base + adapters computed in full precision.
    out = merge(str(final), output_dir=str(tmp_path / "merged"), models_dir=str(setup["models"]))
    assert out["name"].endswith("-merged-v1")
    x = torch.randint(0, TINY["vocab_size"], (1, 16))
    with torch.no_grad():
        full = load_model_for_inference(final, registry_root=setup["models"])(x)
        merged = load_model_for_inference(out["final_dir"])(x)
    assert (merged - full).abs().max().item() <= 1e-5


def test_full_finetune_and_transformers_backend(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from minilab import registry

    job = run_job(SFTRun, _cfg(setup, tmp_path / "full", method="full", max_steps=2))
    assert registry.read_manifest(job.result["final_dir"])["training_type"] == "sft"
    # A base that transformers runs (tests use a tiny random Llama saved locally; hub ids take this path).
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96)
                     ).save_pretrained(hf_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(setup["base"] / f, hf_dir / f)
    job = run_job(SFTRun, tune_cfg(SFTConfig, hf_dir, [setup["data"]], tmp_path / "hfrun", backend="transformers",
                                   max_steps=2, register=False))
    assert job.tune.base.backend == "transformers"
    assert (tmp_path / "hfrun" / "final" / "adapters" / "adapter_model.safetensors").is_file()
    # merge --force replaces an earlier merge whole (peft's save_pretrained wrote into it, keeping old files)
    merge = ["merge", str(tmp_path / "hfrun" / "final"), "--output-dir", str(tmp_path / "hfmerged"), "--no-register"]
    assert cli(merge) == 0
    (tmp_path / "hfmerged" / "stale.bin").write_text("old")
    assert cli([*merge, "--force"]) == 0
    assert (tmp_path / "hfmerged" / "config.json").is_file() and not (tmp_path / "hfmerged" / "stale.bin").exists()


def test_gradient_checkpointing_same_losses_less_planned_memory(setup, tmp_path):
    """LoRA with gradient checkpointing trains to the same losses (the recomputed forward is the
    same arithmetic) and the preflight, the planner's estimate, counts fewer activation bytes."""
    kw = dict(max_steps=3, register=False, batch_size=8)
    plain = run_job(SFTRun, _cfg(setup, tmp_path / "plain", **kw))
    ckpt = run_job(SFTRun, _cfg(setup, tmp_path / "ckpt", gradient_checkpointing=True, **kw))
    assert not plain.tune.grad_checkpointing and ckpt.tune.grad_checkpointing
    a, b = _train_losses(tmp_path / "plain"), _train_losses(tmp_path / "ckpt")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(a[s] == pytest.approx(b[s], rel=1e-6) for s in a)
    assert ckpt.plan["memory"] < plain.plan["memory"]
    assert plain.plan["trainable"] == plain.plan["planned_trainable"]  # the planner counts the same adapters


def test_preflight_refuses_what_does_not_fit_before_writing(setup, tmp_path, monkeypatch):
    from minilab.errors import MinilabError
    from minilab.planner import machine

    monkeypatch.setattr(machine, "available_ram", lambda: 64 * 2**20)
    with pytest.raises(MinilabError) as e:
        run_job(SFTRun, _cfg(setup, tmp_path / "run"))
    msg = str(e.value)
    assert msg.startswith("not enough RAM") and "gradient_checkpointing=true" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_merge_into_an_existing_output_dir_names_the_cli_flag(setup, tmp_path, capsys):
    """`minilab merge --output-dir X` with X present: the error names --force (was: 'pass
    overwrite=True', a Python argument), leaves X alone, and --force replaces it."""
    run_job(SFTRun, _cfg(setup, tmp_path / "run", max_steps=1))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", str(tmp_path / "run" / "final"), "--output-dir", str(out), "--models-dir", str(setup["models"])]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert f"{out} already exists; pass --force to replace it" in err and "overwrite" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force does not replace a folder minilab did not write ...
    assert cli([*args, "--force"]) == 1 and "no minilab marker" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # ... only an earlier merge (or a new or empty folder)
    (out / "keep.txt").unlink()
    assert cli([*args, "--force"]) == 0
    (out / "stale.txt").write_text("old merge")
    assert cli([*args, "--force"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert f"merged model: {out}" in capsys.readouterr().out


def test_non_finite_loss_stops_sft_without_a_final_model(setup, tmp_path, monkeypatch):
    """The shared divergence stop of every loop: step 3's loss is nan, checkpoint 2 is the last
    good one and is kept, no final/ and nothing registered."""
    from minilab.errors import MinilabError

    real = SFTRun.train_step

    def train_step(self):
        loss, norm, extra = real(self)
        return (float("nan") if self.step == 2 else loss), norm, extra
    monkeypatch.setattr(SFTRun, "train_step", train_step)
    out = tmp_path / "run"
    with pytest.raises(MinilabError, match=r"train loss is nan at step 3: training diverged") as e:
        run_job(SFTRun, _cfg(setup, out, max_steps=5, ckpt_every=2))
    assert f"the last good checkpoint {out / 'checkpoints' / 'step-000002'} is kept" in str(e.value)
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file() and not (out / "final").exists()


def test_merge_refuses_the_base_a_run_and_what_others_depend_on(setup, tmp_path, capsys):
    """`merge LORA --output-dir <its base> --force` dropped the base from the registry and the LoRA
    could not load; `merge run/final --output-dir run --force` wiped the run's checkpoints."""
    from minilab import registry
    from minilab.loading import load_model_for_inference

    models = str(setup["models"])
    run_job(SFTRun, _cfg(setup, tmp_path / "run", max_steps=1, ckpt_every=1))
    lora = tmp_path / "run" / "final"
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "run").rglob("*"))
    base_files = sorted(p.name for p in setup["base"].iterdir())
    # a registered model that another entry names as its parent
    other = tmp_path / "other"
    shutil.copytree(setup["base"], other)
    (other / "manifest.json").unlink()
    registry.register(other, "llama-9K-other-pretrain-v1", root=models)
    child = tmp_path / "child"
    shutil.copytree(setup["base"], child)
    (child / "manifest.json").unlink()
    registry.register(child, "llama-9K-other-sft-v1", root=models, parent="llama-9K-other-pretrain-v1")
    for out, why in ((setup["base"], "which this run reads"), (tmp_path / "run", "which this run reads"),
                     (tmp_path, "which this run reads"), (other, "parent or base of llama-9K-other-sft-v1")):
        assert cli(["merge", str(lora), "--output-dir", str(out), "--force", "--models-dir", models]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "run").rglob("*")) == before
    assert any("step-" in p for p in before)
    assert sorted(p.name for p in setup["base"].iterdir()) == base_files
    assert registry.resolve_model_dir(setup["name"], models).resolve() == setup["base"].resolve()
    assert registry.resolve_model_dir("llama-9K-other-pretrain-v1", models).resolve() == other.resolve()
    load_model_for_inference(lora, registry_root=models)  # the LoRA still finds its base
    for name in ("llama-9K-other-sft-v1", "llama-9K-other-pretrain-v1"):
        registry.remove_model(name, models)


def test_a_step_all_reduces_its_token_count_once(setup, tmp_path, monkeypatch):
    """Under 2 ranks one all-reduce of the trained-token count gives both the gradient normaliser
    and the tokens_seen increment (another for the loss), not a second collective for the same sum."""
    from minilab import distributed

    job = SFTRun(_cfg(setup, tmp_path / "run"), distributed.DistInfo(), torch.device("cpu"))
    job.info = distributed.DistInfo(rank=0, world_size=2)
    calls = []

    def all_reduce_sum(value, info, device):  # the other rank holds the same values
        calls.append(value)
        return 2 * value

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    loss, _, _ = job.train_step()
    assert len(calls) == 2, calls  # the token count, then the loss
    assert job.tokens_seen == 2 * calls[0] > 0
    assert loss == pytest.approx(calls[1])  # 2 * loss / 2 ranks
