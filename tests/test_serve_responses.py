"""OpenAI's Responses API on slim serve, driven with the official `openai` client against a real
server on 127.0.0.1: stateless, chained with previous_response_id (kept in memory), streamed
events in order, function calls and their outputs. One server for the module, over SmolLM2 and
SmolLM2 with a chat template that renders tools."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from helpers import two_model_server

MODEL = "smollm2-135m"
TOOLS_MODEL = "tools-model"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(smollm2_gguf: Path, smollm2_tools_gguf: Path):
    with two_model_server(smollm2_gguf, smollm2_tools_gguf) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int = 8) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_stateless_and_chained(client: openai.OpenAI) -> None:
    """A response is the chat completion of its instructions and input; the next one, chained by
    previous_response_id, continues that conversation (without the earlier instructions)."""
    first = client.responses.create(
        model=MODEL, instructions="You are terse.", input="Name a fruit.", max_output_tokens=8, temperature=0
    )
    asked = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    assert first.object == "response" and first.status in ("completed", "incomplete")
    assert first.output_text == _chat(client, asked)
    assert (
        first.usage.input_tokens
        == client.chat.completions.create(model=MODEL, messages=asked, max_tokens=1).usage.prompt_tokens
    )
    second = client.responses.create(
        model=MODEL, input="Another one?", previous_response_id=first.id, max_output_tokens=8, temperature=0
    )
    conversation = [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Another one?"},
    ]
    assert second.output_text == _chat(client, conversation) and second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="More?", previous_response_id=first.id, max_output_tokens=2)
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_streamed_events(client: openai.OpenAI) -> None:
    asked = dict(
        model=MODEL, instructions="You are terse.", input="Name a colour.", max_output_tokens=40, temperature=0
    )
    whole = client.responses.create(**asked)
    assert whole.status == "completed", whole.output_text
    with client.responses.stream(**asked) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    # cut short by max_output_tokens: incomplete, with its reason
    short = [event for event in client.responses.create(**{**asked, "max_output_tokens": 2}, stream=True)]
    assert short[-1].type == "response.incomplete"
    assert short[-1].response.incomplete_details.reason == "max_output_tokens"


def test_function_calls(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.responses.create(
        model=TOOLS_MODEL,
        input=ask,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40,
        temperature=0,
    )
    (call,) = [item for item in reply.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    with client.responses.stream(
        model=TOOLS_MODEL, input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=40, temperature=0
    ) as stream:
        streamed = stream.get_final_response()
    (streamed_call,) = [item for item in streamed.output if item.type == "function_call"]
    assert json.loads(streamed_call.arguments) == json.loads(call.arguments)
    answer = client.responses.create(
        model=TOOLS_MODEL,
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
        input=[
            *ask,
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
    )
    assert answer.output_text and not [item for item in answer.output if item.type == "function_call"]


def test_bad_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="Hi", extra_body={"max_tokens": 5})
    assert info.value.body["param"] == "max_tokens" and info.value.body["code"] == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=[{"type": "input_image", "image_url": "x"}])
    assert info.value.body["param"].startswith("input")
