"""Hugging Face interop and the loading API: logits parity with transformers both ways, bitwise
round trips, one-line errors, LoRA via peft, tokenizer files in exports. All local, no hub."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from minilab.errors import ConfigError, MinilabError
from minilab.hf import from_hf_config, load_hf_dir, save_hf_dir, to_hf_config
from minilab.loading import load_model, load_model_for_inference
from minilab.model import ModelConfig, build_model

VOCAB = 300
BASE = dict(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=64, intermediate_size=96, max_seq_len=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every weight, norms included (their init is all ones, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _ours(seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**BASE, **changes}))
    _perturb(model, seed)
    return model.eval()


def _ids(seed: int = 1, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, ids, cls=LlamaForCausalLM):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf) is cls
    with torch.no_grad():
        return hf(ids).logits


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


# ---- ours -> transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("changes", [
    dict(tie_embeddings=True),
    dict(tie_embeddings=False),
    dict(tie_embeddings=True, n_kv_head=2),
    dict(tie_embeddings=False, n_kv_head=1, rope_theta=500000.0),
    dict(tie_embeddings=False, n_kv_head=2, rope_theta=500000.0, rope_scaling=LLAMA3),
    dict(tie_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    dict(tie_embeddings=True, qk_norm=True),
    dict(tie_embeddings=False, n_kv_head=2, qk_norm=True, rope_theta=1e6, head_dim=32),
], ids=["tied-mha", "untied-mha", "tied-gqa", "untied-mqa-theta", "llama3-scaling", "linear-scaling",
        "qk-norm-tied", "qk-norm-untied-gqa-wide-heads"])
def test_export_matches_transformers_logits(tmp_path, changes):
    model = _ours(**changes)
    out = save_hf_dir(model, tmp_path / "export")
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    qwen3 = changes.get("qk_norm", False)
    assert (ours - _hf_logits(out, ids, Qwen3ForCausalLM if qwen3 else LlamaForCausalLM)).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == \
        ((["Qwen3ForCausalLM"], "qwen3") if qwen3 else (["LlamaForCausalLM"], "llama"))
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is changes["tie_embeddings"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in list(f.keys())) is not changes["tie_embeddings"]  # tied head stored once
    assert from_hf_config(config, "config.json") == model.config


@pytest.mark.parametrize("arch", [dict(rope_scaling=LLAMA3), dict(qk_norm=True)], ids=["llama3-rope", "qk-norm"])
def test_round_trip_is_bitwise(tmp_path, arch):
    for tie in (True, False):
        model = _ours(tie_embeddings=tie, n_kv_head=2, **arch)
        back = load_hf_dir(save_hf_dir(model, tmp_path / f"rt-{tie}"))
        assert _same_state(model, back)
        assert back.config == model.config
        assert (back.lm_head.weight is back.model.embed_tokens.weight) is tie
        assert torch.equal(back.inv_freq, model.inv_freq)


def test_export_dtype_and_overwrite(tmp_path):
    model = _ours()
    out = save_hf_dir(model, tmp_path / "m", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_hf_dir(out)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_hf_dir(out, dtype=torch.float32).lm_head.weight.dtype == torch.float32
    with pytest.raises(MinilabError, match="already exists"):
        save_hf_dir(model, out)
    save_hf_dir(model, out, overwrite=True, extra_files={"README.md": "hi", "meta.json": {"a": 1}})
    assert (out / "README.md").read_text() == "hi" and json.loads((out / "meta.json").read_text()) == {"a": 1}
    assert load_hf_dir(out).model.embed_tokens.weight.dtype == torch.float32


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(MinilabError, match="extra file"):
        save_hf_dir(_ours(), tmp_path / "bad", extra_files={"../escape.txt": "x"})
    assert list(tmp_path.iterdir()) == []


# ---- transformers -> ours ---------------------------------------------------------------------
TINYLLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SMOLLM = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def _hf_model(path, _shard=False, **kw):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**json.loads(json.dumps(kw))))  # LlamaConfig edits nested dicts
    _perturb(hf, 3)
    hf.save_pretrained(path, **({"max_shard_size": "40KB"} if _shard else {}))
    return hf.eval()


@pytest.mark.parametrize("kw", [TINYLLAMA, SMOLLM], ids=["tinyllama-style", "smollm-style"])
def test_import_matches_transformers_logits(tmp_path, kw):
    hf = _hf_model(tmp_path / "hf", **kw)
    ids = _ids()
    with torch.no_grad():
        want = hf(ids).logits
        got = load_hf_dir(tmp_path / "hf")(ids)
        served = load_model_for_inference(tmp_path / "hf")
        assert not served.training and not any(p.requires_grad for p in served.parameters())
        assert (got - want).abs().max().item() <= 1e-4
        assert torch.equal(served(ids), got)
    assert served.config.tie_embeddings is kw["tie_word_embeddings"]


QWEN3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6,
             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
             use_sliding_window=False, max_window_layers=1)  # Qwen3-0.6B's shape, shrunk


def test_import_qwen3_matches_transformers_and_is_a_qk_norm_model(tmp_path):
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**json.loads(json.dumps(QWEN3))))
    _perturb(hf, 3)  # q_norm / k_norm away from ones too
    hf.save_pretrained(tmp_path / "hf")
    ids = _ids()
    ours = load_hf_dir(tmp_path / "hf")
    assert ours.config.qk_norm and ours.config.head_dim == 32 and ours.config.architecture == "qwen3"
    with torch.no_grad():
        assert (ours(ids) - hf.eval()(ids).logits).abs().max().item() <= 1e-4
    # its own sliding window in use is other attention: refused in one line, naming the key
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    with pytest.raises(ConfigError, match="sliding_window"):
        from_hf_config({**cfg, "use_sliding_window": True, "sliding_window": 32}, "config.json")
    assert from_hf_config({**cfg, "use_sliding_window": False, "sliding_window": 32}, "c.json").qk_norm


def test_qk_norm_with_llama3_scaling_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="qk_norm"):
        ModelConfig(**BASE, qk_norm=True, rope_scaling=LLAMA3).validate()


def test_import_old_style_rope_config(tmp_path):
    """transformers 4 spelling: top-level rope_theta and rope_scaling {type: ...}."""
    _hf_model(tmp_path / "hf", **TINYLLAMA)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 4.0}, torch_dtype="float32")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    ours = load_hf_dir(tmp_path / "hf")
    assert ours.config.rope_theta == 50000.0
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - _hf_logits(tmp_path / "hf", ids)).abs().max().item() <= 1e-4


def test_import_sharded_and_pytorch_bin(tmp_path):
    hf = _hf_model(tmp_path / "sharded", **SMOLLM, _shard=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = load_hf_dir(tmp_path / "sharded")
    ids = _ids()
    with torch.no_grad():
        assert (sharded(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    # A .bin checkpoint (with an obsolete rotary buffer, as old exports have) loads via weights_only.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, bin_dir / "pytorch_model.bin")
    assert _same_state(load_hf_dir(bin_dir), sharded)


# ---- errors -----------------------------------------------------------------------------------
def _export(tmp_path, **changes):
    return save_hf_dir(_ours(**changes), tmp_path / "m")


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_config_and_weights(tmp_path):
    out = _export(tmp_path)
    (out / "config.json").unlink()
    with pytest.raises(MinilabError) as e:
        load_hf_dir(out)
    assert "config.json" in _one_line(e)
    out = _export(tmp_path / "2")
    (out / "model.safetensors").unlink()
    with pytest.raises(MinilabError) as e:
        load_model_for_inference(out)
    assert "no weights" in _one_line(e) and str(out) in str(e.value)


def test_truncated_weights_named(tmp_path):
    out = _export(tmp_path)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MinilabError) as e:
        load_hf_dir(out)
    assert "model.safetensors" in _one_line(e)


@pytest.mark.parametrize("key, value, match", [
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gpt2", "unsupported model_type 'gpt2'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "yarn"),
])
def test_unsupported_config_is_one_line_error(tmp_path, key, value, match):
    out = _export(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_hf_dir(out)
    assert match in _one_line(e) and "config.json" in str(e.value)


def test_wrong_tensor_names_and_shapes(tmp_path):
    out = _export(tmp_path, tie_embeddings=False)
    path = out / "model.safetensors"
    with safe_open(path, "pt") as f:
        names = list(f.keys())
        state = {k: f.get_tensor(k) for k in names}
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(missing, path)
    with pytest.raises(MinilabError, match="missing tensors lm_head.weight"):
        load_hf_dir(out)
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path)
    with pytest.raises(MinilabError, match="unexpected tensors model.layers.0.self_attn.q_proj.bias"):
        load_hf_dir(out)
    save_file({**state, "model.norm.weight": torch.ones(32)}, path)
    with pytest.raises(MinilabError, match=r"model.norm.weight has shape \(32,\)"):
        load_hf_dir(out)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    out = _export(tmp_path)
    (out / "model.safetensors").unlink()
    torch.save({"model.norm.weight": _Evil()}, out / "pytorch_model.bin")
    with pytest.raises(MinilabError, match="pytorch_model.bin: refusing to load"):
        load_hf_dir(out)
    assert "must never run" not in capsys.readouterr().out


def test_mistral_without_sliding_window_is_llama(tmp_path):
    cfg = json.loads(_export(tmp_path).joinpath("config.json").read_text())
    assert from_hf_config({**cfg, "model_type": "mistral", "sliding_window": None}, "c.json").d_model == 64
    with pytest.raises(ConfigError, match="sliding_window"):
        from_hf_config({**cfg, "model_type": "mistral", "sliding_window": 16}, "c.json")


def test_to_hf_config_fields():
    cfg = ModelConfig(**BASE, n_kv_head=2, rope_theta=123.0, norm_eps=1e-6, tie_embeddings=False)
    hf = to_hf_config(cfg)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings) == (64, 2, 16, 64)
    assert hf.rope_parameters["rope_theta"] == 123.0 and hf.rms_norm_eps == 1e-6
    assert hf.tie_word_embeddings is False


# ---- LoRA -------------------------------------------------------------------------------------
def test_lora_trains_adapters_only(tmp_path):
    out = _export(tmp_path, n_kv_head=2)
    model = load_model(out, apply_lora=True, lora_config={"r": 4})
    assert model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(T=16)
    model(ids)[:, :-1].float().logsumexp(-1).mean().backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    assert any(not torch.equal(after[n], v) for n, v in lora_before.items())
    # Saved adapters load back for more training, and merge for inference.
    model.save_pretrained(out / "adapters")
    again = load_model(out, adapter_dir="adapters")
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable
    merged = load_model_for_inference(out, adapter_dir=out / "adapters")
    with torch.no_grad():
        assert (merged(ids) - model.eval()(ids)).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft looks for the base config
def test_registry_name_and_adapter_only_dir(tmp_path):
    from minilab.registry import register

    root = tmp_path / "reg"
    out = _export(tmp_path)
    register(out, "llama-50K-unit-pretrain-v1", root=root)
    ids = _ids(T=8)
    by_name = load_model_for_inference("llama-50K-unit-pretrain-v1", registry_root=root)
    assert _same_state(by_name, load_hf_dir(out))
    # A LoRA result saved alone, its base named in adapter_config.json, loads as the adapted model.
    lora = load_model(out, apply_lora=True, lora_config={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero: make the adapters matter
    lora.peft_config["default"].base_model_name_or_path = "llama-50K-unit-pretrain-v1"
    lora.save_pretrained(tmp_path / "lora-only")
    adapted = load_model_for_inference(tmp_path / "lora-only", registry_root=root)
    with torch.no_grad():
        want = lora.eval()(ids)
        assert (adapted(ids) - want).abs().max().item() <= 1e-4
        assert (by_name(ids) - want).abs().max().item() > 1e-3
    trainable = load_model(tmp_path / "lora-only", registry_root=root)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in lora.named_parameters() if "lora_" in n}


def test_lora_config_errors(tmp_path):
    out = _export(tmp_path)
    with pytest.raises(ConfigError, match="lora_config: key 'rr': unknown LoRA setting .*'r'"):
        load_model(out, apply_lora=True, lora_config={"rr": 4})
    with pytest.raises(ConfigError, match="apply_lora"):
        load_model(out, lora_config={"r": 4})
    with pytest.raises(MinilabError, match="adapter_config.json"):
        load_model(out, adapter_dir="adapters")
    assert load_model(out).training


# ---- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_files_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ate the cat's dinner"], trainer)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    out = save_hf_dir(_ours(), tmp_path / "m", tokenizer_dir=tok_dir)
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 3, 1)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 3
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("the cat sat", add_special_tokens=False)["input_ids"] == tok.encode("the cat sat").ids
    assert hf_tok.eos_token == "</s>"
