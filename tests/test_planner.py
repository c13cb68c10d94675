"""The planner: exact parameter counts against transformers, quantized sizes against bitsandbytes'
measured layout, the KV cache against the reference doc, the CLI, and the pretrain preflight."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilab import cli
from minilab.arch import load_architecture, preset_names
from minilab.errors import ConfigError, MinilabError
from minilab.model import build_model
from minilab.planner import PlanRequest, build_meta, inspect_model, machine, plan_memory, resolve_model
from minilab.planner.anatomy import Linear, int8_bytes, nf4_bytes

# Real config.json values of public models (as published on the Hub).
PUBLIC = {
    "TinyLlama-1.1B": {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 2048,
                       "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
                       "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
                       "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
                       "torch_dtype": "bfloat16", "vocab_size": 32000},
    "Mistral-7B-v0.1": {"architectures": ["MistralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
                        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
                        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000},
    "phi-2": {"architectures": ["PhiForCausalLM"], "hidden_act": "gelu_new", "hidden_size": 2560,
              "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
              "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
              "partial_rotary_factor": 0.4, "qk_layernorm": False, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 51200},
    "gemma-2b": {"architectures": ["GemmaForCausalLM"], "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
                 "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048, "intermediate_size": 16384,
                 "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
                 "num_hidden_layers": 18, "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                 "torch_dtype": "bfloat16", "vocab_size": 256000},
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "layer_norm_epsilon": 1e-05,
             "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
             "vocab_size": 50257},
    "Qwen2-0.5B": {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
                   "intermediate_size": 4864, "max_position_embeddings": 131072, "model_type": "qwen2",
                   "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
                   "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
                   "vocab_size": 151936},
}
# Published sizes, as a second check on the configs themselves.
KNOWN = {"TinyLlama-1.1B": 1_100_048_384, "Mistral-7B-v0.1": 7_241_732_096, "phi-2": 2_779_683_840,
         "gemma-2b": 2_506_172_416, "gpt2": 124_439_808, "Qwen2-0.5B": 494_032_768}


def write_config(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PUBLIC[name]))
    return d


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_param_counts_equal_transformers(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = write_config(tmp_path, name)
    an = inspect_model(build_meta(resolve_model(d / "config.json")))
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
    assert an.params == sum(p.numel() for p in ref.parameters()) == KNOWN[name]
    assert sum(an.groups.values()) == an.params and an.groups["other"] == 0


SKELETON_VARIANTS = {  # options that change the tree, beyond the published configs
    "phi-2 qk_layernorm": ("phi-2", {"qk_layernorm": True, "partial_rotary_factor": 0.5}),
    "gemma-2b attention_bias": ("gemma-2b", {"attention_bias": True, "head_dim": 128}),
    "gpt2 n_inner tied off": ("gpt2", {"n_inner": 1024, "tie_word_embeddings": False}),
    "Qwen2 untied": ("Qwen2-0.5B", {"tie_word_embeddings": False}),
}


@pytest.mark.parametrize("name", ["Mistral-7B-v0.1", "phi-2", "gemma-2b", "gpt2", "Qwen2-0.5B",
                                  *SKELETON_VARIANTS])
def test_skeletons_are_transformers_own_tree(name):
    """The planner builds these without transformers' modeling code (seconds of imports): the
    anatomy it reads must be exactly the one of transformers' model, linear by linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minilab.planner import skeletons

    base, changes = SKELETON_VARIANTS.get(name, (name, {}))
    data = {**PUBLIC[base], **changes}
    config = AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items() if k != "model_type"})
    assert skeletons.supported(config)
    with torch.device("meta"):
        theirs = inspect_model(AutoModelForCausalLM.from_config(config))
    built = build_meta(resolve_model(data))  # from the mapping itself: every required key is in it
    assert type(built).__name__ == "CausalLMSkeleton" and type(built.config).__name__ == "SimpleNamespace"
    # and from transformers' config object (the path of a config.json missing a required key)
    for ours in (inspect_model(built), inspect_model(skeletons.build_skeleton(config))):
        assert ours.to_dict() == theirs.to_dict()
        assert ours.linears == theirs.linears
    required = skeletons.RAW[data["model_type"]][0]
    assert skeletons.raw_config(data["model_type"], {k: v for k, v in data.items() if k != required[0]}) is None


def test_plan_of_a_published_phi_config_imports_no_transformers(tmp_path):
    """`minilab plan phi-2/` answers from the config mapping and minilab's own module tree: no
    transformers import (which alone took seconds), the published parameter count."""
    d = write_config(tmp_path, "phi-2")
    code = ("import sys; from minilab.planner.cli import plan; p = plan(sys.argv[1]); "
            "print(p['params'], 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(KNOWN["phi-2"]), "False"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**PUBLIC["phi-2"], "hidden_size": "big"}))
    with pytest.raises(ConfigError, match="hidden_size") as e:  # one line, through transformers' own check
        build_meta(resolve_model(bad))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("preset", preset_names())
def test_presets_match_the_model(preset):
    model = build_model(load_architecture(preset), device="meta")
    an = inspect_model(build_meta(resolve_model(preset)))
    assert an.params == model.num_params()
    assert {k: v for k, v in an.groups.items() if k != "other"} == model.param_groups()


def test_quantized_bytes_follow_bitsandbytes():
    n = 4096 * 4096
    assert round(nf4_bytes(n, double_quant=True) / n, 5) == 0.51593      # measured, reference 2.5
    assert nf4_bytes(n, double_quant=False) / n == 0.5625
    assert round(int8_bytes(Linear("x", 4096, 4096, False, True)) / n, 6) == 1.000977


def test_quantization_skips_embeddings_head_and_norms(tmp_path):
    an = inspect_model(build_meta(resolve_model(write_config(tmp_path, "TinyLlama-1.1B"))))
    g = an.groups
    assert an.quantized_numel == g["attention"] + g["mlp"]
    plan = plan_memory(an, PlanRequest(method="qlora", target="cuda"))
    upcast = next(x for x in plan.lines if x.key == "upcast")
    assert upcast.bytes == 4 * (g["embeddings"] + g["head"] + g["norms"])    # PEFT's fp32 upcast


def test_kv_cache_tinyllama_2048_is_44_mib(tmp_path):
    an = inspect_model(build_meta(resolve_model(write_config(tmp_path, "TinyLlama-1.1B"))))
    plan = plan_memory(an, PlanRequest(method="inference", seq_len=2048, precision="bf16", target="cuda"))
    kv = next(x for x in plan.lines if x.key == "kv_cache")
    assert kv.bytes == 44 * 2**20


def test_cpu_fp32_inference_counts_the_greedy_screen(tmp_path):
    """On a CPU in fp32, decoding keeps an int8 copy of a large head (`ScreenedHead`): a line of its own."""
    from minilab.screened_head import screened_head_bytes

    an = inspect_model(build_meta(resolve_model(write_config(tmp_path, "TinyLlama-1.1B"))))
    cpu = plan_memory(an, PlanRequest(method="inference", precision="fp32"))
    screen = next(x for x in cpu.lines if x.key == "screen")
    assert screen.bytes == screened_head_bytes(32000, 2048) == 32000 * 2054
    assert sum(x.bytes for x in cpu.lines if x.key != "runtime") == cpu.peak
    bf16 = plan_memory(an, PlanRequest(method="inference", precision="bf16", target="cuda"))
    assert not any(x.key == "screen" for x in bf16.lines)
    # micro's 8192 x 128 head: held too (steps of 4 rows and more read it), as use_decode_layout builds it
    micro = inspect_model(build_meta(resolve_model("micro")))
    lines = plan_memory(micro, PlanRequest(method="inference")).lines
    assert next(x for x in lines if x.key == "screen").bytes == screened_head_bytes(8192, 128)


def test_hub_id_from_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MinilabError, match="not in the local Hugging Face cache") as e:
        resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    assert "\n" not in str(e.value)
    snap = tmp_path / "hub" / "models--TinyLlama--TinyLlama-1.1B-Chat-v1.0" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(PUBLIC["TinyLlama-1.1B"]))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    assert resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0").minilab_config.n_layer == 22


def test_training_lines_and_phases():
    an = inspect_model(build_meta(resolve_model("tiny")))
    full = plan_memory(an, PlanRequest(method="full", batch_size=4, seq_len=256))
    keys = {x.key for x in full.lines}
    assert {"weights", "grads", "optimizer", "activations", "logits", "runtime"} <= keys
    assert full.peak == max(full.phases.values())
    gc = plan_memory(an, PlanRequest(method="full", batch_size=4, seq_len=256, grad_checkpointing=True))
    lora = plan_memory(an, PlanRequest(method="lora", batch_size=4, seq_len=256))
    assert gc.peak < full.peak and lora.trainable_params < an.params
    mixed = plan_memory(an, PlanRequest(method="full", precision="bf16", target="cuda"))
    assert any(x.key == "master" for x in mixed.lines)


def test_cuda_training_follows_the_caching_allocator():
    # Measured on an H200 (docs/planner.md): the fused AdamW kernel keeps no sqrt(v) temporaries,
    # LoRA's freed temporaries are reused, gradients fill the blocks freed activations leave (the
    # peak is at the start of backward), and the fused norm keeps its input, not the normalised value.
    an = inspect_model(build_meta(resolve_model("small")))
    line = lambda plan, key: next((x.bytes for x in plan.lines if x.key == key), None)  # noqa: E731
    for method in ("full", "lora"):
        req = dict(method=method, batch_size=4, seq_len=512, precision="fp32")
        cpu, cuda = plan_memory(an, PlanRequest(**req)), plan_memory(an, PlanRequest(**req, target="cuda"))
        assert line(cpu, "step_tmp") > 0 and line(cuda, "step_tmp") == 0
        assert (line(cpu, "lora_tmp") or 0) > 0 if method == "lora" else line(cpu, "lora_tmp") is None
        assert line(cuda, "lora_tmp") is None
        saved = sum(line(cuda, k) for k in ("activations", "logits"))
        fixed = sum(line(cuda, k) for k in ("weights", "optimizer")) + (line(cuda, "adapters") or 0)
        assert cuda.phases["backward"] == fixed + max(saved, line(cuda, "grads"))
        assert line(cuda, "activations") < line(cpu, "activations")


def test_plan_cli_json_and_compare(tmp_path, capsys):
    d = write_config(tmp_path, "TinyLlama-1.1B")
    assert cli.main(["plan", str(d), "--method", "qlora", "--gpu-memory", "8GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == KNOWN["TinyLlama-1.1B"] and out["verdict"]["fits"]
    assert cli.main(["plan", "--compare", "micro", "tiny", "--method", "full", "--gpu-memory", "64MiB"]) == 0
    text = capsys.readouterr().out
    assert "micro" in text and "tiny" in text and "change" in text


def test_preflight_refuses_a_run_that_cannot_fit_the_disk(tmp_path, monkeypatch):
    from minilab import pretrain

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(machine, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    cfg = pretrain.PretrainConfig(data_dirs=["x"], tokenizer_dir="t", output_dir=str(tmp_path / "run"))
    est = pretrain.estimate_resources(build_model(load_architecture("micro")), cfg, 64)
    assert set(est) >= {"memory", "disk", "params"}
    with pytest.raises(MinilabError) as e:
        pretrain.preflight(est, tmp_path / "run", torch.device("cpu"))
    assert "not enough disk" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_fsdp_estimate_is_one_ranks_share():
    """Under FSDP the preflight plans one rank: the training state divided over the ranks, plus
    what every rank holds whole (activations, logits, runtime, the gathered root and blocks)."""
    from minilab.planner.disk import estimate_pretrain

    model = build_meta(resolve_model("tiny"))
    an = inspect_model(model)
    kw = dict(batch_size=4, seq_len=256, precision="fp32", keep_last=2, steps=100, ckpt_every=50)
    one = estimate_pretrain(model, **kw)
    mem = plan_memory(an, PlanRequest(method="full", batch_size=4, seq_len=256, target="cpu"))
    assert one["memory"] == mem.total
    lines = {x.key: x.bytes for x in mem.lines}
    state = sum(lines.get(k, 0) for k in ("weights", "grads", "optimizer", "step_tmp"))
    two, four = (estimate_pretrain(model, **kw, shards=n)["memory"] for n in (2, 4))
    assert one["memory"] > two > four
    assert two - four == pytest.approx(state / 2 - state / 4, abs=2)  # only the sharded part shrinks
    root = an.groups["embeddings"] + an.groups["head"]
    block = (an.params - root) / an.n_layer
    whole = lines["activations"] + lines["logits"] + mem.runtime + 4 * (root + 3 * block)
    assert four == pytest.approx(whole + state / 4, abs=2)
    assert estimate_pretrain(model, **kw, shards=2)["disk"] == one["disk"]  # rank 0 writes full checkpoints
