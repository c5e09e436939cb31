"""The HTTP server: an ASGI app (FastAPI, on uvicorn) made of one router per API surface, and what
every route shares: the API key, CORS, the body size limit, errors in the surface's shape (for
bad input, unknown routes and methods, and internal errors, whose traceback is logged), the
request log line, and Server, which binds it all to a socket and serves it on the event loop
(the surfaces answer there; loading models, tokenizing and embedding run on worker threads).

A local server is reached by every program on the machine and by every web page in its browser,
so before any route runs (_Gate):
- Host: on a loopback address, the Host header must name loopback (localhost, 127.0.0.1, [::1])
  or a host allowed with `allowed_hosts`: a page whose own name was rebound to 127.0.0.1 (DNS
  rebinding) sends its name and is refused (403).
- Origin: a request that a browser made for a page (it carries Origin) is refused (403) unless
  the page is the server's own origin or `cors_origin` allows it.
- Content-Type: a body is JSON. application/json (or +json), none, and curl -d's form type are
  read as JSON; text/plain, multipart and the rest, which a page may send without asking the
  server first, are refused (415).
- The body: read whole (within max_body_bytes) before the route, each part within
  body_timeout; JSON nested deeper than MAX_JSON_DEPTH or holding a lone UTF-16 surrogate is a 400.
- Slow clients: the headers of a request must arrive within header_timeout, and an answer that
  the client does not read for send_timeout is given up (its generation cancelled, its model
  free to unload).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from slim.runtime.inference import Model
from slim.runtime.serve import anthropic_api, ollama_api, openai_api, responses_api, web_ui
from slim.runtime.serve.jobs import RequestLog
from slim.runtime.serve.logs import log_internal_error, log_request
from slim.runtime.serve.metrics import Metrics
from slim.runtime.serve.pool import ModelPool
from slim.runtime.serve.requests import APIError, invalid_body

__all__ = ["LOOPBACK_HOSTS", "MAX_BODY_BYTES", "MAX_JSON_DEPTH", "Server", "create_app"]

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 256  # objects and arrays nested in a body (a JSON schema in it may nest 64 deep)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
JSON_TYPES = ("application/json", "application/x-www-form-urlencoded")  # the second: what curl -d says
PUBLIC_ROUTES = ("/health", "/")  # answered without the API key, as are the chat page's files


class Server:
    """The HTTP server over a ModelPool (or over one model the caller loaded: `Server(model, names)`,
    where `model_names` are the names requests may give in "model", the first its id). api_key and
    cors_origin may be changed while it runs. allowed_hosts: Host names accepted besides loopback's
    ("*": any) on a loopback address; the timeouts (seconds): for a request's headers, for each
    part of its body, and for the client to take each part of the answer; ui: whether GET / answers a
    browser with the chat page (web_ui.py)."""

    def __init__(
        self,
        models: ModelPool | Model,
        model_names: Sequence[str] = (),
        *,
        api_key: str | None = None,
        cors_origin: str | None = None,
        queue_size: int = 64,
        max_body_bytes: int = MAX_BODY_BYTES,
        allowed_hosts: Sequence[str] = (),
        header_timeout: float = 10.0,
        body_timeout: float = 10.0,
        send_timeout: float = 30.0,
        ui: bool = True,
    ) -> None:
        self.pool = (
            models if isinstance(models, ModelPool) else ModelPool.of(models, model_names, queue_size=queue_size)
        )
        self.api_key = api_key
        self.cors_origin = cors_origin
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = LOOPBACK_HOSTS | {h.lower() for h in allowed_hosts}
        self.check_host = "*" not in self.allowed_hosts  # until bound: off for a non-loopback address
        self.header_timeout, self.body_timeout, self.send_timeout = header_timeout, body_timeout, send_timeout
        self.ui = ui
        self.app = create_app(self)
        self._socket: socket.socket | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self, host: str = "127.0.0.1", port: int = 8080) -> tuple[str, int]:
        """Listen on host:port (port 0: a free one); OSError if that cannot be done. Returns the address."""
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(256)  # many clients connecting at once must not be refused
        except OSError:
            sock.close()
            raise
        self._socket = sock
        bound_host, bound_port = sock.getsockname()[:2]
        self.check_host = self.check_host and ipaddress.ip_address(bound_host).is_loopback
        config = uvicorn.Config(
            self.app,
            http=type("TimedH11Protocol", (_TimedH11Protocol,), {"header_timeout": self.header_timeout}),
            loop="asyncio",
            lifespan="off",
            log_config=None,  # the request log is slim's own (logs.py)
            access_log=False,
            server_header=False,
            backlog=256,
            timeout_graceful_shutdown=5,
        )
        self._uvicorn = uvicorn.Server(config)
        return str(bound_host), int(bound_port)

    def serve(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Bind (unless bound) and serve until shutdown() or Ctrl-C (KeyboardInterrupt, once the
        requests under way have had a few seconds to finish); the pool is closed at the end."""
        if self._uvicorn is None:
            self.bind(host, port)
        assert self._uvicorn is not None and self._socket is not None
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.pool.close()
            self._socket.close()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve on a background thread; returns the bound address (connections wait until it serves)."""
        address = self.bind(host, port)
        self._thread = threading.Thread(target=self.serve, name="slim-http", daemon=True)
        self._thread.start()
        return address

    def shutdown(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


# ---- the app ---------------------------------------------------------------------------------------


def _render(error: APIError, path: str) -> Response:
    """The error in the shape of the API the path belongs to."""
    if path.startswith("/v1/messages"):
        return JSONResponse(anthropic_api.error_body(error), error.status, error.headers)
    if path.startswith("/api/"):
        return JSONResponse(ollama_api.error_body(error), error.status, error.headers)
    return JSONResponse(error.body(), error.status, error.headers)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="slim serve",
        summary="Local models behind OpenAI's, Anthropic's and Ollama's APIs",
        docs_url=None,  # the interactive pages load scripts from the network
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.pool = server.pool
    app.state.responses = responses_api.ResponseStore()
    app.state.metrics = metrics = Metrics()
    app.state.ui = server.ui
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(ollama_api.router)
    app.include_router(web_ui.router)

    @app.get("/health", summary="Whether the server is up, and its load and memory per model")
    async def health() -> Response:
        return JSONResponse({"status": "ok", **server.pool.health()})

    @app.get("/metrics", summary="Requests, tokens, latencies and loaded models, in Prometheus' text format")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(server.pool), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _render(exc, request.url.path)

    async def bad_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{**e, "loc": tuple(e["loc"])[1:]} for e in exc.errors() if tuple(e["loc"])[:1] == ("body",)]
        return _render(invalid_body(errors or list(exc.errors())), request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            error = APIError(404, f"no route {method} {path}", code="not_found")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = APIError(
                405,
                f"{method} is not allowed on {path}; use {allowed}",
                code="method_not_allowed",
                headers={"Allow": allowed},
            )
        else:
            error = APIError(
                exc.status_code, str(exc.detail), code="request_too_large" if exc.status_code == 413 else None
            )
        return _render(error, path)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, bad_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(_Gate, server=server, metrics=metrics)
    base_schema = app.openapi

    def schema() -> dict[str, Any]:
        """FastAPI's schema, with the 400 slim answers for a bad body where FastAPI would say 422."""
        if app.openapi_schema is None:
            document = base_schema()
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses["400"] = {"description": "A bad body: the error names the field and what is wrong"}
            for name in ("HTTPValidationError", "ValidationError"):
                document.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]
    return app


class _TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's headers have not all come
    `header_timeout` seconds after the connection opened or the last answer ended (uvicorn's own
    keep-alive timer stops at the first byte: a client that sends half a header would hold the
    connection for ever)."""

    header_timeout = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class ClientTooSlow(Exception):
    """The client did not take a part of its answer within the send timeout."""


class _Gate:
    """Around every request: the log line once it is answered, CORS, the Host, Origin and
    Content-Type checks, the API key, the body (its size, its pace, its JSON), the send timeout,
    and a 500 (with the traceback logged) for an error no route expected."""

    def __init__(self, app: ASGIApp, server: Server, metrics: Metrics) -> None:
        self.app = app
        self.server = server
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        log = scope["slim.log"] = RequestLog()
        started = log.arrived
        status: int | None = None
        origin = self.server.cors_origin

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if origin:
                    extra = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            try:
                async with asyncio.timeout(self.server.send_timeout):
                    await send(message)
            except TimeoutError:
                raise ClientTooSlow() from None

        try:
            refusal = self._refusal(method, path, Headers(scope=scope))
            if refusal is None and method in BODY_METHODS:
                try:
                    body = await self._body(receive)
                except APIError as unread:
                    refusal = unread
                else:
                    refusal = _bad_json(body)
                    receive = _replay(body, receive)
            if isinstance(refusal, Response):
                await refusal(scope, receive, answer)
            elif refusal is not None:
                await _render(refusal, path)(scope, receive, answer)
            else:
                _read_as_json(scope)
                await self.app(scope, receive, answer)
        except ClientTooSlow:
            status = status or 408  # the connection is closed: the client has stopped reading
        except Exception as exc:  # a bug must not cost the client its answer
            log_internal_error(f"{method} {path}", exc)
            if status is None:
                error = APIError(500, f"internal error: {exc.__class__.__name__}: {exc}", "server_error")
                await _render(error, path)(scope, receive, answer)
        finally:
            log_request(
                method, path, log.model, status, log.prompt_tokens, log.completion_tokens, time.monotonic() - started
            )
            self.metrics.request(getattr(scope.get("route"), "path", "-"), log.model, status)

    def _refusal(self, method: str, path: str, headers: Headers) -> APIError | Response | None:
        """The answer for a request that goes no further than here, if it is one."""
        server = self.server
        host = headers.get("host", "").lower()
        if server.check_host and _host_name(host) not in server.allowed_hosts:
            return APIError(
                403,
                f"the Host header names {host or 'nothing'}, not this server (a web page's DNS rebinding?); "
                f"slim serve --allow-host {_host_name(host) or 'NAME'} accepts it",
                "permission_error",
                code="forbidden_host",
            )
        given_origin = headers.get("origin")
        if given_origin is not None and not _allowed_origin(given_origin, host, server.cors_origin):
            return APIError(
                403,
                f"requests from web pages at {given_origin} are refused; slim serve --cors {given_origin} allows them",
                "permission_error",
                code="forbidden_origin",
            )
        if method == "OPTIONS":
            if not server.cors_origin:
                return APIError(405, "method not allowed", code="method_not_allowed")
            # the SDKs send headers of their own (x-stainless-*, anthropic-version): allow what is asked
            asked = headers.get("access-control-request-headers", "")
            allow = {
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": asked or "Authorization, Content-Type, x-api-key, anthropic-version",
                "Access-Control-Max-Age": "600",
            }
            return Response(status_code=204, headers=allow)
        public = path in PUBLIC_ROUTES or path.startswith(web_ui.ASSET_PREFIX)
        if not public and not _authorized(server.api_key, headers):
            return APIError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY, or x-api-key: KEY)",
                "authentication_error",
                code="invalid_api_key",
            )
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if method in BODY_METHODS and kind and kind not in JSON_TYPES and not kind.endswith("+json"):
            return APIError(
                415,
                f"the body must be JSON sent as Content-Type: application/json, not {kind}",
                code="unsupported_media_type",
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > server.max_body_bytes:
            return _too_large(int(length), server.max_body_bytes)
        return None

    async def _body(self, receive: Receive) -> bytes:
        """The whole body, each part within the body timeout; APIError past the size limit or the timeout."""
        limit, timeout = self.server.max_body_bytes, self.server.body_timeout
        parts: list[bytes] = []
        seen = 0
        while True:
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                raise APIError(
                    408,
                    f"the body stopped coming after {seen} bytes (nothing for {timeout:g} s)",
                    code="request_timeout",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                raise ClientTooSlow()  # the client went away before its body was complete
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > limit:
                raise APIError(413, _too_large(seen, limit).message, code="request_too_large")
            if not message.get("more_body", False):
                return b"".join(parts)


BODY_METHODS = ("POST", "PUT", "PATCH")


def _host_name(host: str) -> str:
    """ "localhost:8080" -> "localhost", "[::1]:8080" -> "[::1]"."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _allowed_origin(origin: str, host: str, cors_origin: str | None) -> bool:
    """Whether a browser page at `origin` may call: the server's own origin, or the CORS one."""
    if cors_origin is not None and cors_origin in ("*", origin):
        return True
    return origin.lower() in (f"http://{host}", f"https://{host}")


def _bad_json(body: bytes) -> APIError | None:
    """A 400 for a body nested deeper than MAX_JSON_DEPTH or holding a lone UTF-16 surrogate (which
    Python's json reads into a str that cannot be encoded again); other bad JSON is the route's."""
    if not body.strip():
        return None
    try:
        document = json.loads(body)
    except RecursionError:
        return _too_deep()
    except ValueError:
        return None
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return APIError(
                        400,
                        "the body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair); "
                        "send valid Unicode",
                        code="invalid_json",
                    )
            continue
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return _too_deep()
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)
    return None


def _too_deep() -> APIError:
    return APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with the body read already given again first (then the client's disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _read_as_json(scope: Scope) -> None:
    """Have the request's body read as JSON whatever its Content-Type says: every route takes
    JSON, and `curl -d` (as Ollama's own examples use it) labels it as a form."""
    if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


def _too_large(length: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {length} bytes; the limit is {limit}", code="request_too_large")


def _authorized(key: str | None, headers: Headers) -> bool:
    """The key as OpenAI's clients send it (Authorization: Bearer) or Anthropic's (x-api-key)."""
    if key is None:
        return True
    header = headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else headers.get("x-api-key", "").strip()
    # digests of equal length: the comparison's time tells nothing about the key, not even its length
    digest = hashlib.sha256(given.encode()).digest()
    return bool(given) and hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
