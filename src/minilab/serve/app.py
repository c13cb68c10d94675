"""The FastAPI app behind `minilab serve`: OpenAI-compatible endpoints, a request queue, the chat page.

    app = create_app(Engine.load("my-model"), api_key=None, max_concurrency=8, max_queue=64)
    with running_server(app) as url:          # uvicorn on 127.0.0.1 and a free port, in a thread
        ...

How requests are served (why):
- **Decoding runs off the event loop**, so the loop keeps accepting, streaming and answering
  /health while models compute. Our models decode in one thread as a continuous batch: up to
  `max_concurrency` requests share each step (joining and leaving between steps, see
  `minilab.generate.ContinuousBatch`), each with its own sampler and generator, so a request's
  tokens never depend on what else is being served. Other models decode each request in a pool of
  `max_concurrency` threads.
- **Admission is counted, not queued in memory without bound**: at most `max_concurrency` run and
  `max_queue` wait for a worker; one more gets 429 at once, before any work is done.
- **Workers hand tokens to the loop through an asyncio queue**, so a slow reader delays only its
  own connection, never a worker. A client that goes away cancels its stream: the response
  generator's `finally` sets the request's cancel flag, which the decoder checks before every
  step, and the request's row or worker is freed within one token's time.
- Who may ask is checked first, before any route (`guard.py`): the Host (400) and a browser's
  Origin (403). Then, before admission, in OpenAI's order of concerns: auth (401), body size
  (413), Content-Type application/json (415), JSON (400), schema (422), model name (404), prompt
  length vs context (413), max_tokens (422).
- A chat request with `truncation: "auto"` (OpenAI's Responses API name for it; the chat page
  sends it) gets no 413/422 for a conversation that outgrew the context: its oldest turns are
  dropped and max_tokens capped (`minilab.conversation`), and the response says what was done
  under `minilab.truncation` (the body, or the stream chunk with the finish reason). The
  default, "disabled", keeps OpenAI's errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from minilab.conversation import ContextFull, fit_conversation
from minilab.inference import Delta, Engine
from minilab.sampling import CHAT_SAMPLING
from minilab.serve import protocol as p
from minilab.serve.guard import protect
from minilab.serve.scheduler import Scheduler

log = logging.getLogger("minilab.serve")


# ---- request handling -----------------------------------------------------------------------------
async def _read_json(request: Request, max_body: int) -> Any:
    """The request's JSON body. Only `Content-Type: application/json` (415 otherwise): what a
    browser may send cross-origin without asking first (a "simple" request: text/plain, forms)
    never reaches a model."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise p.ApiError(413, f"request body of {length} bytes exceeds the limit of {max_body}",
                         code="request_too_large")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise p.ApiError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}",
                         code="unsupported_media_type")
    body = await request.body()
    if len(body) > max_body:
        raise p.ApiError(413, f"request body exceeds the limit of {max_body} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise p.ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from None
    except RecursionError:  # the parser's guard against arrays/objects nested ~1000 deep
        raise p.ApiError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.name:
        raise p.ApiError(404, f"The model '{name}' does not exist; this server serves '{engine.name}'",
                         param="model", code="model_not_found")


def _budget(engine: Engine, n_prompt: int, requested: int | None) -> int:
    """max_tokens to use: 413 when the prompt fills the context, 422 when max_tokens cannot fit it."""
    ctx = engine.context_length
    if n_prompt == 0:
        raise p.ApiError(422, "the prompt is empty", param="prompt", code="invalid_value")
    if n_prompt >= ctx:
        raise p.ApiError(413, f"the prompt has {n_prompt} tokens; this model's context is {ctx} tokens "
                              "(including the reply)", param="messages", code="context_length_exceeded")
    if requested is not None and requested > ctx - n_prompt:
        raise p.ApiError(422, f"max_tokens {requested} is out of range: the prompt has {n_prompt} tokens and the "
                              f"context {ctx}, so at most {ctx - n_prompt} new tokens fit",
                         param="max_tokens", code="invalid_value")
    return requested if requested is not None else ctx - n_prompt


def _chat_prompt(engine: Engine, req: p.ChatRequest) -> tuple[list[int], int, dict[str, Any] | None]:
    """(prompt ids, max_tokens, what truncation did: None unless `truncation: "auto"`). Without it,
    a conversation that does not fit is a 413/422, as OpenAI answers; with it, the oldest turns
    are dropped and max_tokens capped (`minilab.conversation.fit_conversation`)."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if req.truncation != "auto":
        ids = engine.chat_prompt(messages)
        return ids, _budget(engine, len(ids), req.requested_tokens()), None
    try:
        fit = fit_conversation(engine, messages, req.requested_tokens())
    except ContextFull as e:
        raise p.ApiError(413, f"{e}; even the system prompt and the latest message alone do not fit",
                         param="messages", code="context_length_exceeded") from None
    if fit.notice:
        log.info("truncation: %s", fit.notice)
    return fit.ids, fit.max_tokens, {"truncation": fit.report()}


def _completion_prompt(engine: Engine, req: p.CompletionRequest) -> tuple[str | list[int], list[int]]:
    """(the prompt as given: text or token ids, its token ids); ids outside the vocabulary are a 422."""
    prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) \
        else req.prompt
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if any(not 0 <= t < engine.model.config.vocab_size for t in ids):
        raise p.ApiError(422, "prompt token ids out of the vocabulary", param="prompt", code="invalid_value")
    return prompt, ids


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _install_error_handlers(app: Any) -> None:
    """Every error leaves as an OpenAI-style JSON error body; a client that hung up gets one log line."""

    @app.exception_handler(p.ApiError)
    async def _api_error(_request: Request, exc: p.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _exc: ClientDisconnect) -> Response:
        # the client hung up before sending its whole body: one quiet line, no traceback, and an
        # answer nobody reads (uvicorn drops what is sent to a closed connection)
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s went away before sending the whole request to %s", client, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(p.ApiError(exc.status_code, str(exc.detail), code=code).body(),
                            status_code=exc.status_code)


def _bearer_check(api_key: str | None) -> Callable[[Request], None]:
    """The per-request API key check (a no-op when the server has no key)."""

    def auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {api_key}":
            raise p.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                             type="authentication_error", code="invalid_api_key")

    return auth


def create_app(engine: Engine, *, api_key: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
               max_body_bytes: int = 1 << 20, host: str = "127.0.0.1", allowed_hosts: Sequence[str] = (),
               cors_origins: Sequence[str] = ()):
    """The FastAPI application serving `engine` on `host`. Workers stop when the app shuts down.
    Requests naming another Host or coming from another web page's origin are refused first
    (`guard.py`: `allowed_hosts` and `cors_origins` widen that)."""
    sched = Scheduler(max_concurrency, max_queue, engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        for w in engine.warnings:
            log.warning("warning: %s", w)
        yield
        sched.shutdown()

    app = FastAPI(title="minilab", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.engine = sched, engine
    protect(app, bind_host=host, api_key=api_key, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    page = resources.files("minilab.serve").joinpath("page.html").read_text(encoding="utf-8")
    for key, value in CHAT_SAMPLING.items():  # the page's defaults are `minilab chat`'s
        page = page.replace("{{" + key + "}}", str(value))
    started = int(time.time())
    _install_error_handlers(app)
    auth = _bearer_check(api_key)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "context_length": engine.context_length,
                "auth": api_key is not None, "warnings": engine.warnings, **sched.stats()}

    def model_card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": started, "owned_by": "minilab"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        auth(request)
        _check_model(engine, name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        auth(request)
        req = p.parse(p.ChatRequest, await _read_json(request, max_body_bytes))
        _check_model(engine, req.model)
        ids, max_tokens, extra = _chat_prompt(engine, req)
        deltas = sched.start(engine, ids, req.sampling(max_tokens), chat=True)
        rid = p.new_id("chatcmpl")
        if req.stream:
            return StreamingResponse(_chat_events(engine, rid, req, deltas, len(ids), extra),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, n, finish = await _collect(deltas)
        return p.chat_response(rid, engine.name, text, finish, len(ids), n, extra)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        auth(request)
        req = p.parse(p.CompletionRequest, await _read_json(request, max_body_bytes))
        _check_model(engine, req.model)
        prompt, ids = _completion_prompt(engine, req)
        params = req.sampling(_budget(engine, len(ids), req.max_tokens))
        deltas = sched.start(engine, ids, params, chat=False)
        rid, created = p.new_id("cmpl"), int(time.time())
        echo = prompt if req.echo and isinstance(prompt, str) else ""
        if req.stream:
            return StreamingResponse(_completion_events(engine, rid, created, req, deltas, len(ids), echo),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, n, finish = await _collect(deltas)
        return p.completion_response(rid, engine.name, echo + text, finish, created, p.usage(len(ids), n))

    return app


async def _chat_events(engine: Engine, rid: str, req: p.ChatRequest, deltas: AsyncIterator[Delta], n_prompt: int,
                       extra: dict[str, Any] | None = None):
    """The stream's chunks; what truncation did (`extra`) rides on the chunk with the finish reason."""
    created, with_usage = int(time.time()), req.wants_usage_chunk()
    last = Delta("", 0)
    try:
        yield _sse(p.chat_chunk(rid, engine.name, created, {"role": "assistant", "content": ""}, None,
                                with_usage))
        async for d in deltas:
            last = d
            if d.text:
                yield _sse(p.chat_chunk(rid, engine.name, created, {"content": d.text}, None, with_usage))
        yield _sse(p.chat_chunk(rid, engine.name, created, {}, last.finish_reason or "stop", with_usage, extra))
        if with_usage:
            yield _sse(p.usage_chunk(rid, engine.name, created, "chat.completion.chunk",
                                     p.usage(n_prompt, last.completion_tokens)))
        yield "data: [DONE]\n\n"
    except Exception as e:  # headers are sent: report the failure inside the stream, as OpenAI does
        yield _sse(p.ApiError(500, f"generation failed: {e}", type="server_error").body())
    finally:
        await deltas.aclose()  # client gone: cancels the worker

async def _completion_events(engine: Engine, rid: str, created: int, req: p.CompletionRequest,
                             deltas: AsyncIterator[Delta], n_prompt: int, echo: str):
    last = Delta("", 0)
    try:
        if echo:
            yield _sse(p.completion_response(rid, engine.name, echo, None, created, None))
        async for d in deltas:
            last = d
            yield _sse(p.completion_response(rid, engine.name, d.text, d.finish_reason, created, None))
        if req.wants_usage_chunk():
            yield _sse(p.usage_chunk(rid, engine.name, created, "text_completion",
                                     p.usage(n_prompt, last.completion_tokens)))
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _sse(p.ApiError(500, f"generation failed: {e}", type="server_error").body())
    finally:
        await deltas.aclose()


async def _collect(deltas: AsyncIterator[Delta]) -> tuple[str, int, str]:
    parts, n, finish = [], 0, "stop"
    async for d in deltas:
        parts.append(d.text)
        n, finish = d.completion_tokens, d.finish_reason or finish
    return "".join(parts), n, finish


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run `app` under uvicorn in a background thread; yields its base URL. `port=0` picks a free
    port (the socket is bound here, so there is no race with another process)."""
    import uvicorn

    from minilab.serve.net import base_url, bind_socket

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="minilab-uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield base_url(host, sock)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
