"""Anthropic's Messages API: POST /v1/messages (system, multi-turn, stop_sequences, tools with
tool_use and tool_result blocks, output_config.format's JSON schema, usage; whole, or streamed as
Anthropic's events: message_start, then per content block content_block_start, its deltas and
content_block_stop, then message_delta and message_stop) and POST /v1/messages/count_tokens.
Bodies are mapped onto the same ChatRequest (OpenAI-shaped messages and tools, the engine's
SamplingParams) as OpenAI's chat; errors come in Anthropic's shape {"type": "error", "error":
{"type", "message"}}."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from slim.runtime.inference import Done, Failed, Piece, SamplingParams
from slim.runtime.serve.jobs import ClientGone, EventStream, Generation, failure, generation, json_answer, request_log
from slim.runtime.serve.requests import APIError, Body, ChatRequest, bad_request, json_grammar, validated
from slim.runtime.serve.tools import parse_tool_calls

__all__ = ["MAX_STOP_SEQUENCES", "CountTokensBody", "MessagesBody", "error_body", "messages_request", "router"]

MAX_STOP_SEQUENCES = 16

# ---- bodies ----------------------------------------------------------------------------------


class TextBlock(Body):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = Field(None, description="ignored: there is no prompt cache to mark")
    citations: list[Any] | None = Field(None, description="ignored")


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = Field(None, description="ignored")
    caller: dict[str, Any] | None = Field(None, description="ignored")
    toolset_name: str | None = Field(None, description="ignored")


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = Field(None, description="ignored")
    toolset_name: str | None = Field(None, description="ignored")


class ThinkingBlock(Body):
    """An earlier reply's thought, sent back as it came: a thinking template may render it."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = Field(None, description="ignored: slim's thoughts are not signed")


class RedactedThinkingBlock(Body):
    type: Literal["redacted_thinking"]
    data: str = Field(description="ignored: there is nothing to decrypt it with")


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock, Field(discriminator="type")
]


class InputMessage(Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: dict[str, Any] | None = Field(None, description="ignored")
    defer_loading: bool | None = Field(None, description="ignored")
    eager_input_streaming: bool | None = Field(None, description="ignored")
    input_examples: list[dict[str, Any]] | None = Field(None, description="ignored")


class ToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = Field(None, description="ignored")


class ThinkingConfig(Body):
    """For a thinking template: "disabled" switches thinking off, the others on; budget_tokens is
    the most tokens of thought (then </think> is written in place of the next ones)."""

    type: Literal["enabled", "adaptive", "disabled", "between_tools"]
    budget_tokens: Annotated[int, Field(ge=0)] | None = None
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(Body):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(Body):
    format: OutputFormat | None = Field(None, description="the reply is JSON matching the schema")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(None, description="ignored")


class Metadata(Body):
    user_id: str | None = None


class CountTokensBody(Body):
    model: str
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # what changes nothing on a local server: accepted and ignored
    cache_control: dict[str, Any] | None = None
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesBody(CountTokensBody):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    service_tier: str | None = Field(None, description="ignored")
    inference_geo: str | None = Field(None, description="ignored")
    diagnostics: dict[str, Any] | None = Field(None, description="ignored")


# ---- what they become ----------------------------------------------------------------------------


def messages_request(body: CountTokensBody) -> ChatRequest:
    """The chat request: the system prompt first, tool_result blocks as tool messages, tool_use
    blocks as an assistant's tool_calls, tools as OpenAI's function tools."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    for i, message in enumerate(body.messages):
        messages += _messages(message, i)
    tools, forced = None, None
    choice = body.tool_choice
    if body.tools and (choice is None or choice.type != "none"):
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in body.tools
        ]
        if choice is not None and choice.type == "any":
            forced = ""
        elif choice is not None and choice.type == "tool":
            if choice.name not in [t.name for t in body.tools]:
                raise bad_request(f"tool_choice names {choice.name!r}, which is not one of the tools", "tool_choice")
            forced = choice.name
    if not isinstance(body, MessagesBody):
        return ChatRequest(
            body.model, messages, tools, forced, SamplingParams(), None, None, False, False, 1, _thinking(body)
        )
    fmt = body.output_config.format if body.output_config is not None else None
    if fmt is not None and forced is not None:
        raise bad_request("a forced tool call cannot be combined with output_config.format", "output_config")
    params = SamplingParams().with_options(
        grammar=None if fmt is None else json_grammar(fmt.json_schema, "output_config.format"),
        temperature=body.temperature,
        top_p=None if body.top_p is None else body.top_p or 1e-6,
        top_k=body.top_k,
        stop=tuple(s for s in body.stop_sequences or () if s),
        thinking_budget=body.thinking.budget_tokens if body.thinking and body.thinking.type != "disabled" else None,
    )
    return ChatRequest(
        body.model, messages, tools, forced, params, body.max_tokens, None, body.stream, False, 1, _thinking(body)
    )


def _thinking(body: CountTokensBody) -> bool | None:
    return None if body.thinking is None else body.thinking.type != "disabled"


def parse_messages(body: Any) -> ChatRequest:
    """The chat request of a parsed JSON body (as the route gets it, validated by the same model)."""
    return messages_request(validated(MessagesBody, body))


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _messages(message: InputMessage, i: int) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    text = "".join(b.text for b in message.content if isinstance(b, TextBlock))
    if message.role == "assistant":
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
            for b in message.content
            if isinstance(b, ToolUseBlock)
        ]
        if any(isinstance(b, ToolResultBlock) for b in message.content):
            raise bad_request(f"messages[{i}]: tool_result blocks belong in a user message", f"messages[{i}].content")
        reply: dict[str, Any] = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        thought = "".join(b.thinking for b in message.content if isinstance(b, ThinkingBlock))
        if thought:
            reply["reasoning_content"] = thought
        return [reply]
    if any(isinstance(b, ToolUseBlock) for b in message.content):
        raise bad_request(f"messages[{i}]: tool_use blocks belong in an assistant message", f"messages[{i}].content")
    results = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)}
        for b in message.content
        if isinstance(b, ToolResultBlock)
    ]
    return results + ([{"role": "user", "content": text}] if text or not results else [])


def error_body(error: APIError) -> dict[str, Any]:
    """Anthropic's error shape; its type follows from the status."""
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }
    kind = kinds.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


# ---- routes ------------------------------------------------------------------------------------

router = APIRouter()


@router.post("/v1/messages", summary="Anthropic's Messages API (streamed as its events with stream: true)")
async def messages(body: MessagesBody, request: Request) -> Response:
    parsed = messages_request(body)
    running = await generation(request, request.app.state.pool, parsed.model, lambda served: served.chat_job(parsed))
    if not parsed.stream:
        try:
            return await _whole(running, parsed)
        except ClientGone:
            return Response(status_code=499)
        finally:
            running.close()
    try:
        await running.begin()
    except ClientGone:
        return Response(status_code=499)
    return EventStream(_events(running, parsed))


@router.post("/v1/messages/count_tokens", summary="The input tokens a Messages request would take")
async def count_tokens(body: CountTokensBody, request: Request) -> Response:
    parsed = messages_request(body)
    pool = request.app.state.pool
    request_log(request).model = parsed.model

    def count() -> int:
        with pool.use(parsed.model) as served:
            return len(served.chat_prompt(parsed))

    n = await run_in_threadpool(count)
    request_log(request).prompt_tokens = n
    return json_answer({"input_tokens": n})


# ---- answers -------------------------------------------------------------------------------------


def _content(text: str, tools: bool, thought: str | None = None) -> list[dict[str, Any]]:
    """The reply's content blocks: its thought (unsigned), its text, then a tool_use block per tool
    call in it."""
    content, calls = parse_tool_calls(text) if tools else (text, [])
    blocks: list[dict[str, Any]] = [_thinking_block(thought)] if thought else []
    if content:
        blocks.append({"type": "text", "text": content})
    for call in calls:
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError:
            arguments = {}
        blocks.append(
            {
                "type": "tool_use",
                "id": "toolu_" + uuid.uuid4().hex[:24],
                "name": call["function"]["name"],
                "input": arguments if isinstance(arguments, dict) else {"value": arguments},
            }
        )
    return blocks


def _thinking_block(thought: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": thought, "signature": ""}


def _stop(running: Generation, done: Done, request: ChatRequest, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """stop_reason and stop_sequence (the string, when it is known: when only one was given)."""
    if any(b["type"] == "tool_use" for b in blocks):
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if done.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    stops = request.params.stop
    if running.job.stopped:
        return {"stop_reason": "stop_sequence", "stop_sequence": stops[0] if len(stops) == 1 else None}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def _usage(running: Generation, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": len(running.job.prompt) - running.job.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": running.job.cached_tokens,
        "output_tokens": output_tokens,
    }


async def _whole(running: Generation, request: ChatRequest) -> Response:
    text, thought, last, _ = await running.reply()
    blocks = _content(text, running.job.tools, thought)
    return json_answer(
        {
            "id": "msg_" + uuid.uuid4().hex,
            "type": "message",
            "role": "assistant",
            "model": running.id,
            "content": blocks,
            **_stop(running, last, request, blocks),
            "usage": _usage(running, last.completion_tokens),
        }
    )


def _event(kind: str, document: dict[str, Any]) -> bytes:
    return (
        f"event: {kind}\ndata: ".encode()
        + json.dumps({"type": kind, **document}, ensure_ascii=False).encode()
        + b"\n\n"
    )


async def _events(running: Generation, request: ChatRequest) -> AsyncGenerator[bytes, None]:
    """Anthropic's stream: a thinking block and then text as they come (when tools were given, the
    text and tool_use blocks once the reply is complete, a tool_use block's input as one
    input_json_delta)."""
    message: dict[str, Any] = {
        "id": "msg_" + uuid.uuid4().hex,
        "type": "message",
        "role": "assistant",
        "model": running.id,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(running, 0),
    }
    tools = running.job.tools
    held: list[str] = []
    index = 0
    blocks: list[dict[str, Any]] = []
    opened: str | None = None  # the type of the block being streamed

    def close() -> Iterator[bytes]:
        nonlocal opened, index
        if opened == "thinking":
            yield _event("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": ""}})
        yield _event("content_block_stop", {"index": index})
        blocks.append({"type": opened})
        opened, index = None, index + 1

    def open_block(kind: str) -> Iterator[bytes]:
        nonlocal opened
        if opened is not None:
            yield from close()
        start = _thinking_block("") if kind == "thinking" else {"type": "text", "text": ""}
        yield _event("content_block_start", {"index": index, "content_block": start})
        opened = kind

    try:
        yield _event("message_start", {"message": message})
        yield _event("ping", {})
        async for event in running.events():
            if isinstance(event, Failed):
                yield _event("error", error_body(failure(event)))
                return
            if isinstance(event, Piece):
                if tools and not event.thinking:
                    held.append(event.text)
                elif event.text:
                    kind = "thinking" if event.thinking else "text"
                    if opened != kind:
                        for chunk in open_block(kind):
                            yield chunk
                    if event.thinking:
                        delta = {"type": "thinking_delta", "thinking": event.text}
                    else:
                        delta = {"type": "text_delta", "text": event.text}
                    yield _event("content_block_delta", {"index": index, "delta": delta})
                continue
            if opened is not None:
                for chunk in close():
                    yield chunk
            for block in _content("".join(held), True) if tools else []:
                blocks.append(block)
                if block["type"] == "text":
                    yield _event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                    delta = {"type": "text_delta", "text": block["text"]}
                else:
                    start = {**block, "input": {}}
                    yield _event("content_block_start", {"index": index, "content_block": start})
                    delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
                yield _event("content_block_delta", {"index": index, "delta": delta})
                yield _event("content_block_stop", {"index": index})
                index += 1
            usage = _usage(running, event.completion_tokens)
            yield _event("message_delta", {"delta": _stop(running, event, request, blocks), "usage": usage})
            yield _event("message_stop", {})
    except ClientGone:
        return
    finally:
        running.close()
