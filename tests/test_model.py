"""The model itself: presets, true parameter counts, costs, KV-cache decoding, checkpointing."""

import pytest
import torch

from minilab.arch import load_architecture, preset_names
from minilab.model import KVCache, ModelConfig, build_model, format_params

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
