"""One generation for one HTTP request, on the event loop: the model taken from the pool and the
job built (tokenizing, rendering the chat template, loading the model if need be) on a worker
thread, the job's events brought from the scheduler's thread to the request's task, and the
client watched meanwhile, so that one that goes away cancels its job (the scheduler frees the
sequence on its next step). Also what every surface answers with: JSON, a stream of chunks, and
the request log's fields."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from slim.runtime.inference import Done, Event, Failed, Piece, ThinkingSplitter
from slim.runtime.serve.metrics import Metrics
from slim.runtime.serve.pool import ModelPool, Served
from slim.runtime.serve.requests import APIError
from slim.runtime.serve.scheduler import Job

__all__ = [
    "ClientGone",
    "EventStream",
    "Generation",
    "Reply",
    "RequestLog",
    "failure",
    "generation",
    "generations",
    "json_answer",
    "request_log",
]


@dataclass
class RequestLog:
    """What the request's log line says besides method, route and status (the routes fill it in)."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    arrived: float = field(default_factory=time.monotonic)


def request_log(request: Request) -> RequestLog:
    entry = request.scope.get("slim.log")
    if entry is None:
        entry = request.scope["slim.log"] = RequestLog()
    return entry


class Reply(NamedTuple):
    """A whole reply: the answer, the thought (None when there was none), how it ended, logprobs."""

    text: str
    thought: str | None
    last: Done
    logprobs: list[dict[str, Any]]


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class _LoopQueue:
    """Events put by the scheduler's thread, got by a task on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()

    def put(self, event: Event | None, /) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event | None:
        return await self._queue.get()


class Generation:
    """A submitted job and the model it runs on. begin() waits for the first event (before a
    stream's status is sent); events() yields the job's events up to Done or Failed, counting them
    in the metrics, and raises ClientGone when the client goes away; close() (always, once)
    cancels what is left of the job and gives the model back to the pool, with the request's
    keep_alive if it set one."""

    def __init__(self, request: Request, pool: ModelPool, served: Served, job: Job) -> None:
        self.request, self.pool, self.served, self.job = request, pool, served, job
        self.id = served.id
        self._queue = _LoopQueue(asyncio.get_running_loop())
        job.events = self._queue
        self._log = request_log(request)
        self._log.prompt_tokens = len(job.prompt)
        self._log.completion_tokens = self._log.completion_tokens or 0
        self._metrics: Metrics = request.app.state.metrics
        self._last_piece: float | None = None
        self._watch: _ClientWatch | None = None
        self._first: Event | None = None
        self._closed = False
        self.first_at: float | None = None  # time.monotonic() when the first event came
        self.keep_alive: float | None = None  # the model's keep-alive from now on, when the request sets one

    def start(self) -> None:
        try:
            self.served.scheduler.submit(self.job)
        except BaseException:
            self.close()
            raise
        self._watch = _ClientWatch.of(self.request)
        self._watch.running.add(self)

    def client_gone(self) -> None:
        self.job.cancelled.set()
        self._queue.put(None)

    async def begin(self) -> None:
        """Wait for the first event, before a streamed answer's status is sent: a job that fails at
        once is answered with its error's status (the APIError is raised, the generation closed)."""
        try:
            first = await self._queue.get()
            self.first_at = time.monotonic()
            if first is None:
                raise ClientGone()
            if isinstance(first, Failed):
                raise failure(first)
        except BaseException:
            self.close()
            raise
        self._first = first

    async def events(self) -> AsyncIterator[Event]:
        """The job's events; for a thinking template's reply, each piece cut into its thought and
        its answer (Piece.thinking), with the <think> markers left out."""
        splitter = None if self.job.thinking is None else ThinkingSplitter(self.job.thinking)
        while True:
            event: Event | None
            if self._first is not None:
                event, self._first = self._first, None
            else:
                event = await self._queue.get()
                if self.first_at is None:
                    self.first_at = time.monotonic()
            if event is None:
                raise ClientGone()
            self._count(event)
            if splitter is None:
                yield event
            elif isinstance(event, Piece):
                parts = splitter.feed(event.text)
                if not parts and event.logprobs is not None:
                    parts = [(False, "")]
                for i, (thought, text) in enumerate(parts):
                    yield Piece(text, event.logprobs if i == 0 else None, thought)
            else:
                for thought, text in splitter.flush():
                    yield Piece(text, None, thought)
                yield event
            if not isinstance(event, Piece):
                return

    def _count(self, event: Event) -> None:
        """The metrics of an event: time to the first token, between tokens, and the token counts."""
        labels = (("model", self.id),)
        if isinstance(event, Piece):
            now = time.monotonic()
            if self._last_piece is None:
                self._metrics.first_token.observe(labels, now - self._log.arrived)
            else:
                self._metrics.per_token.observe(labels, now - self._last_piece)
            self._last_piece = now
        elif isinstance(event, Done):
            self._log.completion_tokens = (self._log.completion_tokens or 0) + event.completion_tokens
            job = self.job
            self._metrics.generated(self.id, len(job.prompt), job.cached_tokens, event.completion_tokens)

    async def reply(self) -> Reply:
        """The whole reply: its answer, its thought, the last event, and the logprobs of its tokens;
        a generation that failed raises its error as the APIError the surfaces answer with."""
        pieces: list[str] = []
        thoughts: list[str] = []
        logprobs = []
        async for event in self.events():
            if isinstance(event, Piece):
                (thoughts if event.thinking else pieces).append(event.text)
                if event.logprobs is not None:
                    logprobs.append(event.logprobs)
            elif isinstance(event, Failed):
                raise failure(event)
            else:
                return Reply("".join(pieces), "".join(thoughts) or None, event, logprobs)
        raise AssertionError("events() ends with Done or Failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.job.cancelled.set()  # a no-op for a finished job; frees the sequence of an abandoned one
        if self._watch is not None:
            self._watch.done(self)
        self.pool.release(self.served, self.keep_alive)


class _ClientWatch:
    """A task that waits for a request's client to go away (its body has been read: what comes now
    is the end) and then stops the request's generations; it ends with the last of them."""

    def __init__(self, request: Request) -> None:
        self.running: set[Generation] = set()
        self._task = asyncio.get_running_loop().create_task(self._watch(request))

    @classmethod
    def of(cls, request: Request) -> _ClientWatch:
        watch = request.scope.get("slim.watch")
        if watch is None:
            watch = request.scope["slim.watch"] = cls(request)
        return watch

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for running in list(self.running):
            running.client_gone()

    def done(self, running: Generation) -> None:
        self.running.discard(running)
        if not self.running:
            self._task.cancel()


async def generation(request: Request, pool: ModelPool, model: str, build: Callable[[Served], Job]) -> Generation:
    """The model `model` taken from the pool (loaded if need be) and the job `build` makes for it,
    submitted; both on a worker thread, so that neither a load nor a long prompt holds up the loop."""
    return (await generations(request, pool, model, build, 1))[0]


async def generations(
    request: Request, pool: ModelPool, model: str, build: Callable[[Served], Job], n: int
) -> list[Generation]:
    """`n` generations of the same job (OpenAI's n choices), each seeded apart when a seed is given."""
    request_log(request).model = model

    def prepare() -> list[tuple[Served, Job]]:
        made: list[tuple[Served, Job]] = []
        try:
            for i in range(n):
                served = pool.acquire(model)
                try:
                    made.append((served, build(served) if i == 0 else _sibling(made[0][1], i)))
                except BaseException:
                    pool.release(served)
                    raise
            return made
        except BaseException:
            for served, _ in made:
                pool.release(served)
            raise

    running = [Generation(request, pool, served, job) for served, job in await run_in_threadpool(prepare)]
    for i, one in enumerate(running):
        try:
            one.start()
        except BaseException:
            for other in running[i + 1 :]:
                other.close()
            raise
    return running


def _sibling(job: Job, i: int) -> Job:
    """Another choice of the same job: its own events and cancellation, its seed moved by i."""
    seed = None if job.params.seed is None else (job.params.seed + i) % 0xFFFFFFFF
    return replace(job, params=job.params.with_options(seed=seed), cancelled=threading.Event())


def failure(event: Failed) -> APIError:
    error = event.error
    return error if isinstance(error, APIError) else APIError(500, f"internal error: {error}", "server_error")


def json_answer(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(document, status, headers)


class EventStream(Response):
    """A streamed answer (server-sent events, NDJSON): each chunk is sent as it comes; the chunks'
    generator ends (and closes its Generation) when the client goes away."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], media_type: str = "text/event-stream") -> None:
        self.chunks = chunks
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:  # a client that stopped reading (the send timed out) frees its generation now
            await self.chunks.aclose()
