"""Property-based fuzzing of slim serve's request parsers, in process: the bodies schemathesis draws from
the server's own OpenAPI schema for each generation route (valid ones, and invalid ones from its
negative mode) go through the parser that the route runs before any model is touched (validation
by the body's pydantic model, then its conversion into the engine's request: messages, tools,
grammars from JSON schemas, sampling parameters).

    python benchmarks/fuzz_requests.py [--examples 100000]      # per route and mode

One property per body: the parser returns a request, or raises APIError with a one-line message
(the 4xx the route answers); never another exception, never more than two seconds. Prints the
bodies tried per route, how many were accepted and refused, and the time. benchmarks/fuzz_serve.py
sends such requests to a real server; tests/test_serve_fuzz.py runs a few of each.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from slim.runtime import serve
from slim.runtime.serve import anthropic_api, ollama_api, openai_api, responses_api
from slim.runtime.serve.requests import APIError, validated
from slim.runtime.serve.routes import create_app

PARSERS: dict[str, Callable[[Any], Any]] = {
    "/v1/chat/completions": openai_api.parse_chat,
    "/v1/completions": openai_api.parse_completion,
    "/v1/embeddings": openai_api.parse_embeddings,
    "/v1/responses": responses_api.parse_responses,
    "/v1/messages": anthropic_api.parse_messages,
    "/v1/messages/count_tokens": lambda body: anthropic_api.messages_request(
        validated(anthropic_api.CountTokensBody, body)
    ),
    "/api/chat": lambda body: ollama_api.chat_request(validated(ollama_api.OllamaChatBody, body)),
    "/api/generate": lambda body: ollama_api.generate_request(validated(ollama_api.GenerateBody, body)),
}


def openapi_schema() -> dict[str, Any]:
    """The schema slim serve publishes at /openapi.json (no model is loaded to make it)."""
    pool = serve.ModelPool([serve.ModelSpec(["unused"], Path("unused.gguf"))])
    return create_app(serve.Server(pool)).openapi()


def fuzz(examples: int) -> Counter[tuple[str, str]]:
    """`examples` bodies per route and mode through its parser; the tally of (route, outcome)."""
    schema = schemathesis.openapi.from_dict(openapi_schema())
    tally: Counter[tuple[str, str]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "POST" or operation.path not in PARSERS:
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                fuzz_route(operation, mode, examples, tally)
            except Unsatisfiable:  # negative mode found nothing to break
                assert mode is schemathesis.GenerationMode.NEGATIVE
    return tally


def fuzz_route(operation: Any, mode: Any, examples: int, tally: Counter[tuple[str, str]]) -> None:
    path = operation.path
    parse = PARSERS[path]

    @settings(
        max_examples=examples,
        deadline=timedelta(seconds=2),  # a hang fails the run
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def check(case: Any) -> None:
        try:
            parse(case.body)
            tally[(path, "accepted")] += 1
        except APIError as error:
            assert len(error.message.splitlines()) == 1 and 400 <= error.status < 500, repr(error)
            tally[(path, "refused")] += 1

    check()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000, help="bodies per route and mode")
    args = parser.parse_args()
    started = time.monotonic()
    tally = fuzz(args.examples)
    for path in PARSERS:
        accepted, refused = tally[(path, "accepted")], tally[(path, "refused")]
        print(f"{path:28s} {accepted + refused:8d} bodies: {accepted:7d} accepted, {refused:7d} refused")
    print(f"{sum(tally.values())} bodies, no exception but APIError, {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
