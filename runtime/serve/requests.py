"""Request bodies into typed, validated requests, and OpenAI-shaped errors. Nothing here needs a
model: what depends on one (the prompt's tokens, the chat template, the context) is settled by
the pool's loaded model (pool.Served)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from slim.runtime.inference import ContextError, SamplingParams

__all__ = [
    "MAX_EMBEDDING_INPUTS",
    "MAX_STOPS",
    "MAX_TOP_LOGPROBS",
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "bad_request",
    "fit_max_tokens",
    "model_name",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
]

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 256


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 invalid_request_error about `param`."""
    return APIError(400, message, param=param, code=code)


# ---- the requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions. prompt: text or token ids. params: the sampling parameters, whose
    max_tokens is settled against the prompt's length by fit_max_tokens (max_tokens here: what the
    client asked for, None for the rest of the context). top_logprobs: None for no logprobs."""

    model: str
    prompt: str | list[int]
    params: SamplingParams
    max_tokens: int | None
    top_logprobs: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions: messages checked and normalised ({"role", "content"}, plus
    tool_calls, tool_call_id and name where given), and the tools with forced_tool, the function
    tool_choice forces ("" for any of them; None when no call is forced). The rest as in
    CompletionRequest."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    forced_tool: str | None
    params: SamplingParams
    max_tokens: int | None
    top_logprobs: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class EmbeddingRequest:
    """POST /v1/embeddings: inputs are texts or token id lists; encoding_format "float" or "base64"."""

    model: str
    inputs: list[str | list[int]]
    encoding_format: str


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str):
        raise bad_request("'model' is required and must be a string", "model", "invalid_type")
    return name


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages", "invalid_type")
    if body.get("functions"):
        raise bad_request("'functions' is not supported; use 'tools'", "functions", "unsupported_parameter")
    tools, forced = None, None
    if body.get("tools") is not None and body.get("tool_choice") != "none":
        tools, forced = _tools(body["tools"], body.get("tool_choice"))
    checked = [_message(m, i) for i, m in enumerate(messages)]
    if forced is not None and body.get("response_format") not in (None, {"type": "text"}):
        raise bad_request("a forced tool call cannot be combined with response_format", "response_format")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs", "invalid_type")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _max_tokens(body)
    return ChatRequest(
        model_name(body),
        checked,
        tools,
        forced,
        _params(body),
        max_tokens,
        (top or 0) if logprobs else None,
        *_streaming(body),
    )


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = list(prompt)
    elif not isinstance(prompt, str):
        raise bad_request(
            "'prompt' must be a string (or one list of token ids); batches of prompts are not supported",
            "prompt",
            "invalid_type",
        )
    if body.get("echo") or body.get("suffix") or (body.get("best_of") not in (None, 1)):
        raise bad_request("'echo', 'suffix' and 'best_of' are not supported", "echo", "unsupported_parameter")
    max_tokens = _max_tokens(body)
    top_logprobs = _integer(body, "logprobs", 0, 5)
    return CompletionRequest(model_name(body), prompt, _params(body), max_tokens, top_logprobs, *_streaming(body))


def parse_embeddings(body: dict[str, Any]) -> EmbeddingRequest:
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported", "dimensions", "unsupported_parameter")
    value = body.get("input")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string, a list of strings, or token ids", "input", "invalid_type")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items", "input")
    for i, item in enumerate(value):
        if not isinstance(item, str) and not (
            isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        ):
            raise bad_request(f"input[{i}] must be a string or a list of token ids", "input", "invalid_type")
    return EmbeddingRequest(model_name(body), value, encoding)


def fit_max_tokens(max_tokens: int | None, prompt_tokens: int, n_ctx: int, param: str) -> int:
    """The tokens to generate: as asked, or the rest of the context; 400 context_length_exceeded
    (about `param` when nothing was asked) when they do not fit."""
    if max_tokens is None:
        if prompt_tokens >= n_ctx:
            raise APIError(400, str(ContextError(prompt_tokens, 1, n_ctx)), param=param, code="context_length_exceeded")
        return n_ctx - prompt_tokens
    if prompt_tokens + max_tokens > n_ctx:
        raise APIError(
            400, str(ContextError(prompt_tokens, max_tokens, n_ctx)), param="max_tokens", code="context_length_exceeded"
        )
    return max_tokens


# ---- fields --------------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number", name, "invalid_type")
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, not {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer", name, "invalid_type")
    if value < low or (high is not None and value > high):
        limits = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise bad_request(f"'{name}' must be {limits}, not {value}", name)
    return value


def _max_tokens(body: dict[str, Any]) -> int | None:
    _integer(body, "n", 1, 1)  # one choice per request
    max_tokens = _integer(body, "max_completion_tokens", 1)
    return _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOPS:
        raise bad_request(f"'stop' may hold at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in stop if s)


def _params(body: dict[str, Any]) -> SamplingParams:
    """OpenAI's sampling: temperature 1, top_p 1, no top-k or min-p; the penalties count the
    generated tokens only. max_tokens and penalty_last_n are settled once the prompt is known."""
    stops = _stops(body)
    seed = _integer(body, "seed", -(2**63))
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-6,
        top_k=0,
        min_p=0.0,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        penalize_prompt=False,
        seed=None if seed is None else seed % 0xFFFFFFFF,
        stop=stops,
        grammar=_grammar(body),
    )


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
    return stream, bool(options.get("include_usage"))


def _message(message: Any, i: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad_request(
            f"messages[{i}].role must be one of system, developer, user, assistant, tool", f"messages[{i}].role"
        )
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"messages[{i}].content parts must be text parts ({{'type': 'text', 'text': ...}})",
                    f"messages[{i}].content",
                )
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant" or (content is None and message.get("tool_calls")):
        content = ""
    if not isinstance(content, str):
        raise bad_request(
            f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content", "invalid_type"
        )
    checked: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise bad_request(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls", "invalid_type")
        checked["tool_calls"] = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise bad_request(
                    f"messages[{i}].tool_calls entries need a function with a name", f"messages[{i}].tool_calls"
                )
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):  # chat templates expect the arguments as an object
                try:
                    arguments = json.loads(arguments or "{}")
                except ValueError:
                    raise bad_request(
                        f"messages[{i}].tool_calls arguments must be JSON", f"messages[{i}].tool_calls"
                    ) from None
            checked["tool_calls"].append(
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": function["name"], "arguments": arguments},
                }
            )
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            checked[key] = message[key]
    return checked


def _grammar(body: dict[str, Any]) -> str | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(
            "'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}", "response_format"
        )
    from llama_cpp import llama_grammar

    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad_request("response_format.json_schema must be an object with a 'schema' object", "response_format")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(spec.get("schema", {})))
    except Exception as exc:
        raise bad_request(f"the JSON schema is not supported: {exc}", "response_format") from None


def _tools(tools: Any, choice: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The tools (OpenAI's [{"type": "function", "function": {...}}]) and the name of the function
    tool_choice forces ("" for "required": any of them), None when no call is forced."""
    if not isinstance(tools, list) or not tools:
        raise bad_request("'tools' must be a non-empty list", "tools", "invalid_type")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("parameters", {}), dict)
        ):
            raise bad_request(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}",
                f"tools[{i}]",
            )
        names.append(function["name"])
    if choice is None or choice == "auto":
        return tools, None
    if choice == "required":
        return tools, ""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        return tools, name
    raise bad_request(
        "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )
