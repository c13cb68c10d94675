"""`minilab eval`: multiple choice on a known answer with exact baselines, perplexity of a
uniform model, sliding windows, bits per byte by hand, the CLI end to end, one-line errors."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilab.cli import main as cli_main
from minilab.evaluate.multiple_choice import evaluate_file, load_items, sample_items, wilson_interval
from minilab.evaluate.perplexity import sliding_window_nll, text_perplexity
from minilab.model import ModelConfig, build_model

Z = 1.959964
WORDS = ["</s>", "<unk>", "yes", "no", "a", "b", "c", "d", "x", "y", "Question:", "Answer:", "is", "sky", "blue",
         "grass", "red", "water", "wet", "héllo", "wörld", "✓"]


def word_tokenizer():
    """Whitespace word-level tokenizer: one token per word, so expected counts are easy to write down."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return tok


class Stub(nn.Module):
    """A parameter-free 'model' whose logits we control: `fn(input_ids) -> (B, T, V)`."""

    def __init__(self, fn, max_seq_len=64):
        super().__init__()
        self.fn = fn
        self.config = SimpleNamespace(vocab_size=len(WORDS), max_seq_len=max_seq_len)

    def forward(self, input_ids, kv_cache=None):
        return self.fn(input_ids)


def uniform(ids):
    return torch.zeros(*ids.shape, len(WORDS))


def repeat_first_word(ids):
    """Predicts, everywhere, the first word after the document separator (position 1)."""
    return 20.0 * F.one_hot(ids[:, 1:2].expand_as(ids), len(WORDS)).float()


def bigram(ids):
    """Logits depend on the current token only: any window with ≥ 1 token of context scores alike."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(WORDS), len(WORDS), generator=g)
    return table[ids]


MC_LINES = [
    {"passage": "yes sky blue", "question": "is sky blue", "answer": True},
    {"passage": "no grass red", "question": "is grass red", "answer": False},
    {"passage": "yes water wet", "question": "is water wet", "answer": True},
    {"context": "b x y", "choices": [" a", " b", " c"], "label": 1},
    {"context": "c x", "choices": [" a", " b b", " c", " d"], "label": 2},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- multiple choice --------------------------------------------------------------------------
def test_multiple_choice_known_answer_and_exact_baselines(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC_LINES)
    r = evaluate_file(Stub(repeat_first_word), word_tokenizer(), path, prefix_id=0)
    assert r["n_items"] == 5 and not r["sampled"]
    for norm in ("sum", "per_token", "per_byte"):
        acc = r["accuracy"][norm]
        assert acc["accuracy"] == 1.0 and acc["correct"] == 5
        assert acc["ci95"] == pytest.approx([1 / (1 + Z * Z / 5), 1.0])  # Wilson at 5/5
    assert r["baselines"]["chance"] == pytest.approx((3 * 1 / 2 + 1 / 3 + 1 / 4) / 5)
    assert r["baselines"]["majority"] == {"answer": "choice #1", "label": 1, "accuracy": 3 / 5}
    # BoolQ alone: every item has the choices " no"/" yes", so the majority answer is named.
    boolq = evaluate_file(Stub(repeat_first_word), word_tokenizer(), write_jsonl(tmp_path / "b.jsonl", MC_LINES[:3]),
                          prefix_id=0)
    assert boolq["baselines"] == {"chance": 0.5, "majority": {"answer": "yes", "label": 1, "accuracy": 2 / 3}}
    assert boolq["items"][0]["answer_tokens"] == [1, 1]


def test_whole_answer_is_scored(tmp_path):
    """' b b' gets the log-likelihood of both its tokens: sum and per-token differ by the count."""
    r = evaluate_file(Stub(uniform), word_tokenizer(), write_jsonl(tmp_path / "u.jsonl", MC_LINES[4:]), prefix_id=0)
    ll = r["items"][0]["loglik"]
    ln_v = math.log(len(WORDS))
    assert ll == pytest.approx([-ln_v, -2 * ln_v, -ln_v, -ln_v], rel=1e-6)
    assert r["items"][0]["answer_tokens"] == [1, 2, 1, 1]


def test_limit_samples_randomly_with_seed(tmp_path):
    items = load_items(write_jsonl(tmp_path / "mc.jsonl", MC_LINES * 4))  # 20 items, lines 1..20
    picked = sample_items(items, 5, seed=3)
    expected = sorted(random.Random(3).sample(range(20), 5))
    assert [it.line for it in picked] == [i + 1 for i in expected]
    assert [it.line for it in picked] != [1, 2, 3, 4, 5]
    assert [it.line for it in sample_items(items, 5, seed=4)] != [it.line for it in picked]
    assert sample_items(items, None, seed=3) == items


def test_wilson_interval_reference_value():
    lo, hi = wilson_interval(8, 10)  # textbook value: 0.8 with n=10 -> [0.490, 0.943]
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": [" a"], "label": 0}', "at least 2"),
    ('{"context": "a", "choices": [" a", " b"], "label": 2}', "'label'"),
    ('{"passage": "p", "question": "q", "answer": "yes"}', "true or false"),
    ('{"context": "a", "choices": [" a", " b"]', "invalid JSON"),
    ('{"text": "a"}', "expected keys"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    from minilab.errors import MinilabError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MC_LINES[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(MinilabError, match=rf"bad\.jsonl:3: .*{message}"):
        load_items(path)


# ---- perplexity -------------------------------------------------------------------------------
def test_uniform_model_perplexity_is_vocab_size_and_bits_per_byte_by_hand():
    text = "héllo wörld ✓ a b c d x y héllo"
    r = text_perplexity(Stub(uniform), word_tokenizer(), text, max_length=4, stride=2, prefix_id=0)
    n_words = len(text.split())
    assert r["tokens"] == n_words  # the separator prefix makes every text token scored, once
    assert r["perplexity"] == pytest.approx(len(WORDS), rel=1e-6)
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)  # non-ASCII: bytes, not characters
    assert r["bits_per_byte"] == pytest.approx(n_words * math.log2(len(WORDS)) / n_bytes, rel=1e-6)


def test_sliding_window_equals_full_forward_when_one_window_covers_all():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, intermediate_size=64,
                                    max_seq_len=64, init_std=0.5)).eval()
    ids = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = float(F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum"))
    for max_length, stride in ((40, 40), (64, 100), (40, 1000)):
        nll, n = sliding_window_nll(model, ids, max_length, stride)
        assert n == 39
        assert nll == pytest.approx(full, rel=1e-5)
    nll_windowed, n = sliding_window_nll(model, ids, 16, 8)
    assert n == 39 and nll_windowed != pytest.approx(full, rel=1e-5)  # less context: a different NLL


@pytest.mark.parametrize("max_length, stride", [(2, 1), (5, 2), (8, 7), (8, 8), (10, 3), (50, 10)])
def test_sliding_window_scores_every_token_once(max_length, stride):
    ids = torch.randint(0, len(WORDS), (30,), generator=torch.Generator().manual_seed(2))
    want = float(F.cross_entropy(bigram(ids[None])[0, :-1], ids[1:], reduction="sum"))
    nll, n = sliding_window_nll(Stub(bigram), ids, max_length, stride)
    assert n == 29
    assert nll == pytest.approx(want, rel=1e-5)


# ---- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tokenizer and packed data, a tiny model exported as <run>/final with a manifest
    pointing at the run, and a metrics.jsonl as `minilab pretrain` writes it."""
    from minilab.data.pack import PackConfig
    from minilab.data.pack import run as pack_run
    from minilab.data.shards import ShardWriter
    from minilab.data.tokenizer import TokenizerConfig
    from minilab.data.tokenizer import run as tok_run
    from minilab.fsutil import write_json_atomic
    from minilab.hf import save_hf_dir
    from minilab.registry import write_manifest
    from minilab.tokenization import tokenizer_fingerprint

    root = tmp_path_factory.mktemp("evalrun")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "another", "dog", "ran", "far", "hills"]
    (root / "corpus").mkdir()
    w = ShardWriter(root / "corpus", max_bytes=4000)
    for i in range(40):
        w.write({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 50))) + f". Doc {i}."})
    write_json_atomic(root / "corpus" / "manifest.json", {"kind": "minilab.corpus", "shards": w.close()})
    tok_run(TokenizerConfig(output_dir=str(root / "tok"), corpus_dir=str(root / "corpus"), vocab_size=320))
    pack_run(PackConfig(corpus_dir=str(root / "corpus"), tokenizer_dir=str(root / "tok"),
                        output_dir=str(root / "packed"), seq_len=16, val_fraction=0.2, workers=1))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=320, n_layer=2, n_head=2, d_model=32, intermediate_size=64,
                                    max_seq_len=32))
    run = root / "run"
    save_hf_dir(model, run / "final", tokenizer_dir=root / "tok")
    write_manifest(run / "final", run_dir=str(run.resolve()), tokenizer_sha256=tokenizer_fingerprint(root / "tok"))
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, 11):
            f.write(json.dumps({"kind": "train", "step": step, "tokens": 128 * step, "loss": 6 - 0.1 * step,
                                "lr": 1e-3 * min(1, step / 3), "grad_norm": 1.0, "tokens_per_s": 900 + step,
                                "flops_per_s": 1e9}) + "\n")
            if step % 5 == 0:
                f.write(json.dumps({"kind": "eval", "step": step, "tokens": 128 * step, "val_loss": 6 - 0.1 * step,
                                    "val_ppl": math.exp(6 - 0.1 * step), "epochs": {"packed": 0.1}}) + "\n")
        f.write('{"kind": "train", "step": 11, "tok')  # a line cut short by a crash: skipped
    write_jsonl(root / "mc.jsonl", [{"context": "the cat sat on the", "choices": [" mat", " hills"], "label": 0},
                                    {"passage": "the dog ran far away", "question": "did the dog run",
                                     "answer": True}] * 3)
    (root / "text.txt").write_text("the cat sat on a green mat. Der Hund läuft ✓\n", encoding="utf-8")
    (root / "prompts.txt").write_text("the cat\n\nthe dog ran\n", encoding="utf-8")
    return root


def test_cli_eval_writes_results_report_and_pngs(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--model-path", str(run_dir / "run" / "final"), "--data_dirs", str(run_dir / "packed"),
                   "--output_dir", str(out), "--text", str(run_dir / "text.txt"), "--mc", str(run_dir / "mc.jsonl"),
                   "--prompts", str(run_dir / "prompts.txt"), "--limit", "4", "--seed", "5",
                   "--set", "max_new_tokens=6"])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    packed, text = results["perplexity"]
    assert packed["kind"] == "packed" and packed["tokens"] > 0 and packed["bits_per_byte"] > 0
    assert text["kind"] == "text" and text["bytes"] == len("the cat sat on a green mat. Der Hund läuft ✓\n".encode())
    mc = results["multiple_choice"][0]
    assert mc["n_items"] == 4 and mc["n_in_file"] == 6 and mc["sampled"] and mc["seed"] == 5
    assert mc["baselines"]["chance"] == 0.5
    assert len((out / mc["items_file"]).read_text().splitlines()) == 4
    gens = results["generations"]["items"]
    assert [g["prompt"] for g in gens] == ["the cat", "the dog ran"]
    assert all(isinstance(g["greedy"], str) and isinstance(g["sampled"], str) for g in gens)
    # a plain model's samples use `minilab generate`'s defaults; the summary counts the items
    from minilab.sampling import GENERATE_SAMPLING

    sampling, summary = results["generations"]["sampling"], results["generations"]["summary"]
    assert {k: sampling[k] for k in GENERATE_SAMPLING} == GENERATE_SAMPLING and sampling["top_k"] is None
    for how in ("greedy", "sampled"):
        assert summary[how]["stopped"] == sum(g[f"{how}_stopped"] for g in gens)
    report = (out / "report.md").read_text()
    assert "| decoding | ended at a stop token | distinct 4-grams (mean) |" in report
    for needle in ("## Perplexity", "## Multiple choice", "majority class", "## Generations", "plots/loss.png"):
        assert needle in report
    assert set(results["plots"]) == {"plots/loss.png", "plots/lr.png", "plots/throughput.png",
                                     "plots/multiple_choice.png"}
    for rel in results["plots"]:
        data = (out / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_bad_jsonl_is_one_line_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": [" a", " b"], "label": 0}\n{"context": oops}\n', encoding="utf-8")
    rc = cli_main(["eval", "--model_path", str(run_dir / "run" / "final"), "--output-dir", str(tmp_path / "o"),
                   "--mc", str(bad)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and f"{bad}:2: invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_eval_accepts_pretrain_data_after_the_chat_template_changed(run_dir, tmp_path, capsys):
    """Fine-tuning that sets another chat template changes the tokenizer's fingerprint but no token
    id: the model can still be scored on the data it was pretrained on. Another vocabulary cannot."""
    import shutil

    from minilab.registry import write_manifest
    from minilab.tokenization import tokenizer_fingerprint

    model = tmp_path / "instruct"
    shutil.copytree(run_dir / "run" / "final", model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    assert tokenizer_fingerprint(model) != tokenizer_fingerprint(run_dir / "tok")
    write_manifest(model, tokenizer_sha256=tokenizer_fingerprint(model))
    args = ["eval", "--model-path", str(model), "--data_dirs", str(run_dir / "packed"), "--set", "max_new_tokens=2"]
    assert cli_main([*args, "--output_dir", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["perplexity"][0]["tokens"] > 0

    tok = json.loads((model / "tokenizer.json").read_text())  # one merge less: other token ids
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    (model / "tokenizer.json").write_text(json.dumps(tok))
    write_manifest(model, tokenizer_sha256=tokenizer_fingerprint(model))
    capsys.readouterr()
    assert cli_main([*args, "--output_dir", str(tmp_path / "refused")]) != 0
    err = capsys.readouterr().err
    assert "Tokenizer mismatch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()


def test_distinct_ngrams_scores_loops_low():
    from minilab.evaluate.stage import distinct_ngrams

    assert distinct_ngrams([1, 2, 3, 4, 5, 6]) == 1.0
    assert distinct_ngrams([1, 2, 3, 1, 2, 3, 1, 2, 3]) == 3 / 6  # (1,2,3,1) (2,3,1,2) (3,1,2,3) x2
    assert distinct_ngrams([1, 2, 3]) is None
