"""The screened head: greedy tokens from an int8 copy of the head equal the full fp32 product's argmax
(ties, near-ties, zero, huge, tiny and NaN states), its bound holds, and it actually screens."""

import pytest
import torch

from minilab.screened_head import ScreenedHead, screen_available, screened_head_bytes

pytestmark = pytest.mark.skipif(not screen_available(), reason="this torch has no int8 weight kernel")


def _head(vocab: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(width, vocab, generator=g) * 0.02                              # (width, vocab)


def _states(n: int, width: int, seed: int) -> torch.Tensor:
    """Final-normed hidden states, as the decoding step gives the head: norm about sqrt(width)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True)) * (1 + 0.3 * torch.rand(width, generator=g))


def test_argmax_equals_the_full_product_with_ties_and_odd_states():
    head = _head(3000, 64, 0)
    head[:, 700] = head[:, 20]                                  # an exact tie: the lower id wins, as argmax
    head[:, 1500] = head[:, 40] * (1 + 1e-6)                    # near-ties: several candidates, decided in fp32
    head[:, 2999] = head[:, 40] * (1 - 1e-6)
    screen = ScreenedHead(head)
    h = _states(200, 64, 1)
    h[:40] = head[:, [20, 40] * 20].t() * 50                   # states pointing at the tied columns
    h[40] = 0
    h[41] *= 1e4
    h[42] *= 1e-4
    h[43, 5] = float("nan")
    h[44, 7] = float("inf")
    want = (h @ head).argmax(-1).tolist()
    assert screen.argmax(h) == want
    assert want[:2] == [20, 1500]  # the tie to the lower id; the near-tie to the larger fp32 logit
    # 3000 ids: padded to whole blocks, whose padding no row picks, and which the planner counts
    assert screen.q.shape[0] == 3072 and max(want) < 3000
    assert sum(t.numel() * t.element_size() for t in (screen.q, screen.scale, screen.rho)) == \
        screened_head_bytes(3000, 64)
    assert [screen.argmax(h[i:i + 1])[0] for i in range(len(h))] == want             # one row at a time too


def test_bound_holds_and_screens():
    """Every row's true maximum is among its candidates, and they are a handful even for random
    Gaussian logits (the hard case: a trained model's are more peaked; the demo's pretrained model
    leaves 1.9 on average): the screen reads a few fp32 columns, not the head."""
    head = _head(8192, 128, 2)
    screen = ScreenedHead(head)
    h = _states(300, 128, 3)
    exact = h.double() @ head.double()
    # the bound holds for every logit, on this CPU's int8 kernel (it assumes fp32 accumulation and
    # int8 x bf16-scale weights, exact in fp32: a torch whose kernel differs fails here)
    approx, bound = screen.bounds(h)
    error = (approx.double() - exact).abs()
    assert (error <= bound).all() and error.max() > 0  # and the int8 copy is not the head itself
    candidates = screen.candidates(h)
    assert all(int(best) in ids for best, ids in zip(exact.argmax(dim=1), candidates, strict=True))
    counts = torch.tensor([len(ids) for ids in candidates])
    assert counts.float().mean() < 4 and counts.max() < 8192 // 100 and (counts == 1).any()


def test_decode_layout_sets_the_screen_for_large_heads_only_and_a_changed_head_drops_it():
    from minilab.cached_forward import CachedForward
    from minilab.decode_layout import use_decode_layout
    from minilab.model import ModelConfig, build_model

    cfg = dict(n_layer=1, n_head=2, d_model=64, intermediate_size=128, max_seq_len=32, tie_embeddings=True)
    small = use_decode_layout(build_model(ModelConfig(vocab_size=512, **cfg)).eval())
    assert small.decode_screen is None and CachedForward.of(small).screen is None
    forced = use_decode_layout(build_model(ModelConfig(vocab_size=512, **cfg)).eval(), screen=True)
    assert CachedForward.of(forced).screen is forced.decode_screen is not None
    large = use_decode_layout(build_model(ModelConfig(vocab_size=65536, **cfg)).eval())  # 4 Mi elements
    screen = large.decode_screen
    assert screen is not None and screen.q.shape == (65536, 64)
    held = sum(t.numel() * t.element_size() for t in (screen.q, screen.scale, screen.rho))
    assert held == screened_head_bytes(65536, 64)  # what the planner counts
    assert (screen.min_rows, forced.decode_screen.min_rows) == (1, 1)  # 4 Mi elements pay from one row
    assert use_decode_layout(build_model(ModelConfig(vocab_size=65536, **cfg)).eval().to(torch.bfloat16)
                             ).decode_screen is None
    with torch.no_grad():
        forced.lm_head.weight.mul_(2)  # e.g. training went on: the int8 copy is stale
    assert CachedForward.of(forced).screen is None
    from minilab.quantization import quantize_model  # int8 blocks, fp32 head: decoded by the module, no copy

    quantized = quantize_model(build_model(ModelConfig(vocab_size=65536, **cfg)).eval(), "int8")
    assert use_decode_layout(quantized).decode_screen is None


def test_a_mid_sized_head_is_screened_from_enough_rows_only(monkeypatch):
    """A head of 8192 x 64 (0.5 Mi elements, as `micro`'s stays in cache) gets a screen that greedy
    steps read from 8 rows on, not at one (slower there): same tokens either way."""
    from minilab.decode_layout import use_decode_layout
    from minilab.generate import generate
    from minilab.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=8192, n_layer=1, n_head=2, d_model=64, intermediate_size=128,
                                    max_seq_len=64, tie_embeddings=True)).eval()
    plain = use_decode_layout(build_model(model.config).eval(), screen=False)
    plain.load_state_dict(model.state_dict())
    model = use_decode_layout(model)
    assert model.decode_screen is not None and model.decode_screen.min_rows == 8
    rows = []
    argmax = ScreenedHead.argmax
    monkeypatch.setattr(ScreenedHead, "argmax", lambda self, h: rows.append(len(h)) or argmax(self, h))
    prompts = [[5 + i, 9, 11 + 3 * i][: 1 + i % 3] for i in range(8)]
    one = generate(model, prompts[:1], max_new_tokens=6)
    assert rows == [] and one == generate(plain, prompts[:1], max_new_tokens=6)
    batch = generate(model, prompts, max_new_tokens=6, batch_size=8)
    assert rows and set(rows) == {8} and batch == generate(plain, prompts, max_new_tokens=6, batch_size=8)


@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed", "sparse", "rows-1e-3-to-1e3"])
def test_bound_holds_on_hostile_heads_and_states(kind):
    """Heads whose rows have outliers, zeros or scales six decades apart, and states from 1e-4 to 1e4
    with an outlier element: every error within its bound, every argmax the full product's."""
    g = torch.Generator().manual_seed(5)
    width, vocab = 96, 1500
    head = torch.randn(width, vocab, generator=g)
    if kind == "heavy-tailed":
        head = head / torch.rand(width, vocab, generator=g).clamp_min(1e-3)   # a 1/uniform tail
    elif kind == "sparse":
        head = head * (torch.rand(vocab, generator=g) < 0.1)                  # 90% of the rows all zero
    elif kind == "rows-1e-3-to-1e3":
        head = head * torch.logspace(-3, 3, vocab)[torch.randperm(vocab, generator=g)]
    screen = ScreenedHead(head.contiguous())
    h = torch.randn(48, width, generator=g) * torch.logspace(-4, 4, 48)[:, None]
    h[::5, 0] *= 1e3
    # and states along a row's quantisation error, where Cauchy-Schwarz is tight: the bound is then
    # more than half used (the bf16 terms, separate worst cases, take the rest), so a bound half as
    # large as this one fails here
    rows = head.abs().sum(0).topk(8).indices
    h[-8:] = (head[:, rows] - screen.q[rows].float().t() * screen.scale[rows].float()).t() * 1e3
    approx, bound = screen.bounds(h)
    error = (approx.double() - h.double() @ head.double()).abs()
    assert (error <= bound).all()
    assert (error / bound)[-8:].gather(1, rows[:, None]).max() > 0.5
    assert screen.argmax(h) == (h @ head).argmax(-1).tolist()


def test_candidates_are_exactly_the_ids_whose_interval_reaches_the_best():
    """`candidates` (a threshold on the approximate logits, then each survivor's own interval) gives
    the ids whose interval [a - b, a + b] from `bounds` reaches the row's best lower end: none missed
    (that would make the token wrong), none extra beyond float slack. Near-copies of one column at
    distances from within to several times the bound put ids on both sides of every cut."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(64, generator=g) * 0.02
    spread = torch.logspace(-2.5, -0.5, 3000)                             # how far each column is from base
    head = base[:, None] + torch.randn(64, 3000, generator=g) * spread * 0.02
    head[:, ::7] = torch.randn(64, len(range(0, 3000, 7)), generator=g) * 0.02   # and unrelated columns
    screen = ScreenedHead(head)
    h = base[None] / base.norm() * torch.linspace(2, 12, 40)[:, None] + torch.randn(40, 64, generator=g) * 0.05
    a, b = screen.bounds(h)
    reach = (a + b * (1 + 1e-5)) >= (a - b * (1 + 1e-5)).amax(dim=1, keepdim=True)
    strict = (a + b * (1 - 1e-5)) >= (a - b * (1 - 1e-5)).amax(dim=1, keepdim=True)
    sizes = []
    for i, ids in enumerate(screen.candidates(h)):
        got = set(ids)
        assert set(strict[i].nonzero().squeeze(1).tolist()) <= got <= set(reach[i].nonzero().squeeze(1).tolist())
        sizes.append(len(got))
    assert max(sizes) > 10 and min(sizes) >= 1                             # the cuts were exercised


@pytest.mark.parametrize("screen_faster", [True, False])
def test_each_row_count_takes_the_screen_or_the_fp32_head_whichever_ran_faster(monkeypatch, screen_faster):
    """The first TRIALS steps of a row count take the screen and the fp32 head in turn, timed; then the
    faster serves every later step of that count (here made so by a clock each side advances by its
    own amount). The tokens are the full product's either way; a forced screen (`always`) is not timed."""
    import minilab.screened_head as sh

    now = [0.0]
    monkeypatch.setattr(sh.time, "perf_counter", lambda: now[0])
    head = _head(4096, 64, 6)
    screen = ScreenedHead(head)
    calls = []
    argmax = ScreenedHead.argmax

    def screened(self, h):
        calls.append(("screen", len(h)))
        now[0] += 1.0 if screen_faster else 3.0
        return argmax(self, h)
    monkeypatch.setattr(ScreenedHead, "argmax", screened)
    h = _states(8, 64, 7)
    want = (h @ head).argmax(-1).tolist()

    def full():
        calls.append(("full", len(h)))
        now[0] += 2.0
        return (h @ head).argmax(-1).tolist()
    for _ in range(2 * sh.TRIALS + 3):
        assert screen.tokens(h, full) == want
    assert calls[:4] == [("screen", 8), ("full", 8)] * 2                         # in turn
    assert sorted(calls[:2 * sh.TRIALS]) == sorted([("screen", 8), ("full", 8)] * sh.TRIALS)
    assert screen.pays == {8: screen_faster}
    assert calls[2 * sh.TRIALS:] == [("screen" if screen_faster else "full", 8)] * 3
    calls.clear()
    forced = ScreenedHead(head, always=True)
    assert forced.tokens(h, full) == want and calls == [("screen", 8)] and forced.pays == {}
