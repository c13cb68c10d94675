"""Generation: KV-cache decoding equals full recomputation, seeds reproduce, stop tokens stop,
top-k=1 is greedy, the CTRL repetition penalty, max_seq_len, and parity with transformers."""

import pytest
import torch

from minilab.generate import generate, generate_text
from minilab.model import ModelConfig, build_model
from minilab.sampling import apply_repetition_penalty, top_k_filter, top_p_filter

VOCAB = 64
PROMPTS = [[5, 9, 2, 40, 7], [11], [3, 3, 60, 1, 2, 8, 30, 31, 17]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, intermediate_size=64,
                                max_seq_len=64, tie_embeddings=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger random weights: peaked, varied logits (the init is near-uniform)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


@torch.no_grad()
def _greedy_reference(model, prompt, n):
    """Argmax of a full forward over the whole sequence at every step: no cache involved."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_with_cache_equals_full_recompute(model):
    out = generate(model, PROMPTS, max_new_tokens=12)
    assert out == [_greedy_reference(model, p, 12) for p in PROMPTS]
    assert out == generate(model, PROMPTS, max_new_tokens=12, kv_cache=False)
    assert len({tuple(o) for o in out}) > 1  # the prompts really lead to different continuations


def test_tensor_input_and_batch_independence(model):
    batch = generate(model, torch.tensor([PROMPTS[0], PROMPTS[0]]), max_new_tokens=6)
    alone = generate(model, [PROMPTS[0]], max_new_tokens=6)
    assert batch == alone * 2


def test_seed_reproducible_and_global_rng_untouched(model):
    kw = dict(max_new_tokens=20, temperature=1.5, seed=7)
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, **kw)
    assert torch.equal(state, torch.get_rng_state())
    assert a == generate(model, PROMPTS, **kw)
    assert a != generate(model, PROMPTS, **{**kw, "seed": 8})


def test_stop_token_ends_generation_and_is_excluded(model):
    free = generate(model, [PROMPTS[0]], max_new_tokens=12)[0]
    stop = free[4]
    cut = generate(model, [PROMPTS[0]], max_new_tokens=12, stop_token_ids=[stop, 999])[0]
    assert cut == free[:free.index(stop)]
    assert stop not in cut


def test_top_k_one_is_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=3) == greedy


def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    # seen positive logits divided, seen negative ones multiplied, unseen unchanged
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0, 0.5]  # input not modified
    assert torch.equal(apply_repetition_penalty(logits, [0], 1.0), logits)


def test_repetition_penalty_changes_greedy_choice(model):
    plain = generate(model, [PROMPTS[2]], max_new_tokens=16)[0]
    penalised = generate(model, [PROMPTS[2]], max_new_tokens=16, repetition_penalty=50.0)[0]
    assert penalised != plain
    # With a huge penalty every seen token is pushed down hard: no token repeats in the output.
    assert len(set(penalised)) == len(penalised)


def test_repetition_penalty_spares_stop_tokens(model):
    """A chat prompt holds an end-of-turn token after every earlier turn: the penalty must not push
    it down, or a small model runs past the end of its answer."""
    from minilab.sampling import Sampler

    logits = torch.tensor([[1.0, 1.2, 0.0]])  # id 1 (the stop token) narrowly ahead of id 0
    pick = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.5, generator=None)
    assert Sampler([[1, 2]], **pick)(logits) == [0]  # penalised: 1.2 / 1.5 < 1.0
    assert Sampler([[1, 2]], exempt=[1], **pick)(logits) == [1]
    # both decoders hand their stop ids to the sampler
    from minilab.generate import ContinuousBatch

    row, _ = ContinuousBatch(model, [5, 7]).add(PROMPTS[2], 4, repetition_penalty=1.3)
    assert row.sampler.exempt == [5, 7]


def test_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert torch.isinf(top_p_filter(logits, 0.6)).tolist() == [False, False, True]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [False, True, True]
    assert torch.isinf(top_p_filter(logits, 1.0)).tolist() == [False, False, False]
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [False, False, True]


def test_respects_max_seq_len(model):
    prompt = list(range(60))
    assert len(generate(model, [prompt], max_new_tokens=20)[0]) == 4  # 60 + 4 = max_seq_len 64
    with pytest.raises(Exception, match="no room"):
        generate(model, [list(range(64))], max_new_tokens=1)


def test_generate_text_with_tokenizers_tokenizer(model):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = generate_text(model, tok, "w3 w7 w9", max_new_tokens=8)
    ids = generate(model, [[5, 9, 11]], max_new_tokens=8, stop_token_ids=[0])[0]
    assert text == tok.decode(ids)


def test_greedy_matches_transformers_generate(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from minilab.hf import save_hf_dir

    save_hf_dir(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
        assert generate(model, [prompt], max_new_tokens=10)[0] == out[0, len(prompt):].tolist()


def test_batched_greedy_equals_one_by_one(model):
    """Prompts of different lengths decoded together (left padding, per-row positions, masked pad
    slots) give exactly the tokens each prompt gets alone; rows stop independently."""
    prompts = PROMPTS + [[7, 7], list(range(1, 30))]
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert generate(model, prompts, max_new_tokens=12) == alone
    assert generate(model, prompts, max_new_tokens=12, batch_size=2) == alone
    stop = alone[0][3]
    assert generate(model, prompts, max_new_tokens=12, stop_token_ids=[stop]) == \
        [a[:a.index(stop)] if stop in a else a for a in alone]
    penalised = [generate(model, [p], max_new_tokens=12, repetition_penalty=3.0)[0] for p in prompts]
    assert generate(model, prompts, max_new_tokens=12, repetition_penalty=3.0) == penalised
    # a row near max_seq_len gets a smaller budget than the others and leaves the batch early
    long = list(range(1, 61))
    out = generate(model, [PROMPTS[1], long], max_new_tokens=12)
    assert out == [alone[1], generate(model, [long], max_new_tokens=12)[0]] and len(out[1]) == 4


def test_batched_sampling_reproducible_and_single_prompt_unchanged(model):
    from minilab.generate import stream_generate

    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert generate(model, PROMPTS, **kw) == generate(model, PROMPTS, **kw)
    assert generate(model, [PROMPTS[2]], **kw)[0] == list(stream_generate(model, PROMPTS[2], **kw))


def test_generate_texts_stop_strings_end_rows_independently(model):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from minilab.generate import generate_texts

    words = ["</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    prompts = ["w3 w7 w9", "w1", "w20 w21 w22 w23 w24"]
    full = generate_texts(model, tok, prompts, max_new_tokens=10, stop_token_ids=[])
    assert full == [tok.decode(ids) for ids in generate(model, [tok.encode(p).ids for p in prompts],
                                                          max_new_tokens=10)]
    cut_at = full[0].split()[2]
    stopped = generate_texts(model, tok, prompts, max_new_tokens=10, stop_token_ids=[], stop=[cut_at])
    assert stopped == [f[:f.index(cut_at)] if cut_at in f else f for f in full]


def test_continuous_batch_rows_join_and_leave_with_their_own_tokens(model):
    """Rows that join a running batch at different steps (shorter and longer prompts than the
    batch's, so both alignments are exercised) and leave at their own budgets or stop tokens get
    exactly the tokens of decoding them alone: greedy ones, and seeded sampled ones."""
    from minilab.generate import ContinuousBatch

    torch.manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in (5, 2, 11, 7, 3)]
    budgets = [12, 4, 9, 15, 6]
    sampled = {3: dict(temperature=0.9, top_k=20, seed=7), 4: dict(temperature=1.2, top_p=0.9, seed=11)}
    alone = [generate(model, [p], max_new_tokens=b, **sampled.get(i, {}))[0]
             for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))]
    joins = {0: [0], 1: [1, 2], 3: [3], 4: [4]}  # step -> rows added before it
    batch, got, rows = ContinuousBatch(model), {i: [] for i in range(5)}, {}
    for step in range(40):
        for i in joins.get(step, []):
            row, tok = batch.add(prompts[i], budgets[i], **sampled.get(i, {}))
            rows[id(row)] = i
            if tok is not None:
                got[i].append(tok)
        for row, tok in batch.step():
            if tok is not None:
                got[rows[id(row)]].append(tok)
        if step > 4 and not len(batch):
            break
    assert got == {i: a for i, a in enumerate(alone)}
    assert not len(batch) and batch.cache is None  # everyone left; nothing held
    # A stop token ends a row without being yielded; a dropped row leaves at once.
    stop_at = alone[0][3]
    batch = ContinuousBatch(model, stop_token_ids=[stop_at])
    row, first = batch.add(prompts[0], budgets[0])
    toks = [first]
    while len(batch):
        toks += [t for _, t in batch.step()]
    assert toks[-1] is None and toks[:-1] == alone[0][:alone[0].index(stop_at)] and row.done == "stop"
    batch = ContinuousBatch(model)
    a, _ = batch.add(prompts[2], 9)
    b, _ = batch.add(prompts[3], 9)
    batch.step()
    batch.drop(a)
    assert [r for r, _ in batch.step()] == [b] and a.done == "dropped"


def test_screened_head_gives_the_same_tokens_and_sampling_is_untouched(model, monkeypatch):
    """With the int8-screened head (`use_decode_layout(screen=True)`), greedy decoding (one prompt,
    a batch, continuous batching next to sampled rows) gives exactly the tokens of the fp32 head, the
    screen deciding every greedy step; sampled and penalised rows read the full logits as before."""
    import copy

    from minilab.decode_layout import use_decode_layout
    from minilab.generate import ContinuousBatch
    from minilab.screened_head import ScreenedHead, screen_available

    if not screen_available():
        pytest.skip("this torch has no int8 weight kernel")
    screened = use_decode_layout(copy.deepcopy(model), screen=True)
    calls = []
    real = ScreenedHead.argmax
    monkeypatch.setattr(ScreenedHead, "argmax", lambda self, h: calls.append(len(h)) or real(self, h))
    prompts = PROMPTS + [[7, 7], list(range(1, 30))]
    assert generate(screened, prompts, max_new_tokens=12) == generate(model, prompts, max_new_tokens=12)
    assert calls and max(calls) == len(prompts)  # the batch's steps went through the screen
    n = len(calls)
    assert generate(screened, [prompts[0]], max_new_tokens=12) == generate(model, [prompts[0]], max_new_tokens=12)
    sampled = dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5)
    assert generate(screened, prompts, **sampled) == generate(model, prompts, **sampled)
    assert generate(screened, prompts, max_new_tokens=10, repetition_penalty=1.3) == \
        generate(model, prompts, max_new_tokens=10, repetition_penalty=1.3)
    assert len(calls) == n + 12  # only the greedy, unpenalised run used it
    # continuous batching: a greedy and a sampled row share steps; each gets its tokens alone
    got = {}
    for m in (model, screened):
        batch, toks = ContinuousBatch(m), {0: [], 1: []}
        rows = {id(batch.add(prompts[0], 8)[0]): 0, id(batch.add(prompts[2], 8, temperature=0.8, seed=1)[0]): 1}
        while len(batch):
            for row, tok in batch.step():
                toks[rows[id(row)]].append(tok)
        got[m is screened] = toks
    assert got[True] == got[False]


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch's own thread pool keeps its size")
def test_decoding_steps_take_threads_by_their_work(model, monkeypatch):
    """Each decoding step (prefill, batched step, continuous batching's) runs on one torch thread per
    `STEP_WORK_PER_THREAD` of its parameters x tokens, at most torch's count, which is set back after
    every step, also when a step raises."""
    import weakref

    import minilab.decode_threads as dt
    import minilab.generate as g

    params = dt.model_params(model)
    monkeypatch.setattr(dt, "STEP_WORK_PER_THREAD", params)  # one thread per token of a step, here
    monkeypatch.setattr(dt, "CHECK_EVERY", 10**9)             # no checks against the machine
    monkeypatch.setattr(dt, "_BY_MODEL", weakref.WeakKeyDictionary())
    seen = []
    real = g._next_scores

    def recording(m, fast, ids, cache, keep_last=True):
        seen.append((ids.numel(), torch.get_num_threads()))
        return real(m, fast, ids, cache, keep_last)

    monkeypatch.setattr(g, "_next_scores", recording)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        generate(model, PROMPTS, max_new_tokens=6, batch_size=3)  # prefill 3 x 9 tokens, steps of 3 rows
        generate(model, [PROMPTS[1]], max_new_tokens=6)           # prefill 1 token, steps of 1 row
        batch = g.ContinuousBatch(model)
        batch.add(PROMPTS[0], 4)
        batch.step()
        batch.add(PROMPTS[1], 4)
        batch.step()
        assert torch.get_num_threads() == 2
        assert {n for n, _ in seen} >= {27, 3, 1, 5, 2}
        assert all(threads == min(2, n) for n, threads in seen), seen
        assert dt.step_threads_for(model) is batch.threads   # one per model, kept across decoders
        with pytest.raises(RuntimeError), dt.step_threads_for(model)(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch's own thread pool keeps its size")
def test_step_threads_follow_what_the_machine_gives(monkeypatch):
    """On a busy machine (here a clock on which one-thread steps take a third of the time), the
    next check moves the steps to one thread, and a check on several threads moves them back once
    that is faster again; a check barely faster (within the margin) changes nothing."""
    from types import SimpleNamespace

    import minilab.decode_threads as dt

    clock = [0.0]
    monkeypatch.setattr(dt, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(dt, "CHECK_EVERY", 4)
    threads = dt.StepThreads(params=2 * dt.STEP_WORK_PER_THREAD)  # a one-token step: two threads
    seen, cost = [], {}

    def steps(n):
        for _ in range(n):
            with threads(1):
                k = torch.get_num_threads()
                seen.append(k)
                clock[0] += cost[k]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cost.update({1: 1.0, 2: 3.0})       # busy
        steps(8)
        assert seen == [2, 2, 2, 1, 1, 1, 1, 2]                 # checks at the 4th and 8th
        cost.update({1: 3.0, 2: 1.0})       # idle again
        steps(6)
        assert seen[8:] == [1, 1, 1, 2, 2, 2]
        cost.update({1: 0.95, 2: 1.0})      # one thread faster, but within the margin
        steps(4)
        assert seen[14:] == [2, 1, 2, 2] and torch.get_num_threads() == 2   # the 16th checked
    finally:
        torch.set_num_threads(before)


def test_stop_strings_unescape_only_known_escapes():
    from minilab.inference import unescape_stop

    assert unescape_stop("\\n\\nUser:") == "\n\nUser:"
    assert unescape_stop("a\\tb\\\\n") == "a\tb\\n"
    # a lone backslash, an unknown escape and non-ASCII text are kept as typed (no traceback, no mojibake)
    assert unescape_stop("C:\\") == "C:\\"
    assert unescape_stop("\\x") == "\\x"
    assert unescape_stop("é – 終") == "é – 終"
