"""slim serve, driven with the official `openai` client against a real server on 127.0.0.1.

The server runs in-process on a background thread (one model load for the whole module); one test
starts `slim serve` itself as a subprocess.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import make_llama_checkpoint

from slim.runtime import inference, serve
from slim.runtime.formats.gguf_file import check_gguf
from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.convert import convert

KEY = "test-key"
MODEL = "smollm2-135m"
PARALLEL = 4


@pytest.fixture(scope="module")
def app(smollm2_gguf: Path):
    # n_batch 64: prompts longer than that are fed in chunks over several steps
    model = inference.load(smollm2_gguf, n_ctx=512 * PARALLEL, n_seq_max=PARALLEL, n_threads=1, n_batch=64)
    srv = serve.Server(model, [MODEL, smollm2_gguf.name], api_key=KEY, queue_size=32, max_body_bytes=64 * 1024)
    host, port = srv.start("127.0.0.1", 0)
    srv.base = f"http://{host}:{port}"
    yield srv
    srv.shutdown()
    model.close()


@pytest.fixture(scope="module")
def served(app):
    """The model behind `app`, with its scheduler and embedder."""
    with app.pool.use(MODEL) as served:
        yield served


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(app, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    response = httpx.post(app.base + path, content=body, headers=headers, timeout=60)
    return response.status_code, response.json(), dict(response.headers)


def _still_serving(app, client) -> None:
    assert httpx.get(app.base + "/health", timeout=10).json()["status"] == "ok"
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1


def _wait_idle(app, seconds: float = 20) -> dict[str, Any]:
    deadline = time.time() + seconds
    while True:
        load = httpx.get(app.base + "/health", timeout=10).json()
        if load["running"] == 0 and load["waiting"] == 0 or time.time() > deadline:
            return load
        time.sleep(0.05)


def _greedy_chat(client, prompt: str, max_tokens: int = 12) -> str:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content


# ---- the API --------------------------------------------------------------------------------


def test_health_and_models(app, client, smollm2_gguf: Path) -> None:
    health = httpx.get(app.base + "/health").json()
    assert health["parallel"] == PARALLEL and health["models"][MODEL]["state"] == "loaded"
    (entry,) = client.models.list().data  # one entry per model; its file name is an alias
    assert entry.id == MODEL and entry.state == "loaded" and entry.aliases == [smollm2_gguf.name]
    assert client.models.retrieve(smollm2_gguf.name).id == MODEL


def test_chat_completion_and_usage(app, client, served, smollm2_gguf) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(served.model.tokenize(served.model.render_chat([{"role": "user", "content": "What is 2+2?"}])))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 8
    # max_completion_tokens is the newer name of max_tokens
    short = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_completion_tokens=3, temperature=0
    )
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # the model's file name selects it too
    assert (
        client.chat.completions.create(
            model=smollm2_gguf.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        ).usage.completion_tokens
        >= 1
    )


def test_completion_streaming_matches_whole(client) -> None:
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    pieces, reasons, usage = [], [], None
    for chunk in client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].text
    assert reasons[-1] == "length" and usage.completion_tokens == 10


def test_chat_streaming(client) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_sse_ends_with_done(app) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", app.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_stop_strings(client) -> None:
    base = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    text = base.choices[0].text
    words = text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stop=stop, stream=True
        )
        if c.choices
    )
    assert streamed == cut.choices[0].text


def test_seed_and_penalties(client) -> None:
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    assert a == b
    plain = client.completions.create(model=MODEL, prompt="la la la la la la", max_tokens=12, temperature=0)
    penalised = client.completions.create(
        model=MODEL,
        prompt="la la la la la la",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert penalised.choices[0].text != plain.choices[0].text


def test_concurrent_streaming_clients_match_serial(app, client, served) -> None:
    """16 streaming clients at once (4 decoding together, the rest queued): each greedy answer is
    the one the same prompt gets when served alone."""
    prompts = [f"Write the number {i} in words, then name a {'colour' if i % 2 else 'country'}." for i in range(16)]
    alone = {p: _greedy_chat(client, p) for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(prompt: str) -> None:
        try:
            barrier.wait()
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, stream=True
            )
            results[prompt] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    steps = served.scheduler.steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert results == alone
    # they were decoded together: far fewer llama_decode calls than 16 requests served one by one
    assert served.scheduler.steps - steps < 16 * 13 * 0.6


def test_batches_go_in_ascending_sequence_order(client, served) -> None:
    """llama.cpp evaluates a batch in one pass only while its sequence ids ascend one by one (with
    a KV stream per sequence): requests running in the opposite order still reach it so."""
    model = served.model
    decode = model.decode
    batches: list[list[int]] = []

    def recording(batch: Any) -> None:
        batches.append([batch.raw.seq_id[i][0] for i in range(batch.n)])
        decode(batch)

    def overlapping(first: str, second: str) -> None:
        """`second` arrives while `first` is generating."""
        stream = client.completions.create(model=MODEL, prompt=first, max_tokens=24, temperature=0, stream=True)
        next(iter(stream))
        client.completions.create(model=MODEL, prompt=second, max_tokens=6, temperature=0)
        stream.close()

    prompts = ["Zebras graze by the river", "Yaks climb the mountain"]
    overlapping(*prompts)  # two sequences, each holding one prompt
    held = {
        p: next(s.seq_id for s in served.model.slots if s.tokens[:3] == served.model.tokenize(p)[:3]) for p in prompts
    }
    low, high = sorted(prompts, key=held.get)
    model.decode = recording
    try:  # each continuation goes back to its prompt's sequence: the higher one is running first
        overlapping(high + " every day", low + " every day")
    finally:
        del model.decode
    assert any(seqs[:1] != seqs[-1:] for seqs in batches)
    assert all(seqs == sorted(seqs) for seqs in batches)


def test_long_prompts_fed_in_chunks_match_the_engine(smollm2_gguf: Path, client) -> None:
    """Prompts of several batches each, three at once: every greedy continuation is the one the
    engine itself gives that prompt alone."""
    prompts = [
        " ".join(f"{word} number {i}." for i in range(40)) + " The next one is" for word in ("Apple", "River", "Cloud")
    ]
    # the same n_batch as the server: llama.cpp's results for a prompt fed 512 tokens at a time and
    # 64 at a time differ in the last bits, enough to flip a near-tie (this prompt set has one)
    with inference.load(smollm2_gguf, n_ctx=512, n_threads=1, n_batch=64) as alone:
        expected = [alone.complete(p, max_tokens=8, temperature=0).text for p in prompts]
        assert all(len(alone.tokenize(p)) > 3 * 64 for p in prompts)
    got: list[str | None] = [None] * len(prompts)

    def worker(i: int) -> None:
        got[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


# ---- bad input, and the server keeps serving ---------------------------------------------------


def test_malformed_json_and_wrong_types(app, client) -> None:
    status, body, _ = _post(app, "/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [')
    assert (
        status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_json"
    )
    status, body, _ = _post(app, "/v1/chat/completions", b"[1, 2]")
    assert status == 400
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages="hello", max_tokens=2)
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature="hot")
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", top_p=7)
    _still_serving(app, client)


def test_prompt_that_does_not_fit(app, client, served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5000)
    message = info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"
    assert "5000" in message and str(served.model.n_ctx) in message
    _still_serving(app, client)


def test_huge_body_is_refused(app, client) -> None:
    connection = http.client.HTTPConnection(app.base.split("//")[1], timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(50 * 1024 * 1024))
    connection.endheaders()
    connection.send(b'{"model": "' + b"x" * 1000)
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    _still_serving(app, client)


def test_unknown_model(app, client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.status_code == 404
    _still_serving(app, client)


def test_api_key(app, client) -> None:
    assert httpx.get(app.base + "/health").status_code == 200  # /health needs no key
    assert httpx.get(app.base + "/v1/models").status_code == 401
    wrong = openai.OpenAI(base_url=app.base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["type"] == "authentication_error"
    status, body, _ = _post(app, "/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi"}', key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    _still_serving(app, client)


def test_client_dropping_mid_stream_frees_its_sequence(app, client, served) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", app.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    load = _wait_idle(app, 10)
    assert load["running"] == 0 and load["waiting"] == 0
    # the sequence stopped early: its slot's KV cache holds nothing near the 480 tokens asked for
    prompt = served.model.tokenize("Once upon a time")
    held = [len(slot.tokens) for slot in served.model.slots if slot.tokens[: len(prompt)] == prompt]
    assert held and max(held) < 200
    _still_serving(app, client)


def test_client_giving_up_on_a_whole_reply_frees_its_sequence(app, client, served) -> None:
    body = {"model": MODEL, "prompt": "It was a dark and stormy night", "max_tokens": 480, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(app.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0)
    load = _wait_idle(app, 10)
    assert load["running"] == 0 and load["waiting"] == 0
    prompt = served.model.tokenize(body["prompt"])
    held = [len(slot.tokens) for slot in served.model.slots if slot.tokens[: len(prompt)] == prompt]
    assert held and max(held) < 200
    _still_serving(app, client)


def test_overloaded_answers_503(app, client, served) -> None:
    scheduler = served.scheduler
    scheduler.queue_size = 0
    try:
        status, body, headers = _post(app, "/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi"}')
    finally:
        scheduler.queue_size = 32
    assert status == 503 and body["error"]["code"] == "overloaded" and headers["retry-after"] == "1"
    _still_serving(app, client)


def test_unknown_route_and_cors(app) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(app.base + "/v1/nothing", json={}, headers=auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert "access-control-allow-origin" not in httpx.get(app.base + "/health").headers
    assert httpx.options(app.base + "/v1/models").status_code == 405  # CORS is off by default
    app.cors_origin = "http://localhost:3000"
    try:
        preflight = httpx.options(
            app.base + "/v1/chat/completions",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        models = httpx.get(app.base + "/v1/models", headers=auth)
        assert models.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        app.cors_origin = None


# ---- structured output and logprobs ---------------------------------------------------------------


def test_response_format_json(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.lstrip().startswith("{")
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}, "happy": {"type": "boolean"}},
        "required": ["colour", "happy"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a colour and a mood."}],
        max_tokens=40,
        temperature=0.7,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    document = json.loads(reply.choices[0].message.content)
    assert document["colour"] in ("red", "green", "blue") and isinstance(document["happy"], bool)


def test_logprobs(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the likeliest
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    completion = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    assert len(completion.choices[0].logprobs.tokens) == 3


def test_embeddings(app, client, served) -> None:
    texts = ["The cat sat on the mat.", "A kitten was sitting on the rug.", "Quarterly tax filings are due in April."]
    reply = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    vectors = [d.embedding for d in reply.data]
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert len(vectors[0]) == served.embedder.n_embd
    assert reply.usage.prompt_tokens == sum(len(served.model.tokenize(t)) for t in texts)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert abs(dot(vectors[0], vectors[0]) - 1) < 1e-4
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    floats = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float").data[0].embedding
    assert max(abs(a - b) for a, b in zip(floats, vectors[0], strict=False)) < 1e-5
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])
    _still_serving(app, client)


# ---- the command ------------------------------------------------------------------------------


def test_slim_serve_command(smollm2_gguf: Path) -> None:
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
            "2",
            "--ctx",
            "256",
            "--threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        base = f"http://127.0.0.1:{match.group(1)}"
        assert httpx.get(base + "/health", timeout=10).json()["parallel"] == 2
        local = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = local.completions.create(model=smollm2_gguf.name, prompt="Hello", max_tokens=2)
        assert reply.usage.completion_tokens >= 1
        process.send_signal(signal.SIGINT)  # Ctrl-C stops it with the usual exit code
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_slim_serve_bad_model() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "slim.runtime.cli", "serve", "/nonexistent/model.gguf"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr


# ---- tools ------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def tools_client(smollm2_tools_gguf: Path):
    model = inference.load(smollm2_tools_gguf, n_ctx=512, n_threads=1)
    srv = serve.Server(model, ["tools-model"])
    host, port = srv.start("127.0.0.1", 0)
    yield openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    srv.shutdown()
    model.close()


def test_forced_tool_call(tools_client) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = tools_client.chat.completions.create(
        model="tools-model",
        messages=messages,
        tools=[WEATHER],
        max_tokens=40,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # streamed, with "required": the call arrives as one tool_calls delta
    chunks = list(
        tools_client.chat.completions.create(
            model="tools-model",
            messages=messages,
            tools=[WEATHER],
            max_tokens=40,
            temperature=0,
            tool_choice="required",
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.name == "get_weather"
    assert json.loads(deltas[0][0].function.arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation
    follow = tools_client.chat.completions.create(
        model="tools-model",
        tools=[WEATHER],
        max_tokens=8,
        temperature=0,
        tool_choice="none",
        messages=messages
        + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
    )
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls


def test_tool_errors(client, tools_client) -> None:
    with pytest.raises(openai.BadRequestError) as info:  # SmolLM2's own template has no tools
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert info.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        tools_client.chat.completions.create(
            model="tools-model",
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError):
        tools_client.chat.completions.create(
            model="tools-model", messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function"}]
        )


def test_parse_tool_calls() -> None:
    content, calls = serve.parse_tool_calls('Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert content == "Sure." and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert serve.parse_tool_calls('{"name": "g", "parameters": {}}')[1][0]["function"]["name"] == "g"
    assert serve.parse_tool_calls("just text") == ("just text", [])


# ---- several models, loaded on demand within a memory budget ----------------------------------------

TINY = "tiny"
POOL_OPTIONS = dict(parallel=2, ctx=256, n_threads=1, n_batch=64)


@pytest.fixture(scope="module")
def tiny_ggufs(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small random-weight models with SmolLM2's tokenizer (different seeds, so different
    answers), converted by slim to Q8_0."""
    paths = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"tiny{seed}")
        hf = make_llama_checkpoint(
            folder / "hf", smollm2_tokenizer, hidden=64, n_layer=2, n_head=2, n_head_kv=1, ffn=128, seed=seed
        )
        convert(hf, folder / f"tiny{seed}.gguf", mix("Q8_0"))
        paths.append(folder / f"tiny{seed}.gguf")
    return paths


def _specs(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> list[serve.ModelSpec]:
    return [
        serve.ModelSpec([MODEL, smollm2_gguf.name], smollm2_gguf),
        serve.ModelSpec([TINY, tiny_ggufs[0].name], tiny_ggufs[0]),
        serve.ModelSpec([TINY + "2"], tiny_ggufs[1]),
    ]


def _cost(path: Path) -> int:
    return serve.estimate_memory(
        path, check_gguf(path), POOL_OPTIONS["ctx"] * POOL_OPTIONS["parallel"], POOL_OPTIONS["n_batch"]
    ).total


class _Running:
    """A Server over a ModelPool on a free port, with an openai client."""

    def __init__(self, specs: list[serve.ModelSpec], **options: Any) -> None:
        self.pool = serve.ModelPool(specs, **{**POOL_OPTIONS, **options})
        self.app = serve.Server(self.pool)
        host, port = self.app.start("127.0.0.1", 0)
        self.base = f"http://{host}:{port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)

    def states(self) -> dict[str, str]:
        return {m.id: m.state for m in self.client.models.list().data}

    def complete(self, model: str, prompt: str = "Once upon a time", max_tokens: int = 8) -> str:
        reply = self.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert reply.model == model
        return reply.choices[0].text

    def __enter__(self) -> _Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.app.shutdown()


def test_two_models_answer_interleaved_requests(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> None:
    """Both models start unloaded; concurrent requests for each load it once and get the answers
    each model gives the same prompts one at a time."""
    with _Running(_specs(smollm2_gguf, tiny_ggufs), keep_alive=-1) as running:
        assert running.states() == {MODEL: "unloaded", TINY: "unloaded", TINY + "2": "unloaded"}
        prompts = [f"Item {i}: the colour of the sky is" for i in range(4)]
        jobs = [(model, p) for p in prompts for model in (MODEL, TINY)]
        got: dict[tuple[str, str], str] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(jobs))

        def worker(model: str, prompt: str) -> None:
            try:
                barrier.wait()
                got[model, prompt] = running.complete(model, prompt)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert running.states() == {MODEL: "loaded", TINY: "loaded", TINY + "2": "unloaded"}
        alone = {job: running.complete(*job) for job in jobs}
        assert got == alone
        assert all(got[MODEL, p] != got[TINY, p] for p in prompts)  # each request reached its own model
        # the file name is an alias; the reply names the model by its id
        assert running.client.completions.create(model=tiny_ggufs[0].name, prompt="Hi", max_tokens=2).model == TINY
        health = httpx.get(running.base + "/health").json()
        assert set(health["models"]) == {MODEL, TINY} and health["parallel"] == 2
        assert health["memory_used_bytes"] == _cost(smollm2_gguf) + _cost(tiny_ggufs[0])


def test_idle_model_is_unloaded_after_keep_alive(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> None:
    with _Running(_specs(smollm2_gguf, tiny_ggufs), keep_alive=0.5) as running:
        first = running.complete(TINY)
        deadline = time.time() + 20
        while running.states()[TINY] != "unloaded" and time.time() < deadline:
            time.sleep(0.1)
        assert running.states()[TINY] == "unloaded"
        assert TINY not in httpx.get(running.base + "/health").json()["models"]
        assert running.complete(TINY) == first  # loaded again on demand


def test_memory_budget_unloads_the_least_recently_used(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> None:
    """Room for SmolLM2 and one tiny model: loading the second tiny model unloads the first,
    which was used longer ago than SmolLM2."""
    budget = _cost(smollm2_gguf) + _cost(tiny_ggufs[0]) + _cost(tiny_ggufs[1]) // 2
    with _Running(_specs(smollm2_gguf, tiny_ggufs), keep_alive=-1, memory_budget=budget) as running:
        running.complete(TINY)
        answer = running.complete(MODEL)
        assert running.states() == {MODEL: "loaded", TINY: "loaded", TINY + "2": "unloaded"}
        running.complete(TINY + "2")
        assert running.states() == {MODEL: "loaded", TINY: "unloaded", TINY + "2": "loaded"}
        assert running.complete(MODEL) == answer
        assert httpx.get(running.base + "/health").json()["memory_used_bytes"] <= budget


def test_memory_budget_refusals(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> None:
    """A model that cannot fit next to one in use: 503 with Retry-After; one larger than the whole
    budget: 400 with the numbers."""
    budget = _cost(smollm2_gguf) + _cost(tiny_ggufs[0]) // 2
    with _Running(_specs(smollm2_gguf, tiny_ggufs), keep_alive=-1, memory_budget=budget) as running:
        with running.pool.use(TINY):  # a request in flight holds the tiny model
            with pytest.raises(openai.InternalServerError) as info:
                running.complete(MODEL)
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "5"
            assert info.value.body["code"] == "model_busy"
        running.complete(MODEL)  # once the tiny model is idle, it gives way
        assert running.states()[TINY] == "unloaded"
    with _Running(_specs(smollm2_gguf, tiny_ggufs), keep_alive=-1, memory_budget=_cost(tiny_ggufs[0]) - 1) as running:
        with pytest.raises(openai.BadRequestError) as info:
            running.complete(TINY)
        message = info.value.body["message"]
        assert info.value.body["code"] == "model_too_large"
        assert "memory budget" in message and "KV cache" in message and "MiB" in message
        assert running.states()[TINY] == "unloaded"


def test_model_that_fails_to_load(smollm2_gguf: Path, tiny_ggufs: list[Path], tmp_path: Path) -> None:
    """A damaged file is a 500 in OpenAI's shape for its requests; the other models go on."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_ggufs[0].read_bytes()[:1_000_000])  # the header is whole, the tensors are not
    specs = _specs(smollm2_gguf, tiny_ggufs) + [serve.ModelSpec(["broken"], broken)]
    with _Running(specs, keep_alive=-1) as running:
        for _ in range(2):  # and again: a failed load leaves nothing behind
            with pytest.raises(openai.InternalServerError) as info:
                running.complete("broken")
            assert info.value.status_code == 500
            assert info.value.body["code"] == "model_load_failed" and "truncated" in info.value.body["message"]
        assert running.states()["broken"] == "unloaded"
        assert running.complete(TINY)
        with pytest.raises(openai.NotFoundError):
            running.complete("no-such-model")


def test_slim_serve_several_models(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slim.runtime.cli",
            "serve",
            str(smollm2_gguf),
            str(tiny_ggufs[0]),
            "--port",
            "0",
            "--parallel",
            "2",
            "--ctx",
            "256",
            "--threads",
            "1",
            "--keep-alive",
            "0",
            "--memory-budget",
            "1G",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match and "and 1 more on demand" in line and "memory budget 1.00 GiB" in line, line
        local = openai.OpenAI(
            base_url=f"http://127.0.0.1:{match.group(1)}/v1", api_key="unused", max_retries=0, timeout=60
        )
        assert {m.id: m.state for m in local.models.list().data} == {
            smollm2_gguf.name: "loaded",
            tiny_ggufs[0].name: "unloaded",
        }
        reply = local.completions.create(model=tiny_ggufs[0].stem, prompt="Hello", max_tokens=2)
        assert reply.model == tiny_ggufs[0].name and reply.usage.completion_tokens >= 1
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_slim_serve_bad_memory_budget(smollm2_gguf: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "slim.runtime.cli", "serve", str(smollm2_gguf), "--memory-budget", "lots"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "'lots' is not a size" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "slim.runtime.cli", "serve", str(smollm2_gguf), "--memory-budget", "10M"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "memory budget of 10 MiB" in result.stderr


def test_store_models_are_served_by_name(
    tiny_ggufs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`slim serve` without MODEL serves the store: names as `slim list` shows them, and a model
    pulled while the server runs is found at its first request."""
    from slim.runtime import store
    from slim.runtime.commands.serve import store_specs

    monkeypatch.setenv("SLIM_HOME", str(tmp_path))
    store.add("tiny-a", tiny_ggufs[0], "local")
    with _Running(store_specs(), discover=store_specs, keep_alive=-1) as running:
        assert running.states() == {"tiny-a": "unloaded"}
        assert running.complete("tiny-a")
        store.add("tiny-b", tiny_ggufs[1], "local")
        assert running.client.completions.create(model=tiny_ggufs[1].name, prompt="Hi", max_tokens=2).model == "tiny-b"
        assert running.states() == {"tiny-a": "loaded", "tiny-b": "loaded"}


def test_memory_estimate_matches_llama_cpp(smollm2_gguf: Path, tiny_ggufs: list[Path]) -> None:
    """The estimated KV cache and compute buffers are the sizes llama.cpp reports allocating."""
    L = inference.llama_bindings()
    lines: list[str] = []
    capture = L.llama_log_callback(lambda level, text, user_data: lines.append(text.decode(errors="replace")))
    L.llama_log_set(capture, None)
    try:
        for path in (smollm2_gguf, tiny_ggufs[0]):
            lines.clear()
            inference.load(path, n_ctx=512, n_seq_max=2, n_threads=1, n_batch=64).close()
            log = "".join(lines)
            kv_mib = float(re.search(r"KV buffer size = +([\d.]+) MiB", log).group(1))
            compute_mib = float(re.search(r"compute buffer size = +([\d.]+) MiB", log).group(1))
            estimate = serve.estimate_memory(path, check_gguf(path), 512, 64)
            assert estimate.kv_cache / 2**20 == pytest.approx(kv_mib, abs=0.01)
            assert estimate.compute / 2**20 == pytest.approx(compute_mib, rel=0.02)
            assert estimate.weights == path.stat().st_size
    finally:
        inference.silence_logs()
