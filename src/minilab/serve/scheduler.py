"""The request scheduler behind `minilab serve`: decoding off the event loop, admission control
(at most `max_concurrency` running and `max_queue` waiting; one more is a 429 at once) and the
counters /health reports. Why it works this way: see `minilab.serve.app`'s docstring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from minilab.inference import Delta, Engine, SamplingParams
from minilab.serve import protocol as p

log = logging.getLogger("minilab.serve")
_END = object()


class _Job:
    """One admitted request: what to decode, where its deltas go, and its cancel flag."""

    def __init__(self, ids: list[int], params: SamplingParams, chat: bool, put: Any, cancel: threading.Event):
        self.ids, self.params, self.chat, self.put, self.cancel = ids, params, chat, put, cancel


class Scheduler:
    """Decoding off the event loop, admission control and counters (what /health reports).

    With a model that decodes a left-padded KV cache (our Transformer), one thread runs a
    `ContinuousBatch`: up to `max_concurrency` requests decode together, each joining at the next
    step after it arrives and leaving when its answer ends, so throughput grows with load instead
    of requests taking turns on the CPU. Other models (transformers-backed) decode each request in
    a pool of `max_concurrency` threads."""

    def __init__(self, max_concurrency: int, max_queue: int, engine: Engine | None = None):
        from minilab.generate import supports_continuous_batching

        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be ≥ 1 and max_queue ≥ 0")
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.lock = threading.Lock()
        self.admitted = self.running = 0
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0, "tokens": 0}
        self.cancels: set[threading.Event] = set()
        self.batching = engine is not None and supports_continuous_batching(engine.model)
        self.closing = threading.Event()
        self.batch_peak = 0  # the most requests one decoding step has served
        if self.batching:
            self.pending: queue.Queue[_Job] = queue.Queue()
            self.thread = threading.Thread(target=self._batch_loop, args=(engine,), name="minilab-batch",
                                           daemon=True)
            self.thread.start()
        else:
            self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="minilab-generate")

    def admit(self) -> None:
        with self.lock:
            if self.admitted >= self.max_concurrency + self.max_queue:
                self.counts["rejected"] += 1
                raise p.ApiError(429, f"server busy: {self.max_concurrency} requests running and "
                                      f"{self.max_queue} queued; retry later", type="rate_limit_error",
                                 code="queue_full")
            self.admitted += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"running": self.running, "queued": self.admitted - self.running,
                    "max_concurrency": self.max_concurrency, "max_queue": self.max_queue,
                    "batching": self.batching, "batch_peak": self.batch_peak, **self.counts}

    def start(self, engine: Engine, ids: list[int], params: SamplingParams, chat: bool) -> AsyncIterator[Delta]:
        """Admit one request (429 when full) and hand it to the decoder at once; returns its deltas.
        Admission and the hand-over happen here, not on first iteration, so the counts stay right
        even if the response is never read."""
        self.admit()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us: server shutting down
                loop.call_soon_threadsafe(out.put_nowait, item)

        job = _Job(list(ids), params, chat, put, cancel)
        with self.lock:
            self.cancels.add(cancel)
        if self.closing.is_set():
            self._refuse(job)
        if self.batching:
            self.pending.put(job)
        else:
            try:
                self.executor.submit(self._decode_alone, engine, job)
            except RuntimeError:  # executor shut down
                self._refuse(job)
        return self._drain(out, cancel)

    def _refuse(self, job: _Job) -> None:
        with self.lock:
            self.admitted -= 1
            self.cancels.discard(job.cancel)
        raise p.ApiError(503, "server shutting down", type="server_error")

    def _begin(self) -> None:
        with self.lock:
            self.running += 1

    def _end(self, job: _Job, outcome: str, tokens: int = 0, running: bool = True) -> None:
        with self.lock:
            self.running -= int(running)
            self.admitted -= 1
            self.counts[outcome] += 1
            self.counts["tokens"] += tokens
            self.cancels.discard(job.cancel)
        job.put(_END)

    def _decode_alone(self, engine: Engine, job: _Job) -> None:
        """A worker thread's request: decoded by itself (models without continuous batching)."""
        outcome, tokens = "cancelled", 0
        self._begin()
        try:
            if job.cancel.is_set():
                return
            for d in engine.stream(job.ids, job.params, chat=job.chat, cancelled=job.cancel.is_set):
                job.put(d)
                if d.finish_reason is not None:
                    outcome, tokens = "completed", d.completion_tokens
        except Exception as e:  # surfaces as a 500 on this request only
            outcome = "failed"
            log.exception("generation failed")
            job.put(e)
        finally:
            self._end(job, outcome, tokens)

    def _batch_loop(self, engine: Engine) -> None:
        """The continuous-batching thread: admit waiting requests into free rows, run one step
        for all, route each row's token to its request; repeat."""
        from minilab.generate import ContinuousBatch

        batch = ContinuousBatch(engine.model, engine.stop_ids)
        live: dict[int, tuple[_Job, Any, Any]] = {}  # id(row) -> (job, reply, row)

        def route(job: _Job, reply: Any, row: Any, tok: int | None) -> None:
            if tok is not None:
                delta = reply.push(tok)
                if delta is not None:
                    job.put(delta)
                if reply.stopped:
                    batch.drop(row)
            if row.done is None:
                live[id(row)] = (job, reply, row)
                return
            live.pop(id(row), None)
            end = reply.end()
            job.put(end)
            self._end(job, "completed", end.completion_tokens)

        while not self.closing.is_set():
            try:
                for job, _reply, row in list(live.values()):  # clients that went away leave now
                    if job.cancel.is_set():
                        batch.drop(row)
                        live.pop(id(row))
                        self._end(job, "cancelled")
                while len(batch) < self.max_concurrency:
                    try:
                        job = self.pending.get(timeout=0.05) if not len(batch) else self.pending.get_nowait()
                    except queue.Empty:
                        break
                    if job.cancel.is_set():
                        self._end(job, "cancelled", running=False)
                        continue
                    self._begin()
                    prm = job.params
                    try:  # a request that cannot start fails alone
                        reply = engine.reply(job.ids, prm, chat=job.chat)
                        row, tok = batch.add(job.ids, prm.max_tokens, temperature=prm.temperature, top_k=prm.top_k,
                                             top_p=prm.top_p, repetition_penalty=prm.repetition_penalty,
                                             seed=prm.seed)
                    except Exception as e:
                        log.exception("generation failed")
                        job.put(e)
                        self._end(job, "failed")
                        continue
                    route(job, reply, row, tok)
                for row, tok in batch.step():
                    job, reply, _ = live[id(row)]
                    route(job, reply, row, tok)
                self.batch_peak = max(self.batch_peak, batch.peak)
            except Exception as e:  # every request of the broken batch gets a 500; the server goes on
                log.exception("generation failed")
                for job, _reply, _row in live.values():
                    job.put(e)
                    self._end(job, "failed")
                live.clear()
                batch = ContinuousBatch(engine.model, engine.stop_ids)
        for job, _reply, _row in live.values():
            self._end(job, "cancelled")

    @staticmethod
    async def _drain(out: asyncio.Queue, cancel: threading.Event) -> AsyncIterator[Delta]:
        try:
            while (item := await out.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # client gone or done: decoding stops before its next token

    def shutdown(self) -> None:
        with self.lock:
            for c in self.cancels:
                c.set()
        self.closing.set()
        if self.batching:
            self.thread.join(timeout=30)
            while True:  # requests that never reached the batch
                try:
                    self._end(self.pending.get_nowait(), "cancelled", running=False)
                except queue.Empty:
                    break
        else:
            self.executor.shutdown(wait=True, cancel_futures=True)
