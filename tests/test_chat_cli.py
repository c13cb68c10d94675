"""Generation verbs: streaming equals batch generation, stop strings, `minilab generate`, `minilab chat`
fed through stdin (history, template, /reset), adapters, and the chat-template fallback warnings."""

import io
import json
import shutil

import pytest
import torch
from inference_fixtures import shared_model_dir

from minilab.cli import main as cli
from minilab.generate import TextStream, decode, generate, stream_generate
from minilab.inference import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir():
    return shared_model_dir()


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(str(model_dir))


def test_stream_generate_equals_generate(engine):
    ids = engine.encode("the cat sat on")
    for kw in (dict(), dict(temperature=0.9, top_k=20, seed=3), dict(temperature=1.0, top_p=0.8, seed=5)):
        streamed = list(stream_generate(engine.model, ids, max_new_tokens=20, **kw))
        assert streamed == generate(engine.model, [ids], max_new_tokens=20, **kw)[0]


def test_text_stream_deltas_reassemble_and_cut_at_stop_strings(engine):
    ids = engine.encode("the dog ran far")
    tokens = generate(engine.model, [ids], max_new_tokens=40)[0]
    full = decode(engine.tokenizer, tokens)
    stream = TextStream(engine.tokenizer)
    pieces = [stream.push(t) for t in tokens] + [stream.finish()]
    assert "".join(pieces) == full
    # A stop string from the middle of the greedy text: output ends right before it, and no
    # delta ever shows a piece of it.
    start = next(i for i in range(len(full) // 3, len(full)) if "\ufffd" not in full[i:i + 3])
    stop = full[start:start + 3]
    cut = full[:full.index(stop)]
    stream = TextStream(engine.tokenizer, [stop, "never-seen-stop"])
    shown = ""
    for t in tokens:
        shown += stream.push(t)
        assert stop not in shown
        if stream.stopped:
            break
    shown += stream.finish()
    assert stream.stopped and shown == cut
    text, _, finish = engine.complete(ids, SamplingParams(max_tokens=40, stop=[stop]))
    assert (text, finish) == (cut, "stop")
    text, n, finish = engine.complete(ids, SamplingParams(max_tokens=40))
    assert (text, n, finish) == (full, 40, "length")


def test_generate_verb_json_and_stop(model_dir, engine, capsys):
    assert cli(["generate", str(model_dir), "--prompt", "the cat", "--prompt", "rain", "--max-tokens", "12",
                "--json", "--temperature", "0", "--repetition-penalty", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "rain"]
    for r in rows:
        expect = engine.complete(engine.encode(r["prompt"]), SamplingParams(max_tokens=12))
        assert (r["text"], r["completion_tokens"], r["finish_reason"]) == expect
    # by default it samples with sampling.GENERATE_SAMPLING (greedy loops on small models)
    from minilab.sampling import GENERATE_SAMPLING

    assert cli(["generate", str(model_dir), "--prompt", "the cat", "--max-tokens", "12", "--json", "--seed", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    params = SamplingParams(max_tokens=12, seed=3, **GENERATE_SAMPLING)
    assert (row["text"], row["completion_tokens"], row["finish_reason"]) == engine.complete(engine.encode("the cat"),
                                                                                            params)
    assert cli(["generate", str(model_dir), "--prompt", "the cat"]) == 0  # plain text output
    assert capsys.readouterr().out.strip()
    assert cli(["generate", str(model_dir), "--max-tokens", "0", "--prompt", "x"]) == 1
    assert "--max-tokens must be" in capsys.readouterr().err


def test_chat_verb_over_stdin_keeps_history(model_dir, engine, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n\nand then?\n/reset\nthe cat sat\n/exit\nignored\n"))
    # greedy, as this test checks exact text (chat samples by default: temperature 0.3, top-p 0.9)
    assert cli(["chat", str(model_dir), "--max-tokens", "10", "--temperature", "0", "--top-p", "1"]) == 0
    out = capsys.readouterr().out
    params = SamplingParams(max_tokens=10)
    first = engine.complete(engine.chat_prompt([{"role": "user", "content": "the cat sat"}]), params, chat=True)[0]
    history = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and then?"}]
    second = engine.complete(engine.chat_prompt(history), params, chat=True)[0]
    # after /reset the same first message gets the same first reply
    assert out == f"{first}\n{second}\n{first}\n"  # (the random model's replies may hold newlines)
    assert second != engine.complete(engine.chat_prompt(history[-1:]), params, chat=True)[0]


def test_chat_prompt_uses_the_tokenizers_template(engine):
    text = engine.chat.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.end_of_turn == engine.tokenizer.token_to_id("<|im_end|>")
    assert engine.end_of_turn in engine.stop_ids and engine.warnings == []


def test_missing_template_and_end_of_turn_warn_with_the_fallback(model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    e = Engine.load(str(bare))
    assert len(e.warnings) == 1 and "fallback plain transcript" in e.warnings[0]
    assert e.chat.render([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    # A template whose end-of-turn token is unknown: replies stop at eos only, and it says so.
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bare / "minilab_tokenizer.json").unlink()
    e = Engine.load(str(bare))
    assert len(e.warnings) == 1 and "no end-of-turn token" in e.warnings[0] and "</s>" in e.warnings[0]


def test_adapter_flag_merges_lora(model_dir, engine, tmp_path, capsys):
    from minilab.loading import load_model, load_model_for_inference

    peft_model = load_model(str(model_dir), apply_lora=True, lora_config={"r": 4})
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = load_model_for_inference(str(model_dir), adapter_dir=tmp_path / "adapter")
    ids = engine.encode("the cat")
    expect = decode(engine.tokenizer, generate(merged, [ids], max_new_tokens=12,
                                               stop_token_ids=engine.stop_ids)[0])
    assert cli(["generate", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "the cat",
                "--max-tokens", "12", "--json", "--temperature", "0", "--repetition-penalty", "1"]) == 0
    got = json.loads(capsys.readouterr().out)["text"]
    assert got == expect
    assert got != engine.complete(ids, SamplingParams(max_tokens=12))[0]


def test_text_before_a_stop_string_in_the_same_token_is_kept(engine):
    """A token that carries text and then a whole stop string: the text is part of the reply
    (it was dropped: the stream ended at the stop without sending what preceded it)."""
    ids = engine.encode("the dog ran far")
    tokens = generate(engine.model, [ids], max_new_tokens=40)[0]
    full = decode(engine.tokenizer, tokens)
    pos = 0
    for t in tokens:
        piece = decode(engine.tokenizer, [t])
        start = full.find(piece, pos)
        if len(piece) >= 2 and start >= 0 and full.find(piece[1:]) == start + 1 and "\ufffd" not in piece:
            break
        pos = max(pos, start + len(piece)) if start >= 0 else pos
    else:
        pytest.skip("no multi-character token in this greedy text")
    stop = piece[1:]
    text, _, finish = engine.complete(ids, SamplingParams(max_tokens=40, stop=[stop]))
    assert (text, finish) == (full[:start + 1], "stop")
