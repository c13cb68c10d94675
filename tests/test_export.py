"""Export and quantization: GGUF read back with `gguf`'s own reader (every tensor, the vocabulary, the
metadata), the GGUF run through an independent llama.cpp-convention forward pass (adjacent-pair
RoPE) to prove the Q/K permutation, `--format hf`, and `minilab quantize --int8`."""

import json

import numpy as np
import pytest
import torch
from inference_fixtures import shared_model_dir

from minilab.cli import main as cli
from minilab.export.gguf import permute_qk, unpermute_qk, write_gguf
from minilab.inference import Engine, SamplingParams
from minilab.loading import load_model_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir():
    return shared_model_dir()


def _field(reader, key):
    return reader.get_field(key).contents()


def _rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent_pairs(x, base):
    """llama.cpp's LLAMA ('normal') RoPE: rotates (x[2i], x[2i+1]). x: (T, h, hd)."""
    T, _, hd = x.shape
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]     # (T, hd/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out


def _rope_neox(x, base):
    """llama.cpp's NEOX RoPE (qwen3's): rotates (x[i], x[i + hd/2]). x: (T, h, hd)."""
    T, _, hd = x.shape
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]     # (T, hd/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate((x0 * cos - x1 * sin, x0 * sin + x1 * cos), axis=-1)


def _gguf_forward(t, meta, ids):
    """Logits (T, V) from GGUF tensors the way llama.cpp computes them (float64 numpy): `llama` with
    adjacent-pair RoPE, `qwen3` with a per-head RMSNorm of q and k, then NEOX RoPE."""
    nh, nkv, eps, base = meta["heads"], meta["kv_heads"], meta["eps"], meta["base"]
    qwen3 = meta["arch"] == "qwen3"
    rope = _rope_neox if qwen3 else _rope_adjacent_pairs
    x = t["token_embd.weight"][ids]
    T = len(ids)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(meta["layers"]):
        def w(name, i=i):
            return t[f"blk.{i}.{name}.weight"]
        h = _rmsnorm(x, w("attn_norm"), eps)
        q, k = (h @ w("attn_q").T).reshape(T, nh, -1), (h @ w("attn_k").T).reshape(T, nkv, -1)
        if qwen3:
            q, k = _rmsnorm(q, w("attn_q_norm"), eps), _rmsnorm(k, w("attn_k_norm"), eps)
        q, k = rope(q, base), rope(k, base)
        v = (h @ w("attn_v").T).reshape(T, nkv, -1)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + causal
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, -1) @ w("attn_output").T
        h = _rmsnorm(x, w("ffn_norm"), eps)
        gate = h @ w("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    head = t.get("output.weight", t["token_embd.weight"])
    return _rmsnorm(x, t["output_norm.weight"], eps) @ head.T


def test_permutation_is_llama_cpp_s_and_invertible():
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3).astype(np.float32)  # 4 heads of hd 8
    p = permute_qk(w, 4)
    assert np.array_equal(unpermute_qk(p, 4), w)
    # head 0, rotate-half rows [0..3 | 4..7] become adjacent pairs (0,4), (1,5), (2,6), (3,7)
    assert p[:8, 0].tolist() == w[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()


def _qk_norm_model(model_dir, out):
    """The shared model as a QK-norm (Qwen3) model: its weights, q/k norms away from ones, same tokenizer."""
    from minilab.hf import save_hf_dir
    from minilab.model import build_model

    base = load_model_for_inference(str(model_dir))
    model = build_model(base.config.replace(qk_norm=True))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.add_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    save_hf_dir(model, out, tokenizer_dir=model_dir)
    return out


@pytest.mark.parametrize("outtype,arch", [("f32", "llama"), ("f16", "llama"), ("f32", "qwen3"), ("f16", "qwen3")])
def test_gguf_round_trip_and_llama_cpp_forward(model_dir, tmp_path, outtype, arch):
    from gguf import GGUFReader

    if arch == "qwen3":
        model_dir = _qk_norm_model(model_dir, tmp_path / "qk")
    model = load_model_for_inference(str(model_dir))
    cfg = model.config
    assert cfg.architecture == arch
    permuted = arch == "llama"  # qwen3: NEOX RoPE, the rotate-half layout as stored
    out = write_gguf(model, model_dir, tmp_path / "m.gguf", name="tiny", outtype=outtype)
    r = GGUFReader(str(out))
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    # every tensor, Q/K un-permuted back to ours, bit-exact (f32) or as fp16 rounds it
    sd = model.state_dict()
    assert len(tensors) == len(sd) - 1  # the tied head is not written
    from minilab.export.gguf import gguf_name

    for name, ref in sd.items():
        if name == "lm_head.weight":
            continue
        got = tensors[gguf_name(name)].astype(np.float32)
        if permuted and name.endswith("q_proj.weight"):
            got = unpermute_qk(got, cfg.n_head)
        elif permuted and name.endswith("k_proj.weight"):
            got = unpermute_qk(got, cfg.n_kv_head)
        ref = ref.numpy()
        expect = ref.astype(np.float16).astype(np.float32) if outtype == "f16" and ref.ndim == 2 else ref
        assert got.shape == ref.shape and np.array_equal(got, expect), name
    # the vocabulary, special ids and chat template
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert tokens[_field(r, "tokenizer.ggml.eos_token_id")] == "</s>"
    assert tokens[_field(r, "tokenizer.ggml.eot_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")
    assert _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.attention.head_count_kv") == cfg.n_kv_head
    assert sum(k.endswith("attn_q_norm.weight") for k in tensors) == (cfg.n_layer if arch == "qwen3" else 0)
    # llama.cpp's computation on the file agrees with ours: same argmax everywhere, small difference
    meta = {"arch": arch, "heads": _field(r, f"{arch}.attention.head_count"),
            "kv_heads": _field(r, f"{arch}.attention.head_count_kv"),
            "eps": _field(r, f"{arch}.attention.layer_norm_rms_epsilon"), "base": _field(r, f"{arch}.rope.freq_base"),
            "layers": _field(r, f"{arch}.block_count")}
    ids = Engine(model, __import__("tokenizers").Tokenizer.from_file(str(model_dir / "tokenizer.json")),
                 "m").encode("the cat sat on a mat while another dog ran")
    ref = model(torch.tensor([ids]))[0].double().numpy()
    got = _gguf_forward({k: v.astype(np.float64) for k, v in tensors.items()}, meta, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < (1e-4 if outtype == "f32" else 5e-2)
    # with the other layout (llama unpermuted, qwen3 permuted) the same forward pass is wrong: the test can tell
    broken = dict(tensors)
    for k in [k for k in tensors if k.endswith(("attn_q.weight", "attn_k.weight"))]:
        broken[k] = (unpermute_qk if permuted else permute_qk)(tensors[k], meta["heads"] if "attn_q" in k
                                                                else meta["kv_heads"])
    assert np.abs(_gguf_forward({k: v.astype(np.float64) for k, v in broken.items()}, meta, ids) - ref).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_cpp_python_agrees(model_dir, tmp_path, arch):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python has no prebuilt wheel for this platform on PyPI (source build "
        "too slow for CI); the numpy llama.cpp-convention forward pass above checks the same layout")
    if arch == "qwen3":
        model_dir = _qk_norm_model(model_dir, tmp_path / "qk")
    model = load_model_for_inference(str(model_dir))
    path = write_gguf(model, model_dir, tmp_path / "m.gguf", name="tiny")
    llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64)
    ids = [5, 17, 40, 9, 33]
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    ref = model(torch.tensor([ids]))[0].numpy()
    assert (got.argmax(-1) == ref.argmax(-1)).all() and np.abs(got - ref).max() < 1e-2


def test_export_verb_gguf_and_hf(model_dir, tmp_path, capsys):
    assert cli(["export", str(model_dir), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert cli(["export", str(model_dir), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["export", str(model_dir), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "manifest.json" not in files
    a, b = load_model_for_inference(str(model_dir)), load_model_for_inference(str(tmp_path / "hf"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_quantize_int8_registers_loads_generates_and_is_smaller(model_dir, tmp_path, capsys):
    from minilab.fsutil import dir_size
    from minilab.registry import read_manifest, resolve_model_dir

    assert cli(["quantize", str(model_dir), "--int8"]) == 0
    name = capsys.readouterr().out.split(":")[0]
    assert name.startswith("llama-") and name.endswith("-int8-v1")
    path = resolve_model_dir(name)
    assert dir_size(path) < 0.6 * dir_size(model_dir)
    assert read_manifest(path)["training_type"] == "int8"
    q = Engine.load(name)
    f = Engine.load(str(model_dir))
    assert q.memory_bytes() < 0.6 * f.memory_bytes()
    ids = f.encode("the cat sat on a mat")
    # the int8 model stays close to the float one: same next token at nearly every position
    lq, lf = q.model(torch.tensor([ids]))[0], f.model(torch.tensor([ids]))[0]
    assert (lq.argmax(-1) == lf.argmax(-1)).float().mean() >= 0.8
    text, n, _ = q.complete(ids, SamplingParams(max_tokens=8))
    assert n > 0
    # what was saved is exactly what was quantized in memory
    from minilab.quantization import quantize_int8

    mem = quantize_int8(load_model_for_inference(str(model_dir)))
    assert torch.equal(mem(torch.tensor([ids]))[0], lq)
    assert cli(["generate", name, "--prompt", "the cat", "--max-tokens", "4"]) == 0
    assert cli(["generate", str(model_dir), "--int8", "--prompt", "the cat", "--max-tokens", "4"]) == 0
    assert cli(["generate", str(model_dir), "--load-in-4bit", "--prompt", "x"]) in (0, 1)  # 1: no bitsandbytes


def test_export_force_replaces_only_an_earlier_export(model_dir, tmp_path, capsys):
    """export --force replaced any path; now a GGUF file only over a GGUF file, an HF directory only
    over an earlier HF export (or an empty folder), never the model being exported."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for fmt, out, why in (("gguf", notes, "not a GGUF file"), ("gguf", mine, "not a GGUF file"),
                          ("hf", mine, "no minilab marker"), ("hf", notes, "is a file"),
                          ("hf", model_dir, "which this run reads")):
        assert cli(["export", str(model_dir), "--format", fmt, "--output", str(out), "--force"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert notes.read_text() == "keep me" and (mine / "thesis.tex").read_text() == "years of work"
    assert (model_dir / "config.json").is_file()
    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf")):
        assert cli(["export", str(model_dir), "--format", fmt, "--output", str(out)]) == 0
        assert cli(["export", str(model_dir), "--format", fmt, "--output", str(out), "--force"]) == 0
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF" and (tmp_path / "hf" / "minilab_export.json").is_file()
