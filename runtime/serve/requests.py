"""What every API surface shares about requests: APIError (answered in the surface's error shape),
the body models' base (strict types, so 1 is not true and "0.5" is not a number), pydantic's
validation errors turned into one APIError naming the field, and the typed requests the surfaces
hand to the pool (CompletionRequest, ChatRequest, EmbeddingRequest, with the engine's
SamplingParams). Nothing here needs a model: what depends on one (the prompt's tokens, the chat
template, the context) is settled by the pool's loaded model (pool.Served)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slim.runtime.inference import ContextError, SamplingParams

__all__ = [
    "APIError",
    "Body",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "MAX_EMBEDDING_INPUTS",
    "MAX_MESSAGES",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "bad_request",
    "check_limits",
    "fit_max_tokens",
    "invalid_body",
    "json_grammar",
    "validated",
]


class APIError(Exception):
    """An error answer: status, message, and OpenAI's type, param and code (the other surfaces
    render the same error in their own shape)."""

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
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 invalid_request_error about `param`."""
    return APIError(400, message, param=param, code=code)


# ---- bodies ----------------------------------------------------------------------------------


class Body(BaseModel):
    """A request body or a part of one: strict types, and a field it does not name is refused (a
    misspelt "temprature" must not sample with the defaults). Fields that real clients send and
    that change nothing here are named, and said to be ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


B = TypeVar("B", bound=BaseModel)
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def validated(model: type[B], body: Any) -> B:
    """`body` (parsed JSON) as `model`, or the APIError for its first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None


def _param(loc: Sequence[int | str]) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def invalid_body(errors: Sequence[Any]) -> APIError:
    """The APIError for pydantic's errors: about the first bad field (for a field that may take
    several shapes, where every shape failed), invalid_type when no shape had the right type,
    missing_required_parameter, unknown_parameter, invalid_json, or invalid_value."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first["msg"])
        return bad_request(f"the body is not valid JSON: {reason}", None, "invalid_json")
    head = first["loc"][:1]
    group = [e for e in errors if tuple(e["loc"][:1]) == tuple(head)]
    loc = list(first["loc"])
    for error in group[1:]:  # a union's errors: name the field itself, not one of its shapes
        shared = 0
        while shared < min(len(loc), len(error["loc"])) and loc[shared] == error["loc"][shared]:
            shared += 1
        loc = loc[:shared]
    param = _param(loc) or None
    kinds = {e["type"] for e in group}
    if not loc:
        return bad_request("the body must be a JSON object", None, "invalid_type")
    # the field names and the values pydantic quotes are the client's: escaped, the message stays one line
    named = one_line(param or "")
    if kinds == {"extra_forbidden"}:
        return bad_request(f"unknown field '{named}'", param, "unknown_parameter")
    if kinds == {"missing"}:
        return bad_request(f"'{named}' is required", param, "missing_required_parameter")
    reasons = " or ".join(dict.fromkeys(one_line(e["msg"]) for e in group if e["type"] != "missing"))
    only_types = all(k.endswith("_type") or k in ("missing", "model_attributes_type") for k in kinds)
    return bad_request(f"'{named}': {reasons}", param, "invalid_type" if only_types else "invalid_value")


def one_line(text: str) -> str:
    """`text` with the characters that break or control a line (newlines, \\u2028, NUL...) escaped."""
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def json_grammar(schema: dict[str, Any] | None, param: str) -> str:
    """GBNF for JSON matching `schema` (None: any JSON object); 400 about `param` if it cannot be one."""
    from llama_cpp import llama_grammar

    from slim.runtime.serve.grammars import schema_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    try:
        return schema_grammar(schema)
    except Exception as exc:
        raise bad_request(f"the JSON schema is not supported: {exc}", param) from None


# ---- the requests the surfaces make ------------------------------------------------------------

MAX_MESSAGES = 4096  # in one chat request
MAX_EMBEDDING_INPUTS = 256  # texts (or token lists) in one embeddings request
MAX_STOP_STRINGS = 16  # each is looked for at every token
MAX_STOP_CHARS = 1024  # in one stop string


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
    n: int = 1  # choices, each its own generation


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions: messages checked and normalised ({"role", "content"}, plus
    tool_calls, tool_call_id and name where given), and the tools with forced_tool, the function
    tool_choice forces ("" for any of them; None when no call is forced). `thinking` switches a
    thinking template's thought on or off (None: its default), `template_variables` are the
    request's own for the template (chat_template_kwargs). The rest as in CompletionRequest."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    forced_tool: str | None
    params: SamplingParams
    max_tokens: int | None
    top_logprobs: int | None
    stream: bool
    include_usage: bool
    n: int = 1
    thinking: bool | None = None
    template_variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingRequest:
    """POST /v1/embeddings: inputs are texts or token id lists; encoding_format "float" or "base64"."""

    model: str
    inputs: list[str | list[int]]
    encoding_format: str


def check_limits(params: SamplingParams, messages: Sequence[Any] = ()) -> None:
    """400 for more stop strings, longer ones, or more messages than a request may hold (whatever
    the surface that made it calls them)."""
    if len(params.stop) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings may be given", "stop")
    longest = max((len(s) for s in params.stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad_request(f"a stop string may be at most {MAX_STOP_CHARS} characters, not {longest}", "stop")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"at most {MAX_MESSAGES} messages may be given, not {len(messages)}", "messages")


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
