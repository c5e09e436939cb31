"""The server's log on a real server on 127.0.0.1: one line per request (method, route, model,
status, tokens, seconds) and the traceback of an internal error, as text and as JSON lines."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from slim.runtime import inference, serve
from slim.runtime.serve.logs import logger

httpx = pytest.importorskip("httpx")

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def app(smollm2_gguf: Path):
    model = inference.load(smollm2_gguf, n_ctx=512, n_threads=1, n_batch=64)
    srv = serve.Server(model, [MODEL])
    host, port = srv.start("127.0.0.1", 0)
    srv.base = f"http://{host}:{port}"
    yield srv
    srv.shutdown()
    model.close()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


@pytest.fixture
def served(app):
    with app.pool.use(MODEL) as served:
        yield served


def _log(log_format: str) -> io.StringIO:
    buffer = io.StringIO()
    serve.configure_logging(log_format, buffer)
    return buffer


def _wait_for(buffer: io.StringIO, pattern: str, seconds: float = 20) -> str:
    """The log once `pattern` appears in it (the line is written after the answer is sent)."""
    deadline = time.time() + seconds
    while not re.search(pattern, buffer.getvalue()) and time.time() < deadline:
        time.sleep(0.02)
    return buffer.getvalue()


def _complete(app, **body: Any) -> httpx.Response:
    return httpx.post(
        app.base + "/v1/completions",
        json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, **body},
        timeout=60,
    )


def test_text_request_lines(app) -> None:
    buffer = _log("text")
    assert _complete(app).status_code == 200
    log = _wait_for(buffer, r"POST /v1/completions .*\n")
    line = re.search(r"^.*POST /v1/completions.*$", log, re.M).group(0)
    assert re.search(
        r"model=smollm2-135m status=200 prompt_tokens=\d+ completion_tokens=3 seconds=\d+\.\d{3}$", line
    ), line
    assert httpx.get(app.base + "/health").status_code == 200
    assert re.search(
        r"GET /health model=- status=200 prompt_tokens=- completion_tokens=- seconds=", _wait_for(buffer, "GET /health")
    )
    assert _complete(app, temperature="hot").status_code == 400
    assert "status=400" in _wait_for(buffer, r"status=400")


def test_json_request_lines(app) -> None:
    buffer = _log("json")
    assert _complete(app, stream=True).status_code == 200
    assert httpx.post(app.base + "/v1/nothing", json={}).status_code == 404
    lines = _wait_for(buffer, r"/v1/nothing").splitlines()
    documents = [json.loads(line) for line in lines]  # every line is one JSON object
    streamed, missing = documents[-2], documents[-1]
    assert {k: streamed[k] for k in ("level", "method", "route", "model", "status", "completion_tokens")} == {
        "level": "info",
        "method": "POST",
        "route": "/v1/completions",
        "model": MODEL,
        "status": 200,
        "completion_tokens": 3,
    }
    assert streamed["prompt_tokens"] > 0 and streamed["seconds"] >= 0 and streamed["time"].endswith("Z")
    assert (missing["route"], missing["status"], missing["model"]) == ("/v1/nothing", 404, None)


def _boom(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("boom: a bug")


def test_an_error_inside_the_scheduler_is_logged_with_its_traceback(
    app, served, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = _log("text")
    monkeypatch.setattr(served.model, "decode", _boom)
    response = _complete(app)
    assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
    log = _wait_for(buffer, r"status=500")
    assert "error: internal error in the scheduler: RuntimeError: boom: a bug" in log
    assert "Traceback (most recent call last)" in log and "in _boom" in log
    assert re.search(r"POST /v1/completions model=smollm2-135m status=500", log)
    monkeypatch.undo()
    assert _complete(app).status_code == 200  # and it goes on serving


def test_an_error_in_a_route_is_logged_as_json(app, served, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _log("json")
    monkeypatch.setattr(served, "completion_job", _boom)
    assert _complete(app).status_code == 500
    documents = [json.loads(line) for line in _wait_for(buffer, r'"status": 500').splitlines()]
    (error,) = [d for d in documents if d["level"] == "error"]
    assert "internal error in POST /v1/completions: RuntimeError: boom: a bug" in error["message"]
    assert error["traceback"].startswith("Traceback") and "in _boom" in error["traceback"]
    assert documents[-1]["status"] == 500 and documents[-1]["route"] == "/v1/completions"


def test_slim_serve_log_format_json(smollm2_gguf: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slim.runtime.cli",
            "serve",
            str(smollm2_gguf),
            "--port",
            "0",
            "--parallel",
            "1",
            "--ctx",
            "256",
            "--threads",
            "1",
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", process.stderr.readline())
        assert match
        reply = httpx.post(
            f"http://127.0.0.1:{match.group(1)}/v1/completions",
            timeout=60,
            json={"model": smollm2_gguf.name, "prompt": "Hello", "max_tokens": 2},
        )
        assert reply.status_code == 200
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    requests = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(r["method"], r["route"], r["status"]) for r in requests] == [("POST", "/v1/completions", 200)]
    assert requests[0]["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
