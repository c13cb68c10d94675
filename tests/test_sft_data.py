"""`minilab sft-data`: the loss mask token by token, record shapes, OASST top-ranked path,
truncate/drop counts, the manifest's tokenizer fingerprint and the blocking mismatch error."""

from __future__ import annotations

import json

import pytest
from fixtures import make_packed
from tokenizers import Tokenizer

from minilab.errors import TokenizerMismatchError
from minilab.finetune.records import oasst_paths, to_messages
from minilab.finetune.rows import Rows, WeightedSampler, check_data_tokenizer, collate
from minilab.finetune.sft_data import SFTDataConfig, run
from minilab.finetune.templates import IGNORE, encode_conversation, labels_from_mask, resolve_template


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("sftdata"), n_docs=60)["tokenizer"]


def test_mask_token_by_token(tok_dir):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat"}, {"role": "user", "content": "dog"},
            {"role": "assistant", "content": "ran far"}]
    ids, mask = encode_conversation(tok, resolve_template("chatml"), msgs)
    labels = labels_from_mask(ids, mask)
    # Expected by hand: the ChatML text split into its pieces; only assistant text + <|im_end|> trained.
    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids
    end = tok.token_to_id("<|im_end|>")
    pieces = [("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n"
               "<|im_start|>assistant\n", False), ("sat", True), ("<|im_end|>", True), ("\n", False),
              ("<|im_start|>user\ndog<|im_end|>\n<|im_start|>assistant\n", False), ("ran far", True),
              ("<|im_end|>", True), ("\n", False)]
    expected = []
    for text, trained in pieces:
        expected += [(t, t if trained else IGNORE) for t in enc(text)]
    assert list(zip(ids, labels, strict=True)) == expected
    assert [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE].count(end) == 2
    # Batching shifts: target t is token t+1 where trained.
    import numpy as np
    x, y = collate([(np.array(ids), np.array(mask))], pad_id=0)
    assert y[0].tolist() == labels[1:] and x[0].tolist() == ids[:-1]


def test_record_shapes_and_oasst():
    a = to_messages({"instruction": "Add", "input": "1 and 2", "output": "3"})
    assert a == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    s = to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    assert [m["role"] for m in s] == ["user", "assistant"]
    flat = [{"message_id": "r", "parent_id": None, "role": "prompter", "text": "Q"},
            {"message_id": "a1", "parent_id": "r", "role": "assistant", "text": "worse", "rank": 1},
            {"message_id": "a0", "parent_id": "r", "role": "assistant", "text": "best", "rank": 0},
            {"message_id": "f", "parent_id": "a0", "role": "prompter", "text": "more?"}]
    assert list(oasst_paths(flat)) == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "best"}]]
    nested = {"prompt": {"text": "Q", "role": "prompter", "replies": [
        {"text": "b", "role": "assistant", "rank": 1, "replies": []},
        {"text": "a", "role": "assistant", "rank": 0, "replies": []}]}}
    assert to_messages(nested)[-1]["content"] == "a"


def test_overflow_counts_manifest_and_mismatch(tok_dir, tmp_path):
    src = tmp_path / "chats.jsonl"
    long = " ".join(["cat sat on the mat"] * 40)
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]},
            {"messages": [{"role": "user", "content": "tell"}, {"role": "assistant", "content": long}]},
            {"instruction": "x", "output": "y"}, {"bogus": 1}]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    drop = run(SFTDataConfig(sources=[str(src)], tokenizer_dir=str(tok_dir), output_dir=str(tmp_path / "d"),
                             max_len=80, overflow="drop", val_fraction=0))
    assert drop["counts"]["dropped_too_long"] == 1 and drop["counts"]["invalid"] == 1
    assert drop["counts"]["examples_kept"] == 2
    trunc = run(SFTDataConfig(sources=[str(src)], tokenizer_dir=str(tok_dir), output_dir=str(tmp_path / "t"),
                              max_len=80, overflow="truncate", val_fraction=0, template="instruct"))
    assert trunc["counts"]["truncated"] == 1 and trunc["counts"]["examples_kept"] == 3
    assert len(Rows(tmp_path / "t", "train")) == 3 and trunc["splits"]["train"]["max_row_tokens"] <= 80
    packed = run(SFTDataConfig(sources=[str(src)], tokenizer_dir=str(tok_dir), output_dir=str(tmp_path / "p"),
                               max_len=400, pack=True, val_fraction=0))
    assert packed["splits"]["train"]["rows"] < packed["counts"]["examples_kept"]
    from minilab.tokenization import tokenizer_fingerprint
    assert trunc["tokenizer_sha256"] == tokenizer_fingerprint(tok_dir)
    with pytest.raises(TokenizerMismatchError, match="Tokenizer mismatch"):
        check_data_tokenizer([str(tmp_path / "t")], "sft_data", "0" * 64)


_TRICKY = ["plain", "a ``` inside", "```\nline of its own\n```", "````python\nfour\n````", "ends in `", "x\r```\ry"]


def _fences(markdown: str) -> list[str]:
    from markdown_it import MarkdownIt

    return [t.content for t in MarkdownIt("commonmark").parse(markdown) if t.type == "fence"]


@pytest.mark.parametrize("text", _TRICKY)
def test_code_fence_holds_any_text_verbatim(text):
    from minilab.data.datacard import code_fence

    assert _fences(f"before\n\n{code_fence(text, 'text')}\n\nafter `x`\n") == [text.replace("\r", "\n") + "\n"]


def test_data_cards_show_examples_verbatim_in_closed_fences():
    """SFT/DPO/corpus DATACARD.md examples are what was trained on, character for character: a
    backtick run in an example neither ends its block early nor is rewritten (was: ``` -> ʼʼʼ)."""
    from minilab.data.datacard import render_datacard
    from minilab.finetune import dpo_data, sft_data

    m = {"template": {"name": "chatml", "end_token": "<|im_end|>"}, "tokenizer_sha256": "ab", "counts": {},
         "splits": {}, "sources": [], "constructed": False}
    texts = [t for t in _TRICKY if "\r" not in t]
    assert _fences(sft_data._card(m, texts)) == [t + "\n" for t in texts]
    samples = [{"prompt": [{"role": "user", "content": t}], "chosen": t + "`", "rejected": "no"} for t in texts]
    [block] = _fences(dpo_data._card(m, samples))
    assert [json.loads(line) for line in block.splitlines()] == samples
    corpus = {"name": "c", "minilab_version": "0", "created": "now", "seconds": 1, "documents_read": 2,
              "documents_kept": 0, "characters_kept": 0, "approx_tokens": 0, "shards": [], "rejects": {},
              "sources": [], "dropped": {"too_short": len(texts)},
              "config": {"compression": "none", "fix_encoding": True, "quality": {},
                         "dedup": {"exact": True, "near": False, "threshold": 0.8, "num_perm": 8, "shingle_words": 5}}}
    card = render_datacard(corpus, {"too_short": [{"where": "f:1", "text": t} for t in texts]})
    assert _fences(card) == [t + "\n" for t in texts]


def test_weighted_sampler_resumes_across_ranks_without_repeats():
    """Fine-tuning draws under torchrun: every rank restores rank 0's saved state and the ranks
    together continue the one-process stream, nothing drawn twice or skipped; a state also
    resumes under another number of ranks, at the next round of the new one."""
    sizes, weights = [7, 5], [2.0, 1.0]

    def draws(sampler, n):
        return [sampler.next() for _ in range(n)]

    full = draws(WeightedSampler(sizes, weights, seed=4), 90)
    r0, r1 = (WeightedSampler(sizes, weights, seed=4, rank=r, world=2) for r in (0, 1))
    assert [p for pair in zip(draws(r0, 20), draws(r1, 20), strict=True) for p in pair] == full[:40]
    saved = r0.state_dict()
    assert saved == r1.state_dict() and saved["n"] == 40
    n0, n1 = (WeightedSampler(sizes, weights, seed=4, rank=r, world=2) for r in (0, 1))
    n0.load_state_dict(saved), n1.load_state_dict(saved)
    assert [p for pair in zip(draws(n0, 10), draws(n1, 10), strict=True) for p in pair] == full[40:60]
    single = WeightedSampler(sizes, weights, seed=4)
    single.load_state_dict(saved)
    assert draws(single, 10) == full[40:50]
    one = WeightedSampler(sizes, weights, seed=4)
    draws(one, 61)
    three = [WeightedSampler(sizes, weights, seed=4, rank=r, world=3) for r in range(3)]
    for s in three:
        s.load_state_dict(one.state_dict())
    assert [p for t in zip(*(draws(s, 5) for s in three), strict=True) for p in t] == full[63:78]


@pytest.mark.parametrize("stage", ["sft-data", "dpo-data"])
def test_force_replaces_only_the_stages_own_output(tok_dir, tmp_path, stage, capsys):
    """sft-data/dpo-data --force replaced any folder, the tokenizer folder they read included."""
    from minilab.cli import main as cli_main

    args = [stage, "--source", "demo", "--tokenizer-dir", str(tok_dir)]
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for out, why in ((mine, "no minilab marker"), (tok_dir, "which this run reads"),
                     (tok_dir.parent / "packed", "not a")):
        assert cli_main([*args, "--output-dir", str(out), "--force"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert (mine / "thesis.tex").read_text() == "years of work" and (tok_dir / "tokenizer.json").is_file()
    assert cli_main([*args, "--output-dir", str(tmp_path / "o")]) == 0
    (tmp_path / "o" / "stale").write_text("old")
    assert cli_main([*args, "--output-dir", str(tmp_path / "o")]) == 1 and "pass --force" in capsys.readouterr().err
    assert cli_main([*args, "--output-dir", str(tmp_path / "o"), "--force"]) == 0
    assert not (tmp_path / "o" / "stale").exists()


def test_demo_chat_heldout_prompts_are_in_no_training_conversation():
    """recipes/demo-chat-heldout.txt measures whether the demo's chat model ends its answers on
    questions it was not trained on: none of them may be an utterance of the built-in SFT and DPO
    data (compared without case and punctuation)."""
    import re
    from pathlib import Path

    import minilab
    from minilab.finetune.demo_data import dialogues

    def norm(text: str) -> str:
        return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())

    prompts = [line.strip() for line in
               (Path(minilab.__file__).parent / "recipes" / "demo-chat-heldout.txt").read_text().splitlines()]
    assert len(prompts) == 40 and all(prompts) and len(set(prompts)) == 40
    trained = {norm(u) for _, turns in dialogues() for u in turns}
    assert len(trained) > 1000
    assert [p for p in prompts if norm(p) in trained] == []


def test_records_read_bom_line_separators_and_report_bad_files(tmp_path):
    from minilab.errors import MinilabError
    from minilab.finetune.records import iter_records

    rec = {"messages": [{"role": "user", "content": "a\u2028b\u0085c"}, {"role": "assistant", "content": "d"}]}
    jsonl = tmp_path / "u.jsonl"
    # a byte-order mark, and U+2028 / U+0085 written raw inside a string (json.dumps(ensure_ascii=False))
    jsonl.write_text(json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(rec, ensure_ascii=False) + "\n",
                     encoding="utf-8-sig")
    assert list(iter_records(str(jsonl))) == [rec, rec]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([rec]), encoding="utf-8-sig")
    assert list(iter_records(str(arr))) == [rec]
    arr.write_text('[{"messages": [}]')
    with pytest.raises(MinilabError, match=r"a\.json:1: invalid JSON"):
        list(iter_records(str(arr)))
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(MinilabError, match=r"l\.jsonl: not UTF-8 text"):
        list(iter_records(str(latin)))
