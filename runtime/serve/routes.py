"""The HTTP side: routes, authentication, CORS, streaming as server-sent events, OpenAI-shaped
answers and errors, the request log; and Server, which binds it all to a socket. Everything that
knows about HTTP is here (the standard library's threading server: one thread per connection,
which parses, validates, tokenizes and then waits on its job's events; it watches its socket, so
a client that goes away cancels its job and the scheduler frees the sequence on its next step)."""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from slim.runtime.inference import Done, Event, Failed, Model, Piece
from slim.runtime.serve.logs import log_internal_error, log_request
from slim.runtime.serve.pool import ModelPool, ModelSpec, Served
from slim.runtime.serve.requests import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    model_name,
    parse_chat,
    parse_completion,
    parse_embeddings,
)
from slim.runtime.serve.scheduler import Job
from slim.runtime.serve.tools import parse_tool_calls

__all__ = ["MAX_BODY_BYTES", "Server"]

MAX_BODY_BYTES = 4 * 1024 * 1024
_POLL_S = 0.1
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Server:
    """The HTTP routes over a ModelPool (or over one model the caller loaded: `Server(model, names)`,
    where `model_names` are the names requests may give in "model", the first its id)."""

    def __init__(
        self,
        models: ModelPool | Model,
        model_names: Sequence[str] = (),
        *,
        api_key: str | None = None,
        cors_origin: str | None = None,
        queue_size: int = 64,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.pool = (
            models if isinstance(models, ModelPool) else ModelPool.of(models, model_names, queue_size=queue_size)
        )
        self.api_key = api_key
        self.cors_origin = cors_origin
        self.max_body_bytes = max_body_bytes
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def bind(self, host: str = "127.0.0.1", port: int = 8080) -> tuple[str, int]:
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = _HTTPServer((host, port), handler)
        bound_host, bound_port = self.httpd.server_address[:2]
        return str(bound_host), int(bound_port)

    def serve(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Bind and serve until shutdown() or KeyboardInterrupt."""
        if self.httpd is None:
            self.bind(host, port)
        assert self.httpd is not None
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.pool.close()
            self.httpd.server_close()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve on a background thread; returns the bound address."""
        address = self.bind(host, port)
        self._thread = threading.Thread(target=self.serve, name="slim-http", daemon=True)
        self._thread.start()
        return address

    def shutdown(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def model_entry(self, spec: ModelSpec) -> dict[str, Any]:
        """OpenAI's model object, plus `state` (loaded, loading or unloaded) and the other names."""
        return {
            "id": spec.id,
            "object": "model",
            "created": int(spec.path.stat().st_mtime) if spec.path.exists() else 0,
            "owned_by": "slim",
            "state": self.pool.state(spec),
            "aliases": spec.names[1:],
        }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connecting at once must not be refused


def _client_gone(sock: socket.socket) -> bool:
    """True when the peer closed its side (or reset) the connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(BaseHTTPRequestHandler):
    app: Server
    protocol_version = "HTTP/1.1"
    server_version = "slim"
    sys_version = ""
    disable_nagle_algorithm = True  # each streamed token goes out at once, not after the last one's ACK

    # ---- the request log --------------------------------------------------------------------

    def handle_one_request(self) -> None:
        """One request, then its log line (none for a connection closed before a request came)."""
        self._started = time.monotonic()
        self._status: int | None = None
        self._model: str | None = None
        self._tokens: tuple[int | None, int | None] = (None, None)
        self.command = None  # type: ignore[assignment]
        try:
            super().handle_one_request()
        finally:
            if self.command:
                log_request(
                    self.command,
                    self.path.split("?", 1)[0],
                    self._model,
                    self._status,
                    *self._tokens,
                    time.monotonic() - self._started,
                )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if isinstance(code, int) else None

    def log_message(self, format: str, *args: Any) -> None:  # the request line above says it all
        pass

    # ---- plumbing ---------------------------------------------------------------------------

    def _headers(self, status: int, content_type: str, length: int | None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.close_connection = True
        if self.app.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.app.cors_origin)
            self.send_header("Vary", "Origin")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, status: int, document: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(document, ensure_ascii=False).encode()
        self._headers(status, "application/json", len(data), extra)
        self.wfile.write(data)

    def _error(self, error: APIError) -> None:
        self._json(error.status, error.body(), error.headers)

    def _internal_error(self, exc: Exception) -> None:
        log_internal_error(f"{self.command} {self._route()}", exc)
        self.close_connection = True
        self._error(APIError(500, f"internal error: {exc.__class__.__name__}: {exc}", "server_error"))

    def _authorized(self) -> bool:
        key = self.app.api_key
        if key is None:
            return True
        import hmac

        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())

    def _unauthorized(self) -> APIError:
        return APIError(
            401,
            "missing or wrong API key (send Authorization: Bearer KEY)",
            "authentication_error",
            code="invalid_api_key",
        )

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _read_body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length", code="length_required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise bad_request("bad Content-Length", None, "invalid_request")
        if length > self.app.max_body_bytes:
            self.close_connection = True  # the body is not read
            raise APIError(
                413,
                f"the request body is {length} bytes; the limit is {self.app.max_body_bytes}",
                code="request_too_large",
            )
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"the body is not valid JSON: {exc}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object", None, "invalid_type")
        return body

    # ---- verbs ------------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:
        if not self.app.cors_origin:
            self._error(APIError(405, "method not allowed", code="method_not_allowed"))
            return
        self._headers(
            204,
            "text/plain",
            0,
            {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )

    def do_GET(self) -> None:
        route = self._route()
        if route == "/health":
            self._json(200, {"status": "ok", **self.app.pool.health()})
            return
        if not self._authorized():
            self._error(self._unauthorized())
            return
        if route == "/v1/models":
            self._json(200, {"object": "list", "data": [self.app.model_entry(s) for s in self.app.pool.listing()]})
        elif route.startswith("/v1/models/"):
            try:
                self._json(200, self.app.model_entry(self.app.pool.spec(route[len("/v1/models/") :])))
            except APIError as error:
                self._error(error)
        else:
            self._error(APIError(404, f"no route GET {route}", code="not_found"))

    def do_POST(self) -> None:
        route = self._route()
        try:
            if not self._authorized():
                self.close_connection = True
                raise self._unauthorized()
            if route not in _ROUTES:
                self.close_connection = True
                raise APIError(404, f"no route POST {route}", code="not_found")
            body = self._read_body()
            self._model = model_name(body)
            served = self.app.pool.acquire(self._model)  # loads the model if need be
        except APIError as error:
            self._error(error)
            return
        except Exception as exc:  # a bug must not cost the client its answer
            self._internal_error(exc)
            return
        try:
            self._answer(served, route, body)
        finally:
            self.app.pool.release(served)

    def _answer(self, served: Served, route: str, body: dict[str, Any]) -> None:
        try:
            if route == "/v1/embeddings":
                self._embeddings(served, body)
                return
            chat = route == "/v1/chat/completions"
            request: ChatRequest | CompletionRequest
            if chat:
                request = parse_chat(body)
                job = served.chat_job(request)
            else:
                request = parse_completion(body)
                job = served.completion_job(request)
            served.scheduler.submit(job)
        except APIError as error:
            self._error(error)
            return
        except Exception as exc:  # a bug must not cost the client its answer
            self._internal_error(exc)
            return
        try:
            if request.stream:
                self._stream(job, served.id, chat, request.include_usage)
            else:
                self._whole(job, served.id, chat)
        except (BrokenPipeError, ConnectionError, TimeoutError, OSError):
            self.close_connection = True
        finally:
            job.cancelled.set()  # a no-op for a finished job; frees the sequence of an abandoned one

    # ---- answers ----------------------------------------------------------------------------

    def _embeddings(self, served: Served, body: dict[str, Any]) -> None:
        import base64
        import struct

        request = parse_embeddings(body)
        inputs = served.embedding_inputs(request)
        data = []
        for i, tokens in enumerate(inputs):
            vector: Any = served.embed(tokens)
            if request.encoding_format == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        n = sum(len(t) for t in inputs)
        self._tokens = (n, None)
        self._json(
            200, {"object": "list", "data": data, "model": served.id, "usage": {"prompt_tokens": n, "total_tokens": n}}
        )

    def _events(self, job: Job) -> Iterator[Event]:
        """The job's events; stops (cancelling the job) if the client goes away meanwhile."""
        checked = time.monotonic()
        self._tokens = (len(job.prompt), 0)
        while True:
            try:
                event: Event | None = job.events.get(timeout=_POLL_S)
            except queue.Empty:
                event = None
            if time.monotonic() - checked >= _POLL_S:
                checked = time.monotonic()
                if _client_gone(self.connection):
                    job.cancelled.set()
                    raise ConnectionError("the client went away")
            if event is None:
                continue
            if isinstance(event, Done):
                self._tokens = (len(job.prompt), event.completion_tokens)
            yield event
            if not isinstance(event, Piece):
                return

    def _usage(self, job: Job, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": len(job.prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt) + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
        }

    def _failed(self, event: Failed) -> APIError:
        error = event.error
        return error if isinstance(error, APIError) else APIError(500, f"internal error: {error}", "server_error")

    def _whole(self, job: Job, model_id: str, chat: bool) -> None:
        pieces, logprobs = [], []
        reason, n = "stop", 0
        for event in self._events(job):
            if isinstance(event, Piece):
                pieces.append(event.text)
                if event.logprobs is not None:
                    logprobs.append(event.logprobs)
            elif isinstance(event, Failed):
                self._error(self._failed(event))
                return
            else:
                reason, n = event.finish_reason, event.completion_tokens
        text = "".join(pieces)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if job.tools:
                content, calls = parse_tool_calls(text)
                if calls:
                    message, reason = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            choice = {
                "index": 0,
                "message": message,
                "logprobs": {"content": logprobs} if job.top_logprobs is not None else None,
                "finish_reason": reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": _completion_logprobs(logprobs) if job.top_logprobs is not None else None,
                "finish_reason": reason,
            }
        self._json(
            200,
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "system_fingerprint": "slim",
                "choices": [choice],
                "usage": self._usage(job, n),
            },
        )

    def _stream(self, job: Job, model_id: str, chat: bool, include_usage: bool) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        started = False

        def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
            chunk: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model_id,
                "system_fingerprint": "slim",
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        def start() -> None:
            nonlocal started
            if not started:
                self._headers(200, "text/event-stream", None)
                if chat:
                    send(
                        [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                started = True

        held: list[str] = []  # a reply that may hold tool calls is sent when it is complete
        for event in self._events(job):
            if isinstance(event, Failed):
                error = self._failed(event)
                if not started:
                    self._error(error)
                    return
                self.wfile.write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
                break
            start()
            if isinstance(event, Piece) and job.tools:
                held.append(event.text)
            elif isinstance(event, Piece):
                lp = event.logprobs
                if chat:
                    send(
                        [
                            {
                                "index": 0,
                                "delta": {"content": event.text},
                                "logprobs": {"content": [lp]} if lp is not None else None,
                                "finish_reason": None,
                            }
                        ]
                    )
                else:
                    send(
                        [
                            {
                                "index": 0,
                                "text": event.text,
                                "logprobs": _completion_logprobs([lp]) if lp is not None else None,
                                "finish_reason": None,
                            }
                        ]
                    )
            else:
                reason = event.finish_reason
                if job.tools:
                    content, calls = parse_tool_calls("".join(held))
                    if calls:
                        reason = "tool_calls"
                        send(
                            [
                                {
                                    "index": 0,
                                    "delta": {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    if content:
                        send([{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}])
                if chat:
                    send([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])
                else:
                    send([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}])
                if include_usage:
                    send([], self._usage(job, event.completion_tokens))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions logprobs layout."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }
