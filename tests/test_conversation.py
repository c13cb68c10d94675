"""Issue 15: a conversation that outgrows a short context. The fitting rule (`minilab.conversation`),
the API's opt-in `truncation: "auto"` (a 10-turn conversation on a 128-token model, no error, the
dropped turns reported; without it OpenAI's 413/422 stay), and `minilab chat` over 10 scripted
turns with the notice on stderr."""

import io
import json

import httpx
import pytest
from inference_fixtures import shared_model_dir

from minilab.cli import main as cli
from minilab.conversation import ContextFull, fit_messages, min_reply_tokens
from minilab.inference import Engine, SamplingParams

CTX = 128  # the test model's context (the shared fixture's): a conversation outgrows it in two turns


def render(messages):
    """A stand-in chat template: 2 tokens of generation prompt, 3 per message plus 1 per word."""
    return [7] * (2 + sum(3 + len(m["content"].split()) for m in messages))


def msg(role, words):
    return {"role": role, "content": " ".join(["w"] * words)}


def test_fit_drops_oldest_whole_exchanges_and_keeps_system_and_latest():
    sys_, u1, a1, u2, a2, u3 = (msg("system", 5), msg("user", 10), msg("assistant", 20), msg("user", 10),
                                msg("assistant", 20), msg("user", 10))
    conv = [sys_, u1, a1, u2, a2, u3]
    assert len(render(conv)) == 2 + 8 + 2 * 13 + 2 * 23 + 13 == 95
    # context 100, min reply 16: 95 + 16 > 100, so the first exchange (u1, a1: 36 tokens) goes
    fit = fit_messages(render, conv, 100, requested=50, min_reply=16)
    assert fit.dropped_messages == 2 and len(fit.ids) == len(render([sys_, u2, a2, u3])) == 59
    assert fit.max_tokens == 41 and fit.capped and fit.requested == 50
    assert fit.notice == "2 older messages dropped to fit the model's 100-token context; " \
                         "reply limited to 41 tokens (asked for 50)"
    assert fit.report() == {"dropped_messages": 2, "max_tokens": 41, "requested_max_tokens": 50,
                            "context_length": 100, "notice": fit.notice}
    # everything fits: nothing dropped, no notice
    fit = fit_messages(render, conv, 200, requested=50, min_reply=16)
    assert (fit.dropped_messages, fit.max_tokens, fit.notice) == (0, 50, None)
    # no max_tokens asked: the reply may take all that is left (OpenAI's meaning), nothing "capped"
    fit = fit_messages(render, conv, 200, requested=None, min_reply=16)
    assert (fit.max_tokens, fit.capped, fit.notice) == (105, False, None)


def test_fit_keeps_minimum_reply_room_by_dropping_more_and_then_caps():
    conv = [msg("user", 10), msg("assistant", 20), msg("user", 10), msg("assistant", 20), msg("user", 10)]
    # 87 tokens of prompt in a 100 context: 13 left < the 16-token minimum room -> drop one exchange
    assert len(render(conv)) == 87
    fit = fit_messages(render, conv, 100, requested=64, min_reply=16)
    assert fit.dropped_messages == 2 and len(fit.ids) == 51 and fit.max_tokens == 49
    # a request smaller than the minimum room needs only its own room: nothing dropped
    fit = fit_messages(render, conv, 100, requested=8, min_reply=16)
    assert (fit.dropped_messages, fit.max_tokens, fit.notice) == (0, 8, None)
    # the latest exchange alone leaves less than the room: kept, the reply takes what is left
    big = [msg("user", 10), msg("assistant", 10), msg("user", 90)]
    fit = fit_messages(render, big, 100, requested=64, min_reply=16)
    assert fit.dropped_messages == 2 and len(fit.ids) == 95 and fit.max_tokens == 5
    assert fit.notice.endswith("reply limited to 5 tokens (asked for 64)")
    # an assistant turn before the first user message is an exchange of its own
    odd = [msg("assistant", 30), msg("user", 10)]
    assert fit_messages(render, odd, 40, requested=10, min_reply=10).dropped_messages == 1
    assert min_reply_tokens(256) == 64 and min_reply_tokens(64) == 16 and min_reply_tokens(2048) == 64


def test_fit_refuses_when_system_and_latest_alone_fill_the_context():
    conv = [msg("system", 40), msg("user", 5), msg("assistant", 5), msg("user", 60)]
    with pytest.raises(ContextFull) as e:
        fit_messages(render, conv, 100, requested=10)
    assert (e.value.n_prompt, e.value.context) == (len(render([conv[0], conv[3]])), 100)
    assert "this model's context is 100 tokens" in str(e.value)


# ---- the API --------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def short():
    """A tiny model with a 128-token context, and a server for it."""
    from minilab.serve.app import create_app, running_server

    engine = Engine.load(str(shared_model_dir()))
    with running_server(create_app(engine, max_concurrency=2)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        yield engine, http


# of four lengths, so that some latest exchanges leave less than the reply asked for
USER_TURNS = [f"the cat sat on the mat number {i} and then" + " the dog ran" * (i % 4) for i in range(10)]


def _stream(http, body):
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    extras = [c["minilab"] for c in chunks if "minilab" in c]
    assert len(extras) == 1 and chunks[-1]["minilab"] is extras[0]  # on the chunk with the finish reason
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return text, extras[0]["truncation"]


def test_api_truncation_auto_keeps_a_10_turn_conversation_going(short):
    """The page's conversation on a 128-token model: 10 turns, each one answered, the dropped turns
    and capped replies reported; each reply is the one the fitted prompt gives (greedy)."""
    engine, http = short
    system = {"role": "system", "content": "be brief"}
    history, dropped_total, capped = [], 0, 0
    for i, text in enumerate(USER_TURNS):
        history.append({"role": "user", "content": text})
        body = {"model": engine.name, "messages": [system, *history], "temperature": 0, "max_tokens": 48,
                "truncation": "auto"}
        if i % 2:
            reply, t = _stream(http, body)
        else:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            reply, t = r.json()["choices"][0]["message"]["content"], r.json()["minilab"]["truncation"]
            assert r.json()["usage"]["prompt_tokens"] + t["max_tokens"] <= CTX
        kept = history[t["dropped_messages"]:]
        ids = engine.chat_prompt([system, *kept])
        assert t["context_length"] == CTX and t["requested_max_tokens"] == 48
        assert t["max_tokens"] == min(48, CTX - len(ids))
        assert CTX - len(ids) >= CTX // 4 or len(kept) == 1  # the minimum room, unless only the latest is left
        assert reply == engine.complete(ids, SamplingParams(max_tokens=t["max_tokens"]), chat=True)[0]
        dropped_total += t["dropped_messages"]
        capped += t["max_tokens"] < 48
        assert (t["notice"] is None) == (t["dropped_messages"] == 0 and t["max_tokens"] == 48)
        history = kept + [{"role": "assistant", "content": reply}]  # what the page keeps
    assert dropped_total >= 10 and capped >= 1  # the conversation did outgrow the context
    assert http.get("/health").json()["failed"] == 0


def test_api_without_truncation_keeps_openai_errors(short):
    engine, http = short
    long_conv = [{"role": "user" if i % 2 == 0 else "assistant", "content": USER_TURNS[i // 2]} for i in range(9)]
    base = {"model": engine.name, "messages": long_conv, "temperature": 0}
    for extra in ({}, {"truncation": "disabled"}):
        r = http.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    short_conv = [{"role": "user", "content": "the cat"}]
    r = http.post("/v1/chat/completions", json={**base, "messages": short_conv, "max_tokens": 120})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    assert "minilab" not in http.post("/v1/chat/completions", json={**base, "messages": short_conv,
                                                                    "max_tokens": 4}).json()
    r = http.post("/v1/chat/completions", json={**base, "truncation": "middle"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "truncation"
    assert "'auto' or 'disabled'" in r.json()["error"]["message"]
    # with auto, a latest message that alone fills the context is still a 413
    huge = [{"role": "user", "content": "the cat sat on the mat " * 30}]
    r = http.post("/v1/chat/completions", json={**base, "messages": huge, "truncation": "auto"})
    assert r.status_code == 413 and "latest message alone do not fit" in r.json()["error"]["message"]


# ---- minilab chat -----------------------------------------------------------------------------------
def test_chat_verb_10_turns_on_a_short_context_trims_with_a_notice(short, capsys, monkeypatch):
    engine, _ = short
    model_dir = str(shared_model_dir())
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(t + "\n" for t in USER_TURNS)))
    assert cli(["chat", model_dir, "--temperature", "0", "--max-tokens", "24"]) == 0
    captured = capsys.readouterr()
    notices = [line for line in captured.err.splitlines() if "dropped to fit the model's 128-token context" in line]
    assert notices and "error" not in captured.err.lower() and "Traceback" not in captured.err
    # the replies are what the same fitting rule gives, turn by turn (greedy, top-p 0.9 is a no-op then)
    from minilab.conversation import fit_conversation

    turns, expect = [], []
    for text in USER_TURNS:
        turns.append({"role": "user", "content": text})
        fit = fit_conversation(engine, turns, 24)
        turns = turns[fit.dropped_messages:]
        answer = engine.complete(fit.ids, SamplingParams(max_tokens=fit.max_tokens, top_p=0.9), chat=True)[0]
        expect.append(answer)
        turns.append({"role": "assistant", "content": answer})
    assert captured.out == "".join(a + "\n" for a in expect)


def test_chat_verb_message_too_long_is_one_line_and_the_chat_goes_on(short, capsys, monkeypatch):
    model_dir = str(shared_model_dir())
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat " * 40 + "\nthe cat sat\n"))
    assert cli(["chat", model_dir, "--temperature", "0", "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "error: the message alone has" in captured.err and "shorten it" in captured.err
    assert len(captured.out.splitlines()) >= 1  # the second message was answered
