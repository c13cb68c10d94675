"""Tokenizer training, packing, the tokenizer-mismatch error and the weighted mixture reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import WORDS, make_corpus

from minilab.cli import main as cli_main
from minilab.data.mixture import WeightedMixture
from minilab.data.pack import PackConfig
from minilab.data.pack import run as pack_run
from minilab.data.packed import check_tokenizer_match, open_split
from minilab.data.tokenizer import TokenizerConfig
from minilab.data.tokenizer import run as tok_run
from minilab.errors import ConfigError, MinilabError, TokenizerMismatchError
from minilab.tokenization import read_tokenizer_meta, tokenizer_fingerprint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = make_corpus(root / "corpus")
    tok_run(TokenizerConfig(output_dir=str(root / "tok"), corpus_dir=str(corpus), vocab_size=400))
    pack_run(PackConfig(corpus_dir=str(corpus), tokenizer_dir=str(root / "tok"),
                        output_dir=str(root / "packed"), seq_len=16, val_fraction=0.1, workers=1))
    return root


def test_tokenizer_files_and_autotokenizer_parity(built):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok_dir = built / "tok"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "minilab_tokenizer.json"):
        assert (tok_dir / name).is_file()
    meta = read_tokenizer_meta(tok_dir)  # also verifies the stored fingerprint
    assert meta["sha256"] == tokenizer_fingerprint(tok_dir)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for text in ["the cat sat on the mat.", "Ünïcödé ✓ and 12345 numbers", "  spaces\n\tand tabs  ",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert hf.encode(text) == raw.encode(text).ids
        assert hf.decode(hf.encode(text)) == text
    assert hf.eos_token == "</s>" and hf.pad_token == "<pad>" and hf.bos_token == "<s>"
    assert hf.convert_tokens_to_ids("<|im_end|>") == raw.token_to_id("<|im_end|>")
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_fingerprint_is_content_not_path(built, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(built / "tok", copy)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(built / "tok")
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<pad>"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(built / "tok")
    with pytest.raises(MinilabError, match="differs from the recorded"):
        read_tokenizer_meta(copy)


def test_packed_files_roundtrip(built):
    from tokenizers import Tokenizer

    manifest = json.loads((built / "packed" / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == tokenizer_fingerprint(built / "tok")
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == 16
    train, offsets, _ = open_split(built / "packed", "train", verify=True)
    val, _, _ = open_split(built / "packed", "val", verify=True)
    assert manifest["splits"]["val"]["documents"] == 6 and manifest["splits"]["train"]["documents"] == 54
    assert len(train) == manifest["splits"]["train"]["tokens"] and len(val) > 0
    tok = Tokenizer.from_file(str(built / "tok" / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    # Each document decodes back to its text and ends with eos.
    first = np.asarray(train[int(offsets[0]):int(offsets[1])])
    assert first[-1] == eos and "Document" in tok.decode(first[:-1].tolist())
    assert (np.asarray(train) == eos).sum() == manifest["splits"]["train"]["documents"]


def test_pack_refuses_existing_and_parallel_matches_serial(built, tmp_path):
    cfg = PackConfig(corpus_dir=str(built / "corpus"), tokenizer_dir=str(built / "tok"),
                     output_dir=str(built / "packed"), seq_len=16, val_fraction=0.1)
    with pytest.raises(MinilabError, match="already exists"):
        pack_run(cfg)
    cfg.output_dir, cfg.workers, cfg.batch_docs = str(tmp_path / "p2"), 2, 7
    m2 = pack_run(cfg)
    m1 = json.loads((built / "packed" / "manifest.json").read_text())
    assert m2["splits"] == m1["splits"]  # same bytes, same hashes with 2 worker processes


def test_tokenizer_mismatch_is_blocking(built, tmp_path):
    other_corpus = make_corpus(tmp_path / "c2", seed=5, words=[w.upper() for w in WORDS])
    tok_run(TokenizerConfig(output_dir=str(tmp_path / "tok2"), corpus_dir=str(other_corpus), vocab_size=350))
    pack_run(PackConfig(corpus_dir=str(other_corpus), tokenizer_dir=str(tmp_path / "tok2"),
                        output_dir=str(tmp_path / "p2"), seq_len=16, workers=1))
    sha1 = tokenizer_fingerprint(built / "tok")
    sha2 = tokenizer_fingerprint(tmp_path / "tok2")
    assert sha1 != sha2
    assert check_tokenizer_match([built / "packed"], sha1) == sha1
    with pytest.raises(TokenizerMismatchError) as e:
        check_tokenizer_match([built / "packed", tmp_path / "p2"], None)
    msg = str(e.value)
    assert msg.startswith("Tokenizer mismatch between datasets: ") and sha1 in msg and sha2 in msg
    assert "--force" in msg
    with pytest.raises(TokenizerMismatchError):
        WeightedMixture([built / "packed"], None, seq_len=16, seed=0, tokenizer_sha256=sha2)


def test_mixture_determinism_resume_and_ranks(built, tmp_path):
    shutil_copy = __import__("shutil").copytree
    second = tmp_path / "second"
    shutil_copy(built / "packed", second)
    dirs, weights = [built / "packed", second], [0.75, 0.25]

    def take(mix, n):
        return [tuple(map(tuple, next(mix))) for _ in range(n)]

    full = take(WeightedMixture(dirs, weights, seq_len=16, seed=3), 400)
    assert full == take(WeightedMixture(dirs, weights, seq_len=16, seed=3), 400)
    assert full != take(WeightedMixture(dirs, weights, seq_len=16, seed=4), 400)
    x, y = next(WeightedMixture(dirs, weights, seq_len=16, seed=3))
    assert x.shape == (16,) and np.array_equal(x[1:], y[:-1])
    # Resume: a fresh reader loaded with a saved state continues exactly.
    a = WeightedMixture(dirs, weights, seq_len=16, seed=3)
    head = take(a, 150)
    state = json.loads(json.dumps(a.state_dict()))
    b = WeightedMixture(dirs, weights, seq_len=16, seed=3)
    b.load_state_dict(state)
    assert head + take(b, 250) == full
    # Two ranks read disjoint samples whose interleaving is the single-process stream.
    r0 = take(WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=0, world_size=2), 200)
    r1 = take(WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=1, world_size=2), 200)
    assert [s for pair in zip(r0, r1, strict=True) for s in pair] == full
    # Multi-rank resume: every rank restores rank 0's saved state (only rank 0 writes checkpoints)
    # and the ranks together continue the single-process stream with nothing read twice.
    m0 = WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=0, world_size=2)
    m1 = WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=1, world_size=2)
    take(m0, 60), take(m1, 60)
    saved = json.loads(json.dumps(m0.state_dict()))
    assert saved["step"] == 120 and saved == {**m1.state_dict(), "counts": saved["counts"], "rank": 0}
    n0 = WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=0, world_size=2)
    n1 = WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=1, world_size=2)
    n0.load_state_dict(saved), n1.load_state_dict(saved)
    rest = [s for pair in zip(take(n0, 40), take(n1, 40), strict=True) for s in pair]
    assert rest == full[120:200]
    # Another number of ranks: 2 -> 1 continues the global stream at the saved round's end, and
    # 1 -> 3 from a position inside a round of 3 (step 125) moves on to the next round (126).
    one = WeightedMixture(dirs, weights, seq_len=16, seed=3)
    one.load_state_dict(saved)
    assert take(one, 50) == full[120:170]
    mid = WeightedMixture(dirs, weights, seq_len=16, seed=3)
    take(mid, 125)
    three = [WeightedMixture(dirs, weights, seq_len=16, seed=3, rank=r, world_size=3) for r in range(3)]
    for m in three:
        m.load_state_dict(json.loads(json.dumps(mid.state_dict())))
    rest3 = [s for triple in zip(*(take(m, 20) for m in three), strict=True) for s in triple]
    assert rest3 == full[126:186]
    mix = a.realised_mix()
    assert abs(mix[str(dirs[0])]["share"] - 0.75) < 0.1
    with pytest.raises(MinilabError, match="seed"):
        WeightedMixture(dirs, weights, seq_len=16, seed=9).load_state_dict(state)


def test_pretrain_data_weights_help_says_what_the_mixture_does(built, tmp_path):
    """Weights are normalised sampling probabilities, equal by default whatever the sizes (the help
    said 'default proportional to their sizes', SFT's rule, which pretraining's reader does not follow)."""
    import dataclasses

    from minilab.pretrain import PretrainConfig

    small = tmp_path / "small"
    pack_run(PackConfig(corpus_dir=str(make_corpus(tmp_path / "corpus", n_docs=8, seed=1)),
                        tokenizer_dir=str(built / "tok"), output_dir=str(small), seq_len=16, val_fraction=0.1,
                        workers=1))
    dirs = [built / "packed", small]
    mix = WeightedMixture(dirs, None, seq_len=16, seed=0)
    assert mix.n_windows[0] > 4 * mix.n_windows[1]
    assert mix.probs.tolist() == [0.5, 0.5]  # the default: equal, not by size
    assert WeightedMixture(dirs, [3, 1], seq_len=16, seed=0).probs.tolist() == [0.75, 0.25]  # divided by the sum
    for _ in range(4 * mix.n_windows[1]):
        next(mix)
    report = mix.realised_mix()
    assert abs(report[str(small)]["share"] - 0.5) < 0.15 and report[str(small)]["epochs"] > 1  # reread
    assert WeightedMixture(dirs, [1, 0], seq_len=16, seed=0).probs.tolist() == [1.0, 0.0]
    help_text = {f.name: f.metadata.get("help") for f in dataclasses.fields(PretrainConfig)}["data_weights"]
    assert "default equal weights" in help_text and "divided by their sum" in help_text
    assert "proportional to their sizes" not in help_text


def test_cli_pack_and_tokenizer(built, tmp_path, capsys):
    rc = cli_main(["tokenizer", "--corpus_dir", str(built / "corpus"), "--vocab-size", "300",
                   "--output-dir", str(tmp_path / "t")])
    assert rc == 0
    rc = cli_main(["pack", "--corpus-dir", str(built / "corpus"), "--tokenizer-dir", str(tmp_path / "t"),
                   "--output_dir", str(tmp_path / "p"), "--seq-len", "8", "--workers", "1"])
    assert rc == 0 and (tmp_path / "p" / "train.bin").is_file()
    rc = cli_main(["pack", "--corpus-dir", str(built / "corpus"), "--tokenizer-dir", str(tmp_path / "t"),
                   "--output_dir", str(tmp_path / "p"), "--seq-len", "8"])
    assert rc == 1 and "already exists" in capsys.readouterr().err
    # A shard edited after the corpus was written is refused, naming the shard.
    shard = next((built / "corpus").glob("shard-*"))
    backup = shard.read_bytes()
    shard.write_bytes(backup + b'{"text": "sneaked in"}\n')
    try:
        rc = cli_main(["pack", "--corpus-dir", str(built / "corpus"), "--tokenizer-dir", str(tmp_path / "t"),
                       "--output-dir", str(tmp_path / "p3")])
        assert rc == 1 and "SHA-256" in capsys.readouterr().err
    finally:
        shard.write_bytes(backup)


@pytest.mark.parametrize("value,expect", [
    ("/nonexistent/tok", "--from /nonexistent/tok: no such directory"),
    ("./no/such/dir", "--from ./no/such/dir: no such directory"),
    ("../nope", "--from ../nope: no such directory"),
    ("~/no-such-tokenizer-dir", "--from ~/no-such-tokenizer-dir: no such directory"),
])
def test_tokenizer_from_a_missing_path_says_so(tmp_path, capsys, value, expect):
    assert cli_main(["tokenizer", "--from", value, "--output-dir", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert expect in err and "Repo id" not in err and err.count("\n") == 1


def test_tokenizer_from_a_file_is_not_a_directory(built, tmp_path, capsys):
    f = built / "corpus" / "manifest.json"
    assert cli_main(["tokenizer", "--from", str(f), "--output-dir", str(tmp_path / "t")]) == 1
    assert f"--from {f}: not a directory" in capsys.readouterr().err


def test_tokenizer_vocab_larger_than_the_corpus_supports_warns_and_records_both(built, tmp_path, caplog):
    meta = tok_run(TokenizerConfig(output_dir=str(tmp_path / "t"), corpus_dir=str(built / "corpus"),
                                   vocab_size=70000))
    assert meta["requested_vocab_size"] == 70000 and meta["vocab_size"] < 1000
    assert read_tokenizer_meta(tmp_path / "t")["requested_vocab_size"] == 70000
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and f"supports only {meta['vocab_size']} tokens" in warning[0]
    assert "vocab_size 70000 asked for" in warning[0]


def test_tokenizer_vocab_below_bytes_and_specials_is_refused(capsys, tmp_path):
    assert cli_main(["tokenizer", "--corpus-dir", "c", "--vocab-size", "10", "--output-dir", str(tmp_path)]) == 2
    assert "key 'vocab_size': vocab_size 10 is too small: at least 300" in capsys.readouterr().err
    many = [f"<x{i}>" for i in range(100)]
    with pytest.raises(ConfigError, match="too small: at least 378"):
        TokenizerConfig(output_dir="t", corpus_dir="c", vocab_size=300, extra_special_tokens=many).validate()


def test_pack_refuses_no_validation_split(built, tmp_path, capsys):
    """Pretraining evaluates on the val split and refuses packed data without one: refuse at pack."""
    rc = cli_main(["pack", "--corpus-dir", str(built / "corpus"), "--tokenizer-dir", str(built / "tok"),
                   "--output-dir", str(tmp_path / "p"), "--val-fraction", "0"])
    assert rc == 2 and not (tmp_path / "p").exists()
    assert "key 'val_fraction': must be in (0, 1), got 0.0" in capsys.readouterr().err


def _tokenizer_copy(built, tmp_path):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(built / "tok", tok)
    return tok


def test_truncated_tokenizer_json_is_one_line_naming_the_file(built, tmp_path, capsys):
    from minilab.tokenization import load_tokenizer

    tok = _tokenizer_copy(built, tmp_path)
    f = tok / "tokenizer.json"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(MinilabError, match=r"tokenizer.json: cannot be loaded as a tokenizer \(EOF while parsing"):
        load_tokenizer(tok, verify=False)
    with pytest.raises(MinilabError, match=r"tokenizer.json: .*the file is truncated or damaged"):
        load_tokenizer(tok)
    rc = cli_main(["pack", "--corpus-dir", str(built / "corpus"), "--tokenizer-dir", str(tok),
                   "--output-dir", str(tmp_path / "p"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"{f}: " in err and "truncated or damaged" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()


def test_load_tokenizer_checks_the_recorded_fingerprint(built, tmp_path):
    """A tokenizer.json that still parses but was edited (two tokens' ids swapped) no longer
    matches the sha256 in minilab_tokenizer.json: refused, so no id silently means another token."""
    from minilab.tokenization import load_tokenizer

    tok = _tokenizer_copy(built, tmp_path)
    assert load_tokenizer(tok).get_vocab_size() == load_tokenizer(built / "tok" / "tokenizer.json").get_vocab_size()
    data = json.loads((tok / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tok / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(MinilabError, match="its vocabulary or encoding differs from the fingerprint recorded"):
        load_tokenizer(tok)
    assert load_tokenizer(tok, verify=False).token_to_id("a") == vocab["a"]


@pytest.mark.parametrize("stage", ["tokenizer", "pack"])
def test_force_replaces_only_the_stages_own_output(built, tmp_path, stage, capsys):
    """tokenizer/pack --force replaced any folder; now only their own earlier output (or an empty one)."""
    args = {"tokenizer": ["tokenizer", "--corpus-dir", str(built / "corpus"), "--vocab-size", "300"],
            "pack": ["pack", "--corpus-dir", str(built / "corpus"), "--tokenizer-dir", str(built / "tok"),
                     "--seq-len", "8", "--workers", "1"]}[stage]
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    other = built / "packed" if stage == "tokenizer" else make_corpus(tmp_path / "c2")  # minilab's, another kind
    refused = [(mine, "no minilab marker"), (other, "not a"), (built / "corpus", "which this run reads")]
    for out, why in refused:
        assert cli_main([*args, "--output-dir", str(out), "--force"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (other / "manifest.json").is_file()
    assert cli_main([*args, "--output-dir", str(tmp_path / "o")]) == 0
    (tmp_path / "o" / "stale").write_text("old")
    assert cli_main([*args, "--output-dir", str(tmp_path / "o"), "--force"]) == 0
    assert not (tmp_path / "o" / "stale").exists()
