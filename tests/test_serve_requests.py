"""Request bodies into typed requests, without any model: what is accepted, what it becomes,
and the OpenAI-shaped error (status, type, param, code) for what is not."""

from __future__ import annotations

from typing import Any

import pytest

from slim.runtime.inference import SamplingParams
from slim.runtime.serve.openai_api import parse_chat, parse_completion, parse_embeddings
from slim.runtime.serve.requests import APIError, ChatRequest, CompletionRequest, fit_max_tokens

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def refused(parse: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The error body a bad request gets, checked to be OpenAI's shape."""
    with pytest.raises(APIError) as caught:
        parse(body)
    error = caught.value
    body = error.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == error.message and error.message
    assert error.status == 400 and body["error"]["type"] == "invalid_request_error"
    return body["error"]


def test_a_chat_request_samples_with_the_defaults_of_slim_run() -> None:
    request = parse_chat({"model": "m", "messages": HI})
    assert isinstance(request, ChatRequest)
    assert request.model == "m" and request.messages == HI and request.tools is None and request.forced_tool is None
    assert request.max_tokens is None and request.top_logprobs is None
    assert not request.stream and not request.include_usage
    params, engine = request.params, SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repeat_penalty) == (
        engine.temperature,
        engine.top_p,
        engine.top_k,
        engine.min_p,
        engine.repeat_penalty,
    )
    assert not params.penalize_prompt and params.grammar is None and params.stop == ()
    # llama.cpp's samplers beside OpenAI's, as llama-server and vLLM take them
    extended = parse_chat({"model": "m", "messages": HI, "top_k": 0, "min_p": 0.1, "repeat_penalty": 1.1}).params
    assert (extended.top_k, extended.min_p, extended.repeat_penalty) == (0, 0.1, 1.1)


def test_fields_real_clients_send_back_are_accepted() -> None:
    """The openai client's reply message, dumped and sent back, and the fields that change nothing here."""
    echoed = {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "tool_calls": None,
    }
    request = parse_chat(
        {
            "model": "m",
            "messages": [*HI, echoed],
            "user": "u1",
            "metadata": {"k": "v"},
            "store": False,
            "parallel_tool_calls": True,
            "logit_bias": {},
            "stream_options": {"include_usage": True, "include_obfuscation": False},
        }
    )
    assert request.messages[1] == {"role": "assistant", "content": "Hello"}


def test_chat_fields_become_sampling_params() -> None:
    request = parse_chat(
        {
            "model": "m",
            "messages": HI,
            "temperature": 0,
            "top_p": 0.5,
            "presence_penalty": 1.5,
            "frequency_penalty": -1,
            "seed": -1,
            "stop": ["\n", ""],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "logprobs": True,
            "top_logprobs": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    params = request.params
    assert isinstance(params, SamplingParams)
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty) == (0, 0.5, 1.5, -1)
    assert params.seed == (-1) % 0xFFFFFFFF and params.stop == ("\n",)  # empty stop strings are dropped
    assert request.max_tokens == 7  # max_completion_tokens wins
    assert request.top_logprobs == 3 and request.stream and request.include_usage
    assert parse_chat({"model": "m", "messages": HI, "top_p": 0}).params.top_p > 0
    assert parse_chat({"model": "m", "messages": HI, "logprobs": True}).top_logprobs == 0


def test_messages_are_normalised() -> None:
    request = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                    ],
                },
                {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
            ],
        }
    )
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
    ]


def test_tools_and_tool_choice() -> None:
    assert parse_chat({"model": "m", "messages": HI, "tools": [TOOL]}).forced_tool is None
    assert parse_chat({"model": "m", "messages": HI, "tools": [TOOL], "tool_choice": "required"}).forced_tool == ""
    named = {"type": "function", "function": {"name": "f"}}
    assert parse_chat({"model": "m", "messages": HI, "tools": [TOOL], "tool_choice": named}).forced_tool == "f"
    assert parse_chat({"model": "m", "messages": HI, "tools": [TOOL], "tool_choice": "none"}).tools is None


def test_response_format_becomes_a_grammar() -> None:
    pytest.importorskip("llama_cpp")
    assert parse_chat({"model": "m", "messages": HI, "response_format": {"type": "text"}}).params.grammar is None
    assert (
        "root" in parse_chat({"model": "m", "messages": HI, "response_format": {"type": "json_object"}}).params.grammar
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request = parse_chat(
        {
            "model": "m",
            "messages": HI,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }
    )
    assert "root" in request.params.grammar


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"messages": HI}, "model", "missing_required_parameter"),
        ({"model": 3, "messages": HI}, "model", "invalid_type"),
        ({"model": "m", "messages": "hello"}, "messages", "invalid_type"),
        ({"model": "m", "messages": []}, "messages", "invalid_value"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "invalid_value",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
                    }
                ],
            },
            "messages[0].tool_calls",
            "invalid_value",
        ),
        ({"model": "m", "messages": HI, "temprature": 0.2}, "temprature", "unknown_parameter"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi", "nmae": "x"}]},
            "messages[0].nmae",
            "unknown_parameter",
        ),
        ({"model": "m", "messages": HI, "logit_bias": {"50256": -100}}, "logit_bias", "unsupported_parameter"),
        ({"model": "m", "messages": HI, "top_k": -1}, "top_k", "invalid_value"),
        ({"model": "m", "messages": HI, "temperature": "hot"}, "temperature", "invalid_type"),
        ({"model": "m", "messages": HI, "temperature": 3}, "temperature", "invalid_value"),
        ({"model": "m", "messages": HI, "temperature": True}, "temperature", "invalid_type"),
        ({"model": "m", "messages": HI, "top_p": 7}, "top_p", "invalid_value"),
        ({"model": "m", "messages": HI, "presence_penalty": -3}, "presence_penalty", "invalid_value"),
        ({"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"model": "m", "messages": HI, "max_tokens": 2.5}, "max_tokens", "invalid_type"),
        ({"model": "m", "messages": HI, "n": 9}, "n", "invalid_value"),
        ({"model": "m", "messages": HI, "seed": "x"}, "seed", "invalid_type"),
        ({"model": "m", "messages": HI, "stop": 5}, "stop", "invalid_type"),
        ({"model": "m", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"model": "m", "messages": HI, "logprobs": "yes"}, "logprobs", "invalid_type"),
        ({"model": "m", "messages": HI, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"model": "m", "messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"model": "m", "messages": HI, "stream": "yes"}, "stream", "invalid_type"),
        ({"model": "m", "messages": HI, "stream_options": "yes"}, "stream_options", "invalid_type"),
        ({"model": "m", "messages": HI, "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"model": "m", "messages": HI, "tools": []}, "tools", "invalid_value"),
        (
            {"model": "m", "messages": HI, "tools": [{"type": "function"}]},
            "tools[0].function",
            "missing_required_parameter",
        ),
        (
            {
                "model": "m",
                "messages": HI,
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            "invalid_value",
        ),
        ({"model": "m", "messages": HI, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        (
            {
                "model": "m",
                "messages": HI,
                "tools": [TOOL],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "invalid_value",
        ),
        ({"model": "m", "messages": HI, "response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        (
            {"model": "m", "messages": HI, "response_format": {"type": "json_schema", "json_schema": "x"}},
            "response_format.json_schema",
            "invalid_type",
        ),
    ],
)
def test_bad_chat_bodies(body: dict[str, Any], param: str, code: str) -> None:
    error = refused(parse_chat, body)
    assert (error["param"], error["code"]) == (param, code), error


def test_errors_stay_one_line_whatever_the_client_sent() -> None:
    """Field names and the values pydantic quotes come from the client (found by benchmarks/fuzz_requests.py:
    an input item of type "\\n" made a two-line message)."""
    from slim.runtime.serve.responses_api import parse_responses

    for parse, body in [
        (parse_responses, {"model": "m", "input": [{"type": "\n", "content": "x"}]}),
        (parse_chat, {"model": "m", "messages": [{"role": "user", "content": "x"}], "bad\u2028name": 1}),
        (parse_chat, {"model": "m", "messages": [{"role": "user\r\nx", "content": "x"}]}),
    ]:
        with pytest.raises(APIError) as caught:
            parse(body)
        assert len(caught.value.message.splitlines()) == 1, caught.value.message


def test_completion_requests() -> None:
    request = parse_completion({"model": "m", "prompt": ["Once upon a time"], "max_tokens": 5, "logprobs": 2})
    assert isinstance(request, CompletionRequest)
    assert request.prompt == "Once upon a time" and request.max_tokens == 5 and request.top_logprobs == 2
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_completion({"model": "m", "prompt": "x"}).top_logprobs is None


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "m"}, "prompt", "missing_required_parameter"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt", "invalid_type"),
        ({"model": "m", "prompt": [1, True]}, "prompt", "invalid_type"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo", "unsupported_parameter"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "echo", "unsupported_parameter"),
        ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
        ({"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens", "invalid_value"),
        ({"model": "m", "prompt": "x", "max_token": 3}, "max_token", "unknown_parameter"),
    ],
)
def test_bad_completion_bodies(body: dict[str, Any], param: str, code: str) -> None:
    error = refused(parse_completion, body)
    assert (error["param"], error["code"]) == (param, code), error


def test_embedding_requests() -> None:
    assert parse_embeddings({"model": "m", "input": "a"}).inputs == ["a"]
    assert parse_embeddings({"model": "m", "input": [1, 2]}).inputs == [[1, 2]]
    request = parse_embeddings({"model": "m", "input": ["a", [3]], "encoding_format": "base64"})
    assert request.inputs == ["a", [3]] and request.encoding_format == "base64"
    for body, param in [
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [None]}, "input"),
        ({"model": "m", "input": ["a"] * 257}, "input"),
        ({"model": "m", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "m", "input": "a", "dimensions": 8}, "dimensions"),
        ({"model": "m", "input": "a", "encoding": "float"}, "encoding"),
    ]:
        assert refused(parse_embeddings, body)["param"] == param


def test_max_tokens_against_the_context() -> None:
    assert fit_max_tokens(None, 10, 100, "messages") == 90  # the rest of the context
    assert fit_max_tokens(20, 10, 100, "messages") == 20
    with pytest.raises(APIError) as caught:
        fit_max_tokens(5000, 10, 100, "messages")
    body = caught.value.body()["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    assert "5000" in body["message"] and "100" in body["message"]
    with pytest.raises(APIError) as caught:
        fit_max_tokens(None, 100, 100, "messages")
    assert caught.value.param == "messages" and caught.value.code == "context_length_exceeded"


def test_anthropic_messages_become_a_chat_request() -> None:
    from slim.runtime.serve.anthropic_api import parse_messages

    tool = {"name": "f", "input_schema": {"type": "object"}}
    request = parse_messages(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "Be brief."}],
            "tools": [tool],
            "tool_choice": {"type": "tool", "name": "f"},
            "stop_sequences": ["\n\n"],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]},
                        {"type": "text", "text": "Thanks"},
                    ],
                },
            ],
        }
    )
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
        {"role": "user", "content": "Thanks"},
    ]
    assert request.tools == [
        {"type": "function", "function": {"name": "f", "description": "", "parameters": {"type": "object"}}}
    ]
    assert request.forced_tool == "f" and request.max_tokens == 5 and request.params.stop == ("\n\n",)
    assert request.params.temperature == SamplingParams().temperature
    for body, param in [
        ({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "Hi"}]}, "messages[0].role"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "temperature": 2},
            "temperature",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "top_kk": 2}, "top_kk"),
    ]:
        assert refused(parse_messages, body)["param"] == param


def test_ollama_keep_alive_and_options() -> None:
    from slim.runtime.serve.ollama_api import (
        GenerateBody,
        OllamaChatBody,
        chat_request,
        generate_request,
        keep_alive_seconds,
    )
    from slim.runtime.serve.requests import validated

    assert [keep_alive_seconds(v) for v in (None, 0, 300, -1, "5m", "1h30m", "1.5s", "-1", "10")] == [
        None,
        0.0,
        300.0,
        -1.0,
        300.0,
        5400.0,
        1.5,
        -1.0,
        10.0,
    ]
    assert [keep_alive_seconds(v) for v in (1e300, "1e400", -5)] == [-1.0] * 3  # longer than 100 years: for ever
    for wrong in ("soon", "nan"):
        with pytest.raises(APIError) as caught:
            keep_alive_seconds(wrong)
        assert caught.value.param == "keep_alive"
    body = {
        "model": "m",
        "messages": HI,
        "options": {"temperature": 0.2, "num_predict": 9, "repeat_last_n": 32, "stop": ["x"]},
    }
    request = chat_request(validated(OllamaChatBody, body))
    assert request.stream and request.max_tokens == 9  # Ollama streams unless told not to
    params = request.params
    assert (params.temperature, params.penalty_last_n, params.penalize_prompt, params.stop) == (0.2, 32, True, ("x",))
    assert params.top_k == SamplingParams().top_k
    raw = generate_request(validated(GenerateBody, {"model": "m", "prompt": "Once", "raw": True, "stream": False}))
    assert isinstance(raw, CompletionRequest) and raw.prompt == "Once" and raw.max_tokens is None and not raw.stream
    chat = generate_request(validated(GenerateBody, {"model": "m", "prompt": "Hi", "system": "Be brief."}))
    assert isinstance(chat, ChatRequest) and [m["role"] for m in chat.messages] == ["system", "user"]
