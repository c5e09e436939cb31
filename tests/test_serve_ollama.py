"""Ollama's API on slim serve, driven with the official `ollama` Python client against a real server
on 127.0.0.1: chat and generate (whole and streamed NDJSON, the same text as OpenAI's routes give),
options as sampling, embeddings, tags, show, ps, version, keep_alive unloading a model, and errors
in Ollama's shape. One server for the module, over SmolLM2 and SmolLM2 with a tools template."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from helpers import two_model_server

KEY = "test-key"
MODEL = "smollm2-135m"
TOOLS_MODEL = "tools-model"
GREEDY = {"temperature": 0, "num_predict": 8}
ASK = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def base(smollm2_gguf: Path, smollm2_tools_gguf: Path):
    with two_model_server(smollm2_gguf, smollm2_tools_gguf, api_key=KEY) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(base: str) -> ollama.Client:
    return ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def openai_client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_whole_and_streamed(client: ollama.Client, openai_client: openai.OpenAI) -> None:
    whole = client.chat(model=MODEL, messages=ASK, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and whole.message.content and whole.done
    same = openai_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert whole.message.content == same.choices[0].message.content
    assert (whole.prompt_eval_count, whole.eval_count) == (same.usage.prompt_tokens, same.usage.completion_tokens)
    assert whole.done_reason == same.choices[0].finish_reason and whole.eval_duration > 0
    chunks = list(client.chat(model=MODEL, messages=ASK, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].eval_count == whole.eval_count


def test_generate_whole_streamed_and_raw(client: ollama.Client, openai_client: openai.OpenAI) -> None:
    """A prompt is the user's turn of a chat; raw, it is continued as it is."""
    whole = client.generate(model=MODEL, prompt="Name a fruit.", options=GREEDY)
    assert whole.done and whole.response == client.chat(model=MODEL, messages=ASK, options=GREEDY).message.content
    streamed = "".join(
        part.response for part in client.generate(model=MODEL, prompt="Name a fruit.", options=GREEDY, stream=True)
    )
    assert streamed == whole.response
    raw = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=GREEDY)
    same = openai_client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert raw.response == same.choices[0].text and raw.done_reason == "length"


def test_options_and_format(client: ollama.Client) -> None:
    greedy = client.chat(model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": 12}).message.content
    top_one = client.chat(model=MODEL, messages=ASK, options={"top_k": 1, "num_predict": 12, "seed": 7})
    assert top_one.message.content == greedy
    words = greedy.split()
    assert len(words) >= 2, greedy
    stopped = client.chat(model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": 12, "stop": [words[1]]})
    assert stopped.message.content == greedy[: greedy.index(words[1])] and stopped.done_reason == "stop"
    schema = {
        "type": "object",
        "properties": {"fruit": {"type": "string", "enum": ["apple", "pear"]}},
        "required": ["fruit"],
    }
    shaped = client.chat(model=MODEL, messages=ASK, format=schema, options={"temperature": 0, "num_predict": 30})
    assert json.loads(shaped.message.content)["fruit"] in ("apple", "pear")


def test_tool_calls_and_results(client: ollama.Client) -> None:
    """A reply that is a call of one of the tools comes as message.tool_calls (Ollama has no
    tool_choice: a format that asks for the call makes this model give one), whole and streamed;
    the call and its result go back into the conversation."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": weather["function"]["parameters"]},
        "required": ["name", "arguments"],
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    options = {"temperature": 0, "num_predict": 40}
    reply = client.chat(model=TOOLS_MODEL, messages=ask, tools=[weather], format=call_schema, options=options)
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    assert reply.message.content == ""
    streamed = client.chat(
        model=TOOLS_MODEL, messages=ask, tools=[weather], format=call_schema, options=options, stream=True
    )
    calls = [c.message.tool_calls for c in streamed if c.message.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.arguments == call.function.arguments
    follow = client.chat(
        model=TOOLS_MODEL,
        tools=[weather],
        options=GREEDY,
        messages=[
            *ask,
            {"role": "assistant", "content": "", "tool_calls": [{"function": call.function.model_dump()}]},
            {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
        ],
    )
    assert follow.message.content and not follow.message.tool_calls


def test_embeddings(client: ollama.Client, openai_client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "Quarterly tax filings are due in April."]
    reply = client.embed(model=MODEL, input=texts)
    same = openai_client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert len(reply.embeddings) == 2
    for got, expected in zip(reply.embeddings, same.data, strict=True):
        assert max(abs(a - b) for a, b in zip(got, expected.embedding, strict=True)) < 1e-5
    assert reply.prompt_eval_count == same.usage.prompt_tokens
    assert client.embeddings(model=MODEL, prompt=texts[0]).embedding == pytest.approx(reply.embeddings[0], abs=1e-5)


def test_models_and_keep_alive(base: str, client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {MODEL, TOOLS_MODEL}
    details = listed[MODEL].details
    assert (details.format, details.family, details.quantization_level, details.parameter_size) == (
        "gguf",
        "llama",
        "Q4_1",
        "135M",
    )
    shown = client.show(MODEL + ":latest")  # Ollama's default tag names the same model
    assert "{% for message in messages %}" in shown.template and "completion" in shown.capabilities
    assert shown.modelinfo["llama.context_length"] == 8192 and "tools" in client.show(TOOLS_MODEL).capabilities
    assert client.generate(model=TOOLS_MODEL).done_reason == "load"  # no prompt: load it
    assert TOOLS_MODEL in {m.model for m in client.ps().models}
    assert client.generate(model=TOOLS_MODEL, keep_alive=0).done_reason == "unload"
    deadline = time.time() + 10
    while TOOLS_MODEL in {m.model for m in client.ps().models} and time.time() < deadline:
        time.sleep(0.05)
    assert TOOLS_MODEL not in {m.model for m in client.ps().models}
    client.chat(model=TOOLS_MODEL, messages=ASK, options={"num_predict": 1}, keep_alive="1s")
    (loaded,) = [m for m in client.ps().models if m.model == TOOLS_MODEL]
    assert loaded.size > 0 and loaded.expires_at is not None
    while TOOLS_MODEL in {m.model for m in client.ps().models} and time.time() < deadline + 10:
        time.sleep(0.1)
    assert TOOLS_MODEL not in {m.model for m in client.ps().models}
    assert httpx.get(base + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]


def test_errors(base: str, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3", messages=ASK)
    assert info.value.status_code == 404 and "llama3" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=ASK, options={"temprature": 0.2})
    assert info.value.status_code == 400 and info.value.error == "unknown field 'options.temprature'"
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=ASK, options={"mirostat": 2})
    assert info.value.status_code == 400 and "mirostat" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=base).chat(model=MODEL, messages=ASK)
    assert info.value.status_code == 401
    assert httpx.get(base + "/").status_code == 200  # Ollama's apps check the server is up without a key


def test_a_client_that_goes_away_frees_its_sequence(base: str) -> None:
    """An NDJSON stream read for one line and dropped: the generation stops, the sequence is free.

    Greedy, since SmolLM2 continues this prompt for all 400 tokens without an end of sequence: a
    sampled reply can end early, within the 1 s the whole answer is given up after."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "raw": True,
        "options": {"num_predict": 400, "temperature": 0},
    }
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", base + "/api/generate", json=body, headers=auth, timeout=60) as response:
        first = json.loads(next(response.iter_lines()))
        assert first["done"] is False
    deadline = time.time() + 10
    while httpx.get(base + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(base + "/health").json()["running"] == 0
    with pytest.raises(httpx.ReadTimeout):  # a whole answer given up on is stopped too
        httpx.post(base + "/api/generate", json={**body, "stream": False}, headers=auth, timeout=1.0)
    deadline = time.time() + 10
    while httpx.get(base + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(base + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0


def test_a_body_sent_as_curl_sends_it(base: str) -> None:
    """`curl -d '{...}'`, as Ollama's own examples go, labels JSON as a form: it is read as JSON."""
    reply = httpx.post(
        base + "/api/generate",
        content=json.dumps({"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["done"] is True
