"""Schema-driven fuzzing of slim serve: every operation of its OpenAPI schema (GET /openapi.json), with
the bodies, queries and path parameters schemathesis draws from that schema, valid ones and (its
negative mode) invalid ones, sent to a real server on 127.0.0.1 over the real model.

    python benchmarks/fuzz_serve.py [--examples 500]      # per operation and mode

Half the drawn bodies are aimed at the served model (its name in "model", the tokens to generate cut
to 8), so that the requests reach tokenizing, templates, grammars and generation and not only the
unknown-model answer. One property per answer: a 2xx, or a 4xx whose body is the error of its
surface (OpenAI's {"error": {"message", "type"}}, Anthropic's {"type": "error", "error": {...}},
Ollama's {"error": "..."}); never a 5xx, never more than 30 s, and the server answers /health at
the end. Prints the requests sent per operation and status. tests/test_serve_fuzz.py runs a few
of each.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from slim.runtime.store import assets

MODEL = "smollm2-135m"
# the fields that say how many tokens to generate, per surface
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")
MAX_LENGTH = 8


@contextmanager
def served(model: Path, threads: int = 1) -> Iterator[str]:
    """A real slim serve on loopback over `model` (two sequences, a 512-token context): its base URL."""
    from slim.runtime import serve

    pool = serve.ModelPool([serve.ModelSpec([MODEL], model)], parallel=2, ctx=512, keep_alive=-1, n_threads=threads)
    server = serve.Server(pool)
    host, port = server.start("127.0.0.1", 0)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()


def aimed(body: Any) -> Any:
    """The body sent to the served model, with at most MAX_LENGTH tokens to generate."""
    if not isinstance(body, dict):
        return body
    body = {**body, "model": MODEL}
    for name in LENGTH_FIELDS:
        if isinstance(body.get(name), int):
            body[name] = min(body[name], MAX_LENGTH)
    if isinstance(body.get("options"), dict) and isinstance(body["options"].get("num_predict"), int):
        body["options"] = {**body["options"], "num_predict": min(body["options"]["num_predict"], MAX_LENGTH)}
    return body


def well_formed_error(path: str, document: Any) -> bool:
    """Whether a 4xx body is the error shape of the surface `path` belongs to."""
    if path.startswith("/api/"):
        return isinstance(document, dict) and isinstance(document.get("error"), str) and bool(document["error"])
    error = document.get("error") if isinstance(document, dict) else None
    if path.startswith("/v1/messages"):
        return document.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("message"), str)
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def fuzz(base: str, examples: int) -> Counter[tuple[str, int]]:
    """Send `examples` drawn requests per operation and mode; the tally of (operation, status)."""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    tally: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                fuzz_operation(base, result.ok(), mode, examples, tally)
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                assert mode is schemathesis.GenerationMode.NEGATIVE
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200, f"the server stopped answering: /health is {health.status_code}"
    return tally


def fuzz_operation(base: str, operation: Any, mode: Any, examples: int, tally: Counter[tuple[str, int]]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=examples,
        deadline=timedelta(seconds=30),  # a hang fails the run
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing request is printed whole
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode), aim=st.booleans())
    def check(case: Any, aim: bool) -> None:
        if aim:
            case.body = aimed(case.body)
        response = case.call(base_url=base, timeout=30)
        tally[(label, response.status_code)] += 1
        sent = f"{label} {json.dumps(case.body, default=str)[:2000]} query {case.query} path {case.path_parameters}"
        assert response.status_code < 500, f"{response.status_code} for {sent}: {response.text[:500]}"
        if response.status_code >= 400:
            try:
                document = response.json()
            except ValueError:
                document = None
            assert well_formed_error(operation.path, document), f"{sent}: {response.text[:500]}"

    check()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="requests per operation and mode")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    with served(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), args.threads) as base:
        tally = fuzz(base, args.examples)
    by_operation: dict[str, dict[int, int]] = {}
    for (label, status), n in sorted(tally.items()):
        by_operation.setdefault(label, {})[status] = n
    for label, statuses in by_operation.items():
        print(f"{label:45s} {sum(statuses.values()):6d}  " + "  ".join(f"{s}: {n}" for s, n in statuses.items()))
    total = sum(tally.values())
    print(f"{total} requests, {len(by_operation)} operations, no 5xx, every 4xx well formed, "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
