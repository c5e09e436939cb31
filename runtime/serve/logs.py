"""The server's log: one line per request and the traceback of every internal error, to stderr,
as text or as one JSON object per line (slim serve --log-format)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

__all__ = ["LOG_FORMATS", "configure_logging", "log_internal_error", "log_request", "logger"]

LOG_FORMATS = ("text", "json")
logger = logging.getLogger("slim.serve")


class _TextFormatter(logging.Formatter):
    """`2026-11-29 21:40:02 POST /v1/completions model=smollm2 status=200 prompt_tokens=5 ...`,
    and for an error its message then the traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        request = getattr(record, "request", None)
        if request is not None:
            fields = " ".join(f"{k}={_text(v)}" for k, v in request.items() if k not in ("method", "route"))
            record.message = f"{request['method']} {request['route']} {fields}"
        elif record.levelno >= logging.WARNING:
            record.message = f"{record.levelname.lower()}: {record.message}"
        return super().formatMessage(record)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class _JSONFormatter(logging.Formatter):
    """{"time", "level", then the request's fields or "message" (and "traceback")}."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        request = getattr(record, "request", None)
        if request is not None:
            document.update(request)
        else:
            document["message"] = record.getMessage()
        if record.exc_info:
            document["traceback"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def configure_logging(log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Send the server's log to `stream` (default stderr) in `log_format`, replacing what an earlier
    call set up; returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"the log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_TextFormatter() if log_format == "text" else _JSONFormatter())
    # uvicorn's own warnings and errors (a malformed request, a connection it could not serve)
    # go to the same place, in the same format
    for target, level in ((logger, logging.INFO), (logging.getLogger("uvicorn.error"), logging.WARNING)):
        for old in list(target.handlers):
            target.removeHandler(old)
        target.addHandler(handler)
        target.setLevel(level)
        target.propagate = False
    return handler


def log_request(
    method: str,
    route: str,
    model: str | None,
    status: int | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    seconds: float,
) -> None:
    """The request's line: method, route, model, status, tokens and seconds (None when not known)."""
    logger.info(
        "request",
        extra={
            "request": {
                "method": method,
                "route": route,
                "model": model,
                "status": status,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "seconds": round(seconds, 3),
            }
        },
    )


def log_internal_error(where: str, exc: BaseException) -> None:
    """An internal error with its traceback."""
    logger.error("internal error in %s: %s: %s", where, exc.__class__.__name__, exc, exc_info=exc)
