"""The model itself: presets, true parameter counts, costs, KV-cache decoding, checkpointing."""

import pytest
import torch

from minilab.arch import load_architecture, preset_names
from minilab.decode_layout import use_decode_layout
from minilab.fsutil import format_params
from minilab.kvcache import KVCache
from minilab.model import ModelConfig, build_model

SMALL = dict(vocab_size=211, n_layer=2, n_head=4, d_model=64, intermediate_size=96, max_seq_len=64)


def test_presets_are_the_specified_shapes():
    assert set(preset_names()) >= {"micro", "tiny", "small", "base"}
    expect = {"tiny": (6, 256, 4, 32768), "small": (12, 512, 8, None), "base": (24, 768, 12, None)}
    for name, (n_layer, d_model, n_head, vocab) in expect.items():
        cfg = load_architecture(name)
        assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim) == (n_layer, d_model, n_head, 64)
        if vocab:
            assert cfg.vocab_size == vocab


@pytest.mark.parametrize("name", ["micro", "tiny", "small", "base"])
def test_meta_param_count_equals_real_model(name):
    cfg = load_architecture(name)
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = build_model(cfg)
    unique = {id(p): p.numel() for p in real.parameters()}
    assert meta.num_params() == sum(unique.values()) == sum(p.numel() for p in real.parameters())
    assert sum(meta.param_groups().values()) == meta.num_params()


def test_meta_build_draws_nothing_and_imports_no_dynamo():
    """A `meta` build (the planner's) skips random init: torch runs init on meta through Python
    decompositions whose first call imports torch._dynamo, two seconds of `minilab plan`."""
    import subprocess
    import sys

    code = ("import sys; from minilab.arch import load_architecture; from minilab.model import build_model; "
            "m = build_model(load_architecture('tiny', qk_norm=True), 'meta'); "
            "assert all(p.is_meta for p in m.parameters()) and m.inv_freq.is_meta; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_micro_is_a_few_million_params():
    n = build_model(load_architecture("micro"), device="meta").num_params()
    assert 1_000_000 < n < 5_000_000


def test_tied_head_counted_once_and_untied_twice():
    tied = build_model(ModelConfig(**SMALL, tie_embeddings=True), "meta")
    untied = build_model(ModelConfig(**SMALL, tie_embeddings=False), "meta")
    assert tied.param_groups()["head"] == 0
    assert untied.num_params() - tied.num_params() == SMALL["vocab_size"] * SMALL["d_model"]


def test_costs_by_hand():
    cfg = ModelConfig(**SMALL, n_kv_head=2)
    m = build_model(cfg, "meta")
    hd = 16
    attn = 2 * (64 * 4 * hd + 2 * 64 * 2 * hd + 4 * hd * 64)
    mlp = 2 * 3 * 64 * 96
    assert m.param_groups() == {"embeddings": 211 * 64, "attention": attn, "mlp": mlp,
                                "norms": 2 * 2 * 64 + 64, "head": 0}
    # KV cache: 2 (K,V) * layers * kv heads * head_dim * bytes
    assert m.kv_cache_bytes_per_token(torch.bfloat16) == 2 * 2 * 2 * hd * 2
    assert m.kv_cache_bytes_per_token(torch.float32) == 2 * 2 * 2 * hd * 4
    fwd = 2 * (attn + mlp + 211 * 64) + 4 * 2 * 32 * 4 * hd
    assert m.flops_per_token(32, training=False) == fwd
    assert m.flops_per_token(32, training=True) == 3 * fwd


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    torch.manual_seed(0)
    m = build_model(ModelConfig(**SMALL, n_kv_head=n_kv_head)).eval()
    x = torch.randint(0, 211, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.config, batch_size=2)
        parts = [m(x[:, :9], kv_cache=cache), m(x[:, 9:17], kv_cache=cache)]
        parts += [m(x[:, i:i + 1], kv_cache=cache) for i in range(17, 24)]
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_qk_norm_adds_two_head_dim_norms_per_layer_and_no_matmul_flops():
    plain, qk = (build_model(ModelConfig(**SMALL, n_kv_head=2, qk_norm=on), "meta") for on in (False, True))
    extra = {k: qk.param_groups()[k] - plain.param_groups()[k] for k in plain.param_groups()}
    assert extra == {"embeddings": 0, "attention": 0, "mlp": 0, "norms": SMALL["n_layer"] * 2 * 16, "head": 0}
    assert qk.flops_per_token(32) == plain.flops_per_token(32)
    real = build_model(ModelConfig(**SMALL, qk_norm=True))
    assert torch.equal(real.model.layers[1].self_attn.k_norm.weight, torch.ones(16))  # norms start at one


def test_kv_cache_overflow_is_an_error():
    m = build_model(ModelConfig(**SMALL)).eval()
    cache = KVCache(m.config, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="KV cache full"):
        m(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = build_model(ModelConfig(**SMALL)).eval()
    x = torch.randint(0, 211, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 211
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :10], m(y)[:, :10])


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = build_model(ModelConfig(**SMALL))
    b = build_model(ModelConfig(**SMALL, gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 211, (2, 16))
    for m in (a, b):
        m.train()
        m.loss(x[:, :-1], x[:, 1:]).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    m = build_model(ModelConfig(**SMALL))
    x = torch.randint(0, 211, (4, 32))
    loss = m.loss(x[:, :-1], x[:, 1:]).item()
    assert abs(loss - torch.log(torch.tensor(211.0)).item()) < 0.1


def test_invalid_architecture_is_a_config_error():
    from minilab.errors import ConfigError
    with pytest.raises(ConfigError, match="n_kv_head"):
        load_architecture("micro", ["n_kv_head=3"])
    with pytest.raises(ConfigError, match="unknown architecture preset 'nope'"):
        load_architecture("nope")


def test_format_params():
    assert [format_params(n) for n in (1_812_352, 23_000_000, 124_439_808, 1_100_048_384, 950)] == \
        ["1.8M", "23M", "124M", "1.1B", "950"]


@pytest.fixture
def bf16_matmul():
    """Set minilab.bf16.BF16_MATMUL for one test."""
    import minilab.bf16 as M

    old = M.BF16_MATMUL
    yield lambda mode: setattr(M, "BF16_MATMUL", mode)
    M.BF16_MATMUL = old


def test_emulated_bf16_linear_is_a_bf16_gemm(bf16_matmul):
    """On CPUs without a bf16 GEMM the model multiplies bf16 operands with fp32 kernels: the result
    is torch's bf16 GEMM (fp32 accumulation) up to one bf16 rounding, gradients included."""
    from minilab.bf16 import _BF16Linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    up = torch.randn(3, 17, 48, generator=g).bfloat16()
    out = _BF16Linear.apply(x, w)
    out.backward(up)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x2, w2)
    ref.backward(up)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert x.grad.dtype == w.grad.dtype == torch.float32
    for a, b in ((out, ref), (x.grad, x2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-3)


def test_bf16_training_step_emulated_equals_native(bf16_matmul):
    from minilab.training import accumulate_gradients

    torch.manual_seed(0)
    m = build_model(ModelConfig(**SMALL, n_kv_head=2))
    x, y = torch.randint(0, 211, (2, 32)), torch.randint(0, 211, (2, 32))
    results = {}
    for mode in ("native", "emulate", "fp32"):
        bf16_matmul(mode)
        m.zero_grad()
        loss, _ = accumulate_gradients(m, [(x, y)], "fp32" if mode == "fp32" else "bf16", torch.device("cpu"))
        results[mode] = loss, [p.grad.clone() for p in m.parameters()]
    (l_nat, g_nat), (l_emu, g_emu), (l_32, g_32) = results["native"], results["emulate"], results["fp32"]
    assert l_emu == pytest.approx(l_nat, rel=1e-3) and l_emu == pytest.approx(l_32, rel=1e-2)
    for a, b, c in zip(g_nat, g_emu, g_32, strict=True):
        # the two bf16 paths differ by rounding noise, less than either differs from fp32 (x 2)
        assert (a - b).norm() <= 2 * (a - c).norm() + 1e-6 and (a - b).norm() <= 0.05 * c.norm()


@pytest.mark.parametrize("arch", [dict(n_kv_head=4), dict(n_kv_head=1), dict(n_kv_head=2, qk_norm=True)],
                         ids=["mha", "mqa", "gqa-qk-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_forward_is_bitwise_the_module_forward(arch, dtype):
    """The lean inference forward that generation uses computes exactly the module forward's
    logits: prefill, chunks, single tokens, a left-padded batch, both weight layouts."""
    from minilab.cached_forward import CachedForward

    torch.manual_seed(0)
    m = build_model(ModelConfig(**SMALL, **arch)).eval()
    with torch.no_grad():  # norms away from their all-ones init, which would hide a missing or swapped one
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.3)
    m = m.to(dtype)
    x = torch.randint(0, 211, (3, 20))
    for layout in (False, True):
        if layout:
            use_decode_layout(m)
            # fp32 weights only: torch's bf16 CPU kernel is slower in the transposed layout
            assert m.model.layers[0].self_attn.q_proj.weight.is_contiguous() == (dtype is torch.bfloat16)
        fast = CachedForward.of(m)
        # q|k|v and gate|up as one product each: fp32 in the decode layout (their weights joined)
        joined = layout and dtype is torch.float32
        assert all(isinstance(w, torch.Tensor) == joined for layer in fast.layers for w in (layer[1], layer[4]))
        for pad in (None, [0, 5, 11]):
            a, b = (KVCache(m.config, 3, 32, dtype, pad=pad) for _ in range(2))
            with torch.inference_mode():
                for i, j in ((0, 12), (12, 13), (13, 16), (16, 17)):
                    assert torch.equal(m(x[:, i:j], kv_cache=a), fast(x[:, i:j], b))
                    assert a.pos == b.pos == j
                assert torch.equal(m(x[:, 17:20], kv_cache=a, logits_to_keep=1), fast(x[:, 17:20], b, logits_to_keep=1))


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_split_mm_is_the_product_bit_for_bit(monkeypatch, threads):
    """`split_mm` (decoding's products, split over threads) gives torch.mm's values exactly: 1 to 20
    rows, both weight layouts, random shapes; split wherever its check found the blocks' product
    exact (always at one row), not split: small weights, more than 16 rows, widths the aligned
    blocks do not divide (then fewer parts), one thread."""
    import random

    import minilab.cached_forward as cf

    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(a[1].shape[0]) or bmm(*a, **k))
    monkeypatch.setattr(cf, "SPLIT_ELEMENTS", 1000)
    monkeypatch.setattr(cf, "_EXACT_SPLITS", {})
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(60):
        K, N, M = rng.randint(8, 600), 16 * rng.randint(1, 100), rng.randint(1, 20)
        w = torch.randn(N, K)
        parts = 1 if M > 16 else min(threads, K * N // 1000)
        while parts > 1 and N % (16 * parts):
            parts -= 1
        for layout in (w.t().contiguous(), w.t()):              # (in, out) stored, and a transposed view
            x = torch.randn(M, K)
            cf.split_mm(x, layout, threads)                       # the first call checks the split once
            calls.clear()
            assert torch.equal(cf.split_mm(x, layout, threads), torch.mm(x, layout)), (K, N, M)
            exact = parts > 1 and cf._EXACT_SPLITS[cf.split_key(M, layout, parts)]
            assert calls == ([parts] if exact else []), (K, N, M, calls)
            assert M > 1 or parts == 1 or exact
    x, w = torch.randn(1, 64), torch.randn(64, 512)
    calls.clear()
    assert torch.equal(cf.split_mm(x, w, 1), torch.mm(x, w)) and calls == []    # one thread


def test_split_mm_stays_whole_where_the_blocks_would_sum_differently(monkeypatch):
    """Where the split product's values would differ from torch.mm's in a single bit (here made to),
    its check keeps the product whole, once for that shape."""
    import minilab.cached_forward as cf

    monkeypatch.setattr(cf, "_EXACT_SPLITS", {})
    real = cf._split_bmm

    def one_bit_off(x, w, parts):
        out = real(x, w, parts)
        out.view(-1)[5] = torch.nextafter(out.view(-1)[5], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(cf, "_split_bmm", one_bit_off)
    x, w = torch.randn(8, 512), torch.randn(512, 2048)
    assert cf.split_parts(8, w, 2) == 1 and torch.equal(cf.split_mm(x, w, 2), torch.mm(x, w))
    assert list(cf._EXACT_SPLITS.values()) == [False]
    monkeypatch.setattr(cf, "_split_bmm", real)
    assert cf.split_parts(8, w, 2) == 1                       # remembered for the shape
    assert cf.split_parts(1, w, 2) == 2                       # another shape is checked on its own


def test_cached_forward_with_split_products_is_bitwise(monkeypatch):
    """With its products split over two threads (as for a large model), the lean forward still
    computes the module forward's logits exactly: prefill, then one token at a time, of one row,
    three and eight."""
    import minilab.cached_forward as cf

    monkeypatch.setattr(cf, "SPLIT_ELEMENTS", 64)
    split = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: split.append(a[1].shape) or bmm(*a, **k))
    torch.manual_seed(0)
    m = use_decode_layout(build_model(ModelConfig(**SMALL)).eval())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (1, 3, 8):
            x = torch.randint(0, 211, (rows, 12))
            a, b = KVCache(m.config, rows, 32), KVCache(m.config, rows, 32)
            fast = cf.CachedForward.of(m)
            with torch.inference_mode():
                for i, j in ((0, 8), (8, 9), (9, 10), (10, 11)):
                    split.clear()
                    assert torch.equal(m(x[:, i:j], kv_cache=a), fast(x[:, i:j], b))
                    if j - i == 1:  # decoding steps: every product split (4 a layer), or kept whole where not exact
                        assert all(shape[0] == 2 for shape in split) and (rows != 1 or len(split) >= 4 * 2)
            assert fast.threads == 2
    finally:
        torch.set_num_threads(threads)


def test_cached_forward_only_for_plain_models():
    from minilab.cached_forward import CachedForward

    m = build_model(ModelConfig(**SMALL)).eval()
    fast = CachedForward.of(m)
    with pytest.raises(RuntimeError, match="inference"):
        fast(torch.zeros(1, 2, dtype=torch.long), KVCache(m.config, 1))
    m.model.layers[1].mlp.up_proj = torch.nn.Sequential(m.model.layers[1].mlp.up_proj)  # a wrapped layer
    assert CachedForward.of(m) is None


def test_decode_layout_keeps_values_and_export(tmp_path):
    from minilab.hf import load_hf_dir, save_hf_dir

    torch.manual_seed(0)
    m = build_model(ModelConfig(**SMALL)).eval()
    x = torch.randint(0, 211, (2, 16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(x)
        use_decode_layout(m)
        torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    block = m.model.layers[0]  # widening weights (in <= out) transposed; the narrowing down projection not
    assert block.mlp.up_proj.weight.stride(0) == 1 and block.self_attn.o_proj.weight.t().is_contiguous()
    assert block.mlp.down_proj.weight.is_contiguous()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    save_hf_dir(m, tmp_path / "hf")
    back = load_hf_dir(tmp_path / "hf")
    assert all(torch.equal(before[k], v) for k, v in back.state_dict().items())
