"""The whole fine-tuning chain through the real CLI on the built-in demo data: pretrained micro
model -> sft-data -> sft (LoRA) -> dpo-data -> dpo -> merge -> eval (chat format, --dpo), each
landing in the registry with its lineage; merged logits equal the adapter model's."""

from __future__ import annotations

import json

import torch
from fixtures import make_packed

from minilab import registry
from minilab.cli import main as cli

ARCH = ["--set", "model.n_layer=2", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.head_dim=16", "--set", "model.intermediate_size=64"]
FAST = ["--set", "batch_size=4", "--set", "eval_every=100", "--set", "eval_batches=1", "--set", "device=cpu",
        "--set", "max_new_tokens=4", "--set", "optim.lr=0.01"]


def test_chain_pretrain_sft_dpo_merge_eval(tmp_path, capsys):
    from minilab.loading import load_model_for_inference

    d = make_packed(tmp_path, seq_len=64)
    assert cli(["pretrain", "--data_dirs", str(d["packed"]), "--tokenizer_dir", str(d["tokenizer"]),
                "--output_dir", str(tmp_path / "pre"), "--max_steps", "4", "--arch", "micro", *ARCH,
                "--set", "batch_size=4", "--set", "eval_every=100", "--set", "eval_batches=1",
                "--set", "dataset_name=tiny"]) == 0
    base = registry.read_manifest(tmp_path / "pre" / "final")["name"]
    assert cli(["sft-data", "--source", "demo", "--tokenizer-dir", str(tmp_path / "pre" / "final"),
                "--output-dir", str(tmp_path / "sftd"), "--max-len", "64", "--limit", "48"]) == 0
    assert cli(["sft", "--base-model", base, "--data-dirs", str(tmp_path / "sftd"), "--output-dir",
                str(tmp_path / "sft"), "--max-steps", "4", *FAST]) == 0
    sft = registry.read_manifest(tmp_path / "sft" / "final")
    assert sft["name"].endswith("-lora-v1") and sft["parent"] == base
    assert cli(["dpo-data", "--source", "demo", "--tokenizer-dir", str(tmp_path / "sft" / "final"),
                "--output-dir", str(tmp_path / "dpod"), "--max-len", "64", "--limit", "40"]) == 0
    assert cli(["dpo", "--base-model", sft["name"], "--data-dirs", str(tmp_path / "dpod"), "--output-dir",
                str(tmp_path / "dpo"), "--max-steps", "4", *FAST]) == 0
    dpo = registry.read_manifest(tmp_path / "dpo" / "final")
    assert dpo["name"].endswith("-dpo-v1") and [s["name"] for s in dpo["lineage"]] == [base, sft["name"]]
    assert cli(["merge", dpo["name"]]) == 0
    merged_name = [r["name"] for r in registry.list_models() if r["type"] == "merged"][0]
    merged = registry.read_manifest(registry.resolve_model_dir(merged_name))
    assert merged["parent"] == dpo["name"] and len(merged["lineage"]) == 3
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a = load_model_for_inference(dpo["name"])(x)
        b = load_model_for_inference(merged_name)(x)
    assert (a - b).abs().max().item() <= 1e-5
    capsys.readouterr()
    assert cli(["eval", "--model-path", sft["name"], "--output-dir", str(tmp_path / "ev"),
                "--set", "max_new_tokens=6"]) == 0
    assert cli(["eval", "--model-path", dpo["name"], "--output-dir", str(tmp_path / "ev2"),
                "--dpo", str(tmp_path / "dpod"), "--set", "max_new_tokens=0"]) == 0
    assert "win rate vs reference" in capsys.readouterr().out
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    item = results["generations"]["items"][0]
    assert item["prompt"].startswith("<|im_start|>user\n") and item["prompt"].endswith("<|im_start|>assistant\n")
    gen = json.loads((tmp_path / "sft" / "final" / "generation_config.json").read_text())
    tok = json.loads((tmp_path / "sft" / "final" / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    assert im_end in gen["eos_token_id"]  # eval and serving stop at the end of the assistant turn
