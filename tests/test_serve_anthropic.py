"""Anthropic's Messages API on slim serve, driven with the official `anthropic` SDK against a real
server on 127.0.0.1: sync, streamed (its events in the documented order), stop sequences, tools,
count_tokens, x-api-key and Bearer auth, and errors in Anthropic's shape. One server for the
module, over SmolLM2 and SmolLM2 with a chat template that renders tools."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from helpers import two_model_server

KEY = "test-key"
MODEL = "smollm2-135m"
TOOLS_MODEL = "tools-model"
CHAT = [
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple."},
    {"role": "user", "content": "Name another one."},
]
GREEDY = {"temperature": 0}  # this SDK no longer sends sampling fields; older clients and other apps do
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def base(smollm2_gguf: Path, smollm2_tools_gguf: Path):
    with two_model_server(smollm2_gguf, smollm2_tools_gguf, api_key=KEY) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0, timeout=60)


def test_a_conversation_with_a_system_prompt(base: str, client: anthropic.Anthropic) -> None:
    """The reply is the one OpenAI's chat route gives the same conversation; usage counts the prompt
    as count_tokens does."""
    reply = client.messages.create(model=MODEL, system="You are terse.", messages=CHAT, max_tokens=8, extra_body=GREEDY)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    (block,) = reply.content
    assert block.type == "text" and block.text
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    same = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are terse."}, *CHAT], max_tokens=8, extra_body=GREEDY
    )
    assert block.text == same.choices[0].message.content
    assert reply.usage.output_tokens == same.usage.completion_tokens
    counted = client.messages.count_tokens(model=MODEL, system="You are terse.", messages=CHAT)
    assert counted.input_tokens == same.usage.prompt_tokens
    prompt = reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)
    assert prompt == counted.input_tokens


def test_streamed_events_come_in_the_documented_order(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, messages=CHAT, max_tokens=10, extra_body=GREEDY)
    with client.messages.stream(model=MODEL, messages=CHAT, max_tokens=10, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    kinds = [event.type for event in client.messages.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    blocks = [k for k in kinds if k.startswith("content_block")]
    assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop"
    assert set(blocks[1:-1]) == {"content_block_delta"}


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    story = [{"role": "user", "content": "Tell me a story about a cat."}]
    text = client.messages.create(model=MODEL, messages=story, max_tokens=12, extra_body=GREEDY).content[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    reply = client.messages.create(model=MODEL, messages=story, max_tokens=12, stop_sequences=[stop], extra_body=GREEDY)
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    assert reply.content[0].text == text[: text.index(stop)]


def test_tools(client: anthropic.Anthropic) -> None:
    """A forced tool call comes as a tool_use block (whole and streamed); its result goes back as a
    tool_result block."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "tool", "name": "get_weather"}
    reply = client.messages.create(
        model=TOOLS_MODEL, messages=ask, tools=[WEATHER], tool_choice=forced, max_tokens=40, extra_body=GREEDY
    )
    assert reply.stop_reason == "tool_use"
    (call,) = [b for b in reply.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input["city"], str) and call.id.startswith("toolu_")
    with client.messages.stream(
        model=TOOLS_MODEL, messages=ask, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=40, extra_body=GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    (streamed_call,) = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed_call.input == call.input and streamed.stop_reason == "tool_use"
    answer = client.messages.create(
        model=TOOLS_MODEL,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        max_tokens=8,
        extra_body=GREEDY,
        messages=[
            *ask,
            {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]},
        ],
    )
    assert answer.content[0].type == "text" and answer.content[0].text


def test_keys_and_errors(base: str, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, messages=CHAT, max_tokens=2
        )
    assert info.value.body["error"]["type"] == "authentication_error"
    bearer = httpx.post(  # the key as OpenAI's clients send it works here too
        base + "/v1/messages",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "messages": CHAT, "max_tokens": 2},
        timeout=60,
    )
    assert bearer.status_code == 200 and bearer.json()["type"] == "message"
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"temprature": 0.5})
    assert info.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "unknown field 'temprature'"},
    }
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"temperature": 1.5})
    assert "temperature" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-sonnet-4", messages=CHAT, max_tokens=2)
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):  # SmolLM2's own template renders no tools
        client.messages.create(model=MODEL, messages=CHAT, max_tokens=2, tools=[WEATHER])
    missing = httpx.post(base + "/v1/messages", headers={"x-api-key": KEY}, json={"model": MODEL, "messages": CHAT})
    assert missing.status_code == 400 and json.loads(missing.text)["error"]["message"] == "'max_tokens' is required"


def test_output_format_is_a_json_schema(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"fruit": {"type": "string", "enum": ["apple", "pear"]}},
        "required": ["fruit"],
        "additionalProperties": False,
    }
    reply = client.messages.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=30,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,
    )
    assert json.loads(reply.content[0].text)["fruit"] in ("apple", "pear")
