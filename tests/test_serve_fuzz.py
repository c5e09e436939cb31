"""Short runs of benchmarks/fuzz_requests.py and benchmarks/fuzz_serve.py: the bodies schemathesis
draws from slim serve's own OpenAPI schema, valid and invalid, get a request or a one-line APIError
from each route's parser, and a 2xx or a well-formed 4xx from a real server on loopback, never a
5xx, with the server still answering."""

from __future__ import annotations

from pathlib import Path

from helpers import benchmark_module

EXAMPLES = 8  # per operation and mode, through the server
PARSED = 25  # per route and mode, in process


def test_every_parser_gives_a_request_or_a_one_line_error() -> None:
    tally = benchmark_module("fuzz_requests").fuzz(PARSED)
    routes = {route for route, _ in tally}
    assert len(routes) == 8 and sum(tally.values()) >= 8 * PARSED
    assert all(tally[(route, "refused")] for route in routes)


def test_every_route_answers_drawn_requests_with_2xx_or_a_well_formed_4xx(smollm2_gguf: Path) -> None:
    fuzz = benchmark_module("fuzz_serve")
    with fuzz.served(smollm2_gguf) as base:
        tally = fuzz.fuzz(base, EXAMPLES)
    operations = {label for label, _ in tally}
    assert {"POST /v1/chat/completions", "POST /v1/messages", "POST /api/chat", "POST /v1/responses"} <= operations
    assert all(status < 500 for _, status in tally)
    assert any(status == 200 for label, status in tally if label.startswith("POST"))  # some reached the model
