"""What slim serve accepts in a request body, on a real server on 127.0.0.1 with the `openai`
client: a field the API does not have is refused by name, what the client itself sends back is
accepted, sampling defaults to `slim run`'s, GET on a POST route is 405, and the OpenAPI schema
describes the bodies."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from slim.runtime import inference, serve
from slim.runtime.inference import SamplingParams

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path):
    model = inference.load(smollm2_gguf, n_ctx=512, n_threads=1, n_batch=64)
    server = serve.Server(model, [MODEL])
    server.address = server.start("127.0.0.1", 0)
    yield server
    server.shutdown()
    model.close()


@pytest.fixture(scope="module")
def base(server: serve.Server) -> str:
    host, port = server.address
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


HI = [{"role": "user", "content": "Name a colour."}]


def test_a_misspelt_field_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, extra_body={"temprature": 0.2})
    error = info.value.body
    assert (error["param"], error["code"]) == ("temprature", "unknown_parameter")
    assert "temprature" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"top_kk": 1})
    assert info.value.body["param"] == "top_kk"


def test_what_the_client_sends_back_is_accepted(client: openai.OpenAI) -> None:
    """A reply's message dumped by the client (refusal, annotations, audio... all present) goes back
    into the conversation; top_k 1 (an extension field) picks what temperature 0 picks."""
    first = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)
    messages = [*HI, first.choices[0].message.model_dump(), {"role": "user", "content": "Another one?"}]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    top_one = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, user="someone", extra_body={"top_k": 1, "min_p": 0.0}
    )
    assert top_one.choices[0].message.content == greedy.choices[0].message.content


def test_get_on_a_post_route_is_405(base: str) -> None:
    response = httpx.get(base + "/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(base + "/v1/nothing").status_code == 404


def test_the_openapi_schema_describes_the_bodies(base: str) -> None:
    schema = httpx.get(base + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"} <= set(schema["paths"])
    chat = schema["components"]["schemas"]["ChatBody"]
    assert chat["additionalProperties"] is False and {"model", "messages"} <= set(chat["required"])
    assert {"temperature", "top_k", "min_p", "tools", "response_format"} <= set(chat["properties"])
    assert set(schema["paths"]["/v1/chat/completions"]["post"]["responses"]) == {"200", "400"}  # never 422
    assert {"/v1/responses", "/v1/messages", "/api/chat", "/api/generate", "/metrics"} <= set(schema["paths"])


def test_serve_help_gives_the_defaults_of_slim_run() -> None:
    from slim.runtime.commands.serve import command

    text = " ".join(CliRunner().invoke(command, ["--help"], terminal_width=200).output.split())
    said = re.search(
        r"defaults of `slim run` \(temperature ([\d.]+), top_p ([\d.]+), top_k (\d+), min_p ([\d.]+)", text
    )
    assert said, text
    engine = SamplingParams()
    assert [float(v) for v in said.groups()] == [engine.temperature, engine.top_p, engine.top_k, engine.min_p]


def test_metrics_in_prometheus_text(base: str, client: openai.OpenAI) -> None:
    before = httpx.get(base + "/metrics").text
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True))
    response = httpx.get(base + "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)

    def grew(name: str) -> float:
        old = [line.rsplit(" ", 1) for line in before.splitlines() if line.startswith(name + " ")]
        return samples[name] - (float(old[0][1]) if old else 0.0)

    labels = f'{{model="{MODEL}"}}'
    assert grew(f'slim_requests_total{{route="/v1/completions",model="{MODEL}",status="200"}}') == 2
    assert grew(f"slim_generated_tokens_total{labels}") == 2 * reply.usage.completion_tokens
    assert grew(f"slim_prompt_tokens_total{labels}") == 2 * reply.usage.prompt_tokens
    assert grew(f"slim_time_to_first_token_seconds_count{labels}") == 2
    assert samples[f'slim_time_to_first_token_seconds_bucket{{model="{MODEL}",le="+Inf"}}'] >= 2
    assert grew(f"slim_time_per_output_token_seconds_count{labels}") >= 2
    assert samples["slim_models_loaded"] == 1 and samples[f"slim_model_memory_bytes{labels}"] > 0
    assert samples[f"slim_requests_waiting{labels}"] == 0


def test_the_command_imports_no_http_stack_until_it_serves() -> None:
    """`slim serve --help` (and every other command) starts without FastAPI, uvicorn or pydantic."""
    probe = (
        "import sys\n"
        "from slim.runtime import cli\n"
        "cli.main.get_command(None, 'serve')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'uvicorn', 'pydantic', 'starlette'}))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_n_choices(client: openai.OpenAI) -> None:
    """n choices: each its own generation (seeded apart), whole or streamed; the prompt is counted once."""
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    asked = dict(model=MODEL, messages=story, max_tokens=6, temperature=1.0, seed=5, n=3)
    whole = client.chat.completions.create(**asked)
    assert [c.index for c in whole.choices] == [0, 1, 2] and len({c.message.content for c in whole.choices}) > 1
    alone = client.chat.completions.create(**{**asked, "n": 1})
    assert whole.usage.prompt_tokens == alone.usage.prompt_tokens
    assert whole.usage.completion_tokens == 3 * 6 and all(c.finish_reason == "length" for c in whole.choices)
    texts = ["", "", ""]
    usage = None
    for chunk in client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices] and usage.completion_tokens == 3 * 6
    completions = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, n=2)
    assert completions.choices[0].text == completions.choices[1].text  # greedy: the same twice


def test_n_choices_given_up_on_are_all_stopped(base: str) -> None:
    # greedy: SmolLM2 continues this prompt past 400 tokens, so no choice can end within the 1 s
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "n": 3, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, timeout=1.0)
    deadline = time.time() + 10
    while (load := httpx.get(base + "/health").json())["running"] + load["waiting"] and time.time() < deadline:
        time.sleep(0.05)
    assert (load["running"], load["waiting"]) == (0, 0)


def test_cors_preflight_allows_the_headers_a_browser_sdk_asks_for(server: serve.Server, base: str) -> None:
    asked = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
    }
    assert (
        httpx.options(base + "/v1/chat/completions", headers=asked).status_code == 403
    )  # a page from another origin: refused unless --cors
    server.cors_origin = "http://localhost:3000"
    try:
        preflight = httpx.options(base + "/v1/chat/completions", headers=asked)
    finally:
        server.cors_origin = None
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-headers"] == "authorization,content-type,x-stainless-os"
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
