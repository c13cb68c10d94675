"""`minilab serve`: the acceptance test with the official `openai` client, OpenAI-style errors while the
server keeps serving, the queue (429), a disconnected stream stopping its generation, a bounded load
test (200 requests, 32 clients) and the remote-bind guard. Servers run on 127.0.0.1 and a free port."""

import asyncio
import copy
import json
import statistics
import threading
import time

import httpx
import pytest
from inference_fixtures import shared_model_dir

from minilab.inference import Engine, SamplingParams
from minilab.serve.app import create_app, running_server

KEY = "sk-test-key"


pytestmark = pytest.mark.usefixtures("one_thread")  # what `minilab serve` picks for small models


@pytest.fixture(scope="module")
def engine():
    return Engine.load(str(shared_model_dir()))


@pytest.fixture(scope="module")
def server(engine):
    with running_server(create_app(engine, api_key=KEY, max_concurrency=4, max_queue=64)) as url:
        yield url


def slow(engine: Engine, delay: float, hold: threading.Event | None = None) -> Engine:
    """The same engine, sleeping `delay` seconds per token and never meeting a stop token: it keeps
    the decoder busy for exactly max_tokens x delay unless cancelled. With `hold`, every token
    after the first delta also waits until `hold` is set: busy for as long as a test needs, however
    slowly a loaded machine runs the test's own requests."""
    e = copy.copy(engine)
    e.stop_ids = []

    def reply(ids, params, chat=False):
        r = Engine.reply(e, ids, params, chat=chat)
        push, sent = r.push, []

        def paced(token_id):  # every decoded token, batched or not, goes through here
            time.sleep(delay)
            if hold is not None and sent:
                hold.wait(30)
            delta = push(token_id)
            if delta is not None:
                sent.append(delta)
            return delta

        r.push = paced
        return r

    e.reply = reply
    return e


def test_openai_client_acceptance(server, engine):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [engine.name]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]
    resp = client.chat.completions.create(model=engine.name, messages=messages, temperature=0, max_tokens=24)
    text = resp.choices[0].message.content
    ids = engine.chat_prompt(messages)
    assert (text, resp.usage.completion_tokens, resp.choices[0].finish_reason) == \
        engine.complete(ids, SamplingParams(max_tokens=24), chat=True)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.total_tokens == len(ids) + resp.usage.completion_tokens
    # streamed: chunks reassemble to the non-streamed greedy text; finish reason and usage at the end
    chunks = list(client.chat.completions.create(model=engine.name, messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    # completion, and its stream
    comp = client.completions.create(model=engine.name, prompt="the cat", temperature=0, max_tokens=10)
    expect = engine.complete(engine.encode("the cat"), SamplingParams(max_tokens=10))
    assert (comp.choices[0].text, comp.usage.completion_tokens, comp.choices[0].finish_reason) == expect
    streamed = client.completions.create(model=engine.name, prompt="the cat", temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expect[0]
    # seeded sampling reproduces
    kw = dict(model=engine.name, messages=messages, temperature=1.0, top_p=0.9, max_tokens=16, seed=11)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b


def _expect_status(exc_type, status, fn):
    with pytest.raises(exc_type) as info:
        fn()
    assert info.value.status_code == status
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, engine):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]

    def still_serving():
        r = client.chat.completions.create(model=engine.name, messages=msgs, temperature=0, max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")

    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    still_serving()
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    _expect_status(openai.AuthenticationError, 401, lambda: bad_key.models.list())
    still_serving()
    err = _expect_status(openai.NotFoundError, 404, lambda: client.chat.completions.create(
        model="no-such-model", messages=msgs))
    assert err["code"] == "model_not_found"
    long = " ".join(["the cat sat on a mat"] * 200)
    err = _expect_status(openai.APIStatusError, 413, lambda: client.chat.completions.create(
        model=engine.name, messages=[{"role": "user", "content": long}]))
    assert err["code"] == "context_length_exceeded"
    still_serving()
    for bad in ({"max_tokens": 0}, {"max_tokens": 10_000}, {"temperature": -0.5}, {"top_p": 0}, {"n": 2}):
        err = _expect_status(openai.UnprocessableEntityError, 422, lambda bad=bad: client.chat.completions.create(
            model=engine.name, messages=msgs, **bad))
        assert err["param"] in bad
    _expect_status(openai.UnprocessableEntityError, 422, lambda: client.completions.create(
        model=engine.name, prompt="x", max_tokens=-1))
    r = httpx.post(f"{server}/v1/completions", content=b"x" * (2 << 20), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413
    assert httpx.get(f"{server}/v1/nothing-here").status_code == 404
    still_serving()
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["failed"] == 0


def test_raw_sse_chunk_format(server, engine):
    body = {"model": engine.name, "messages": [{"role": "user", "content": "rain"}], "stream": True,
            "temperature": 0, "max_tokens": 8}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"][0]["delta"] == {}


@pytest.mark.parametrize("batching", [True, False], ids=["continuous-batch", "thread-pool"])
def test_full_queue_gets_429_and_a_disconnected_stream_stops(engine, batching, monkeypatch):
    """Both decoders: our models' continuous batch, and the thread pool that serves models which
    cannot batch (transformers-backed ones)."""
    import minilab.generate

    monkeypatch.setattr(minilab.generate, "supports_continuous_batching", lambda model: batching)
    hold = threading.Event()
    app = create_app(slow(engine, 0.02, hold), max_concurrency=1, max_queue=0)
    assert app.state.scheduler.batching is batching
    body = {"model": engine.name, "prompt": "the", "stream": True, "temperature": 0, "max_tokens": 100}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            # it is generating now. The line iterator stays referenced until the stream closes: a
            # discarded one is finalised whenever the garbage collector gets to it, and closing
            # it closes the connection, which the server rightly takes for a client gone
            lines = first.iter_lines()
            next(lines)
            r = http.post("/v1/completions", json={**body, "stream": False})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        hold.set()
        # the client closed its stream: the decoder stops long before 100 tokens x 20 ms
        deadline = time.monotonic() + 5
        while (h := http.get("/health").json())["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert h["running"] == 0 and h["cancelled"] == 1 and h["rejected"] == 1
        assert h["tokens"] == 0  # the cancelled request never finished
        r = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_load_200_requests_from_32_clients(engine, record_property):
    """Bounded load on loopback: every request answered in full, no error; p50/p99 recorded."""
    app = create_app(engine, max_concurrency=4, max_queue=64)

    async def run(url: str) -> list[float]:
        sem, latencies = asyncio.Semaphore(32), []
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            async def one(i: int) -> None:
                async with sem:
                    t0 = time.perf_counter()
                    body = {"model": engine.name, "messages": [{"role": "user", "content": f"the cat {i}"}],
                            "max_tokens": 8, "temperature": 0.8, "seed": i, "stream": i % 2 == 0}
                    r = await http.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    if body["stream"]:
                        assert r.text.rstrip().endswith("data: [DONE]")
                    else:
                        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                    latencies.append(time.perf_counter() - t0)
            await asyncio.gather(*(one(i) for i in range(200)))
        return latencies

    with running_server(app) as url:
        t0 = time.perf_counter()
        lat = asyncio.run(run(url))
        wall = time.perf_counter() - t0
        health = httpx.get(f"{url}/health").json()
    assert len(lat) == 200 and health["completed"] == 200 and health["failed"] == health["rejected"] == 0
    q = statistics.quantiles(lat, n=100)
    record_property("load_p50_s", round(q[49], 4))
    record_property("load_p99_s", round(q[98], 4))
    print(f"\nload: 200 requests / 32 clients in {wall:.2f}s, p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms")


def test_startup_warning_and_remote_guard(engine, caplog, capsys, tmp_path):
    from fastapi.testclient import TestClient

    from minilab.cli import main as cli

    e = copy.copy(engine)
    e.warnings = ["the tokenizer has no chat_template: chat uses the fallback plain transcript format"]
    with caplog.at_level("WARNING", logger="minilab.serve"), \
            TestClient(create_app(e), base_url="http://localhost") as client:
        assert client.get("/health").json()["warnings"] == e.warnings
        page = client.get("/").text
        assert "<title>minilab chat</title>" in page and "{{" not in page
        # the page's sampling fields start at `minilab chat`'s defaults (sampling.CHAT_SAMPLING)
        assert 'id="temperature" type="number" min="0" max="2" step="0.1" value="0.3"' in page
    assert "fallback plain transcript" in caplog.text
    assert cli(["serve", str(tmp_path / "not-loaded"), "--host", "0.0.0.0"]) == 1
    assert "without an API key" in capsys.readouterr().err


def test_serve_port_0_logs_the_port_it_bound(engine, monkeypatch, caplog):
    """`minilab serve --port 0` names the free port it got (was: 'on http://127.0.0.1:0/')."""
    import threading

    import uvicorn

    from minilab.cli import main as cli

    monkeypatch.setattr("minilab.inference.engine_from_args", lambda args: engine)
    real_run, seen = uvicorn.Server.run, {}

    def run(self, sockets=None):  # serve for real, ask /health on the bound port, then stop
        thread = threading.Thread(target=real_run, args=(self, sockets), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not self.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        seen["port"] = (sockets[0] if sockets else self.servers[0].sockets[0]).getsockname()[1]
        seen["health"] = httpx.get(f"http://127.0.0.1:{seen['port']}/health").status_code
        self.should_exit = True
        thread.join(timeout=15)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    with caplog.at_level("INFO", logger="minilab.serve"):
        assert cli(["serve", "any-model", "--port", "0", "--log-level", "warning"]) == 0
    assert seen["port"] != 0 and seen["health"] == 200
    assert f"on http://127.0.0.1:{seen['port']}/ (chat page)" in caplog.text
    assert "answering Host names: localhost and IP addresses" in caplog.text  # DNS rebinding guard


def test_concurrent_requests_decode_together_with_their_own_answers(engine):
    """Requests arriving together share decoding steps (continuous batching), and each gets the
    answer it gets alone: greedy and seeded sampling, different prompts and max_tokens."""
    app = create_app(engine, max_concurrency=4, max_queue=16)
    bodies = [{"model": engine.name, "prompt": p, "max_tokens": n, "temperature": t, "seed": 5}
              for p, n, t in (("the cat", 12, 0), ("a dog ran far away", 7, 0), ("the", 16, 0.9),
                              ("far", 3, 0), ("the cat sat on the mat and", 10, 1.1), ("dog", 9, 0))]
    alone = [engine.complete(engine.encode(b["prompt"]), SamplingParams(max_tokens=b["max_tokens"],
                             temperature=b["temperature"], seed=5)) for b in bodies]

    async def run(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            rs = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
            return [r.json() for r in rs] + [(await http.get("/health")).json()]

    with running_server(app) as url:
        *answers, health = asyncio.run(run(url))
    got = [(a["choices"][0]["text"], a["usage"]["completion_tokens"], a["choices"][0]["finish_reason"])
           for a in answers]
    assert got == alone
    assert health["batching"] and health["batch_peak"] >= 2 and health["completed"] == len(bodies)


def test_other_hosts_and_cross_origin_pages_are_refused_before_generation(engine):
    """Issue 13: a loopback server without a key answered any Host (DNS rebinding) and any web
    page's "simple" POST (text/plain, `Origin: http://evil.example.com` -> 200 with text)."""
    body = json.dumps({"model": engine.name, "prompt": "the", "max_tokens": 2, "temperature": 0})
    evil = "http://evil.example.com"
    with running_server(create_app(engine, max_concurrency=2)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        own = url.removeprefix("http://")  # 127.0.0.1:PORT
        port = own.rsplit(":", 1)[1]

        def post(path: str = "/v1/completions", content_type: str = "application/json", **headers: str):
            return http.post(path, content=body, headers={"Content-Type": content_type, **headers})

        for r, status, code in [
            (post(Host="evil.example.com"), 400, "host_not_allowed"),  # rebinding: the page's own name
            (post(Host=f"evil.example.com:{port}", Origin=f"http://evil.example.com:{port}"), 400,
             "host_not_allowed"),
            (post(content_type="text/plain", Origin=evil), 403, "origin_not_allowed"),  # the finding
            (post(Origin=evil), 403, "origin_not_allowed"),
            (post("/v1/chat/completions", Origin="null"), 403, "origin_not_allowed"),  # sandboxed frame, file://
            (http.options("/v1/completions", headers={"Origin": evil, "Access-Control-Request-Method": "POST"}),
             403, "origin_not_allowed"),
            (post(content_type="text/plain"), 415, "unsupported_media_type"),  # a form or text post, no Origin
            (http.post("/v1/completions", data={"model": engine.name}), 415, "unsupported_media_type"),
        ]:
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
            assert "access-control-allow-origin" not in r.headers
        assert "--allowed-hosts evil.example.com" in post(Host="evil.example.com").json()["error"]["message"]
        assert f"--cors-origin {evil}" in post(Origin=evil).json()["error"]["message"]
        assert http.get("/health").json()["completed"] == 0  # nothing refused reached the model
        # what stays open: no Origin (curl, SDKs), the page's own origin (the chat page at /),
        # localhost and IP literals on any port (ssh tunnels), a JSON content type with parameters
        for headers in ({}, {"Origin": url}, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
                        {"Host": "localhost:9999"}, {"Host": f"[::1]:{port}"}, {"Host": "10.1.2.3"}):
            r = post(content_type="application/json; charset=utf-8", **headers)
            assert r.status_code == 200, (headers, r.text)
        assert http.get("/", headers={"Host": f"localhost:{port}"}).status_code == 200
        assert http.get("/health", headers={"Host": "evil.example.com"}).status_code == 400


def test_cors_only_for_configured_origins_and_any_host_with_a_key(engine):
    from minilab.serve.guard import trusted_hosts

    app_origin = "http://app.example.com:3000"
    body = {"model": engine.name, "prompt": "the", "max_tokens": 2, "temperature": 0}
    app = create_app(engine, api_key=KEY, cors_origins=[app_origin])
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        pre = http.options("/v1/completions", headers={"Origin": app_origin, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == app_origin
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        auth = {"Authorization": f"Bearer {KEY}"}
        r = http.post("/v1/completions", json=body, headers={"Origin": app_origin, **auth})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        assert http.post("/v1/completions", json=body, headers={"Origin": "http://evil.example.com", **auth}) \
            .status_code == 403
        # with a key, any Host name: the key is what protects (a rebinding page does not know it)
        assert http.post("/v1/completions", json=body, headers={"Host": "gpu-box.example.org", **auth}) \
            .status_code == 200
    assert trusted_hosts("127.0.0.1", KEY) is None and trusted_hosts("127.0.0.1", None, ["*"]) is None
    assert trusted_hosts("127.0.0.1", KEY, ["api.example.org"]) == {"api.example.org", "127.0.0.1", "localhost"}
    import socket

    assert socket.gethostname().lower() in trusted_hosts("0.0.0.0", None)  # --allow-remote without a key
    assert "box.lan" in trusted_hosts("box.lan", None)


def test_bodies_that_broke_the_server_get_4xx_and_a_hangup_one_quiet_line(engine, caplog):
    """Issue 13: seed ≥ 2**64 and 100,000 nested '[' were 500s; a client hanging up mid-body
    logged a full ASGI traceback."""
    import logging
    import socket

    msgs = [{"role": "user", "content": "hi"}]
    with running_server(create_app(engine)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for seed in (2**64, -1):
            r = http.post("/v1/chat/completions", json={"model": engine.name, "messages": msgs, "seed": seed})
            assert r.status_code == 422 and r.json()["error"]["param"] == "seed", r.text
        r = http.post("/v1/chat/completions", json={"model": engine.name, "messages": msgs, "seed": 2**64 - 1,
                                                   "max_tokens": 2})
        assert r.status_code == 200
        r = http.post("/v1/completions", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(caplog.handler)
        try:
            with caplog.at_level("INFO", logger="minilab.serve"):
                host, port = url.removeprefix("http://").split(":")
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                              "application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":".encode())
                    time.sleep(0.2)
                deadline = time.monotonic() + 10
                while "went away" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.02)
        finally:
            uvicorn_log.removeHandler(caplog.handler)
        assert http.get("/health").json()["failed"] == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    assert [r.getMessage() for r in caplog.records if "went away" in r.getMessage()] != []


@pytest.mark.parametrize("argv, message", [
    (["serve", "m", "--port", "99999"], "--port: must be in 0..65535, got 99999"),
    (["serve", "m", "--port", "-5"], "--port: must be in 0..65535, got -5"),
    (["serve", "m", "--max-body-bytes", "-1"], "must be ≥ 1, got -1"),
    (["serve", "m", "--max-concurrency", "0"], "must be ≥ 1, got 0"),
    (["serve", "m", "--max-queue", "-1"], "must be ≥ 0, got -1"),
    (["serve", "m", "--cors-origin", "http://app.example.com/page"], "is not an origin"),
    (["serve", "m", "--allowed-hosts", "http://x/"], "is not a host name"),
    (["generate", "m", "--prompt", "x", "--seed", str(2**64)], "--seed: must be in 0..18446744073709551615"),
    (["generate", "m", "--prompt", "x", "--seed", "-1"], "--seed: must be in 0.."),
])
def test_out_of_range_flags_are_one_line_usage_errors(argv, message, capsys):
    from minilab.cli import main as cli

    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
