"""OpenAI's Responses API: POST /v1/responses (input as text or items: messages, function calls and
their outputs; instructions; function tools; text.format; whole, or streamed as its events from
response.created to response.completed), and the responses kept for previous_response_id: the
last MAX_STORED_RESPONSES with `store` on (the default), in memory, least recently used out; GET
and DELETE /v1/responses/{id}. Bodies map onto the same ChatRequest as chat completions."""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Discriminator, Field, Tag
from starlette.responses import Response

from slim.runtime.inference import Done, Failed, Piece, SamplingParams, effort_enables
from slim.runtime.serve.jobs import ClientGone, EventStream, Generation, failure, generation, json_answer
from slim.runtime.serve.requests import APIError, Body, ChatRequest, bad_request, json_grammar, validated
from slim.runtime.serve.tools import parse_tool_calls

__all__ = ["MAX_STORED_RESPONSES", "ResponseStore", "ResponsesBody", "responses_request", "router"]

MAX_STORED_RESPONSES = 256

# ---- bodies ----------------------------------------------------------------------------------


class InputText(Body):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = Field(None, description="ignored")
    logprobs: list[Any] | None = Field(None, description="ignored")


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


def _item_type(item: Any) -> Any:
    """An input item's type; a message may leave it out."""
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(Body):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Body):
    type: Literal["function"]
    name: str


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="ignored")


class ReasoningConfig(Body):
    """For a thinking template, effort "none" or "minimal" switches thinking off, the others on; the
    thought comes back as a reasoning item (its text, not a summary)."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesBody(Body):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    # what changes nothing on a local server: accepted and ignored
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


# ---- what they become ----------------------------------------------------------------------------


class ResponseStore:
    """The conversations of the last `capacity` stored responses (their messages, the reply's
    included) and their documents, by response id; the least recently used go first."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._kept: collections.OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = (
            collections.OrderedDict()
        )

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self._kept[response["id"]] = (messages, response)
        self._kept.move_to_end(response["id"])
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, response_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        kept = self._kept.get(response_id)
        if kept is None:
            raise APIError(
                404,
                f"no response '{response_id}' is kept (the server keeps the last {self.capacity} stored ones, "
                "in memory)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        self._kept.move_to_end(response_id)
        return kept

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._kept[response_id]


def _conversation(items: str | list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages: an assistant's function calls join its message, each output
    is a tool message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            text = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": text})
        elif isinstance(item, FunctionCallItem):
            try:
                arguments = json.loads(item.arguments or "{}")
            except ValueError:
                raise bad_request(f"input[{i}].arguments must be JSON", f"input[{i}].arguments") from None
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": arguments}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def responses_request(body: ResponsesBody, earlier: list[dict[str, Any]]) -> ChatRequest:
    """The chat request: this request's instructions, the earlier conversation, the new input."""
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + [
        *earlier,
        *_conversation(body.input),
    ]
    if not messages:
        raise bad_request("'input' is empty", "input")
    tools, forced = None, None
    if body.tools and body.tool_choice != "none":
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.parameters or {}},
            }
            for t in body.tools
        ]
        if body.tool_choice == "required":
            forced = ""
        elif isinstance(body.tool_choice, FunctionChoice):
            if body.tool_choice.name not in [t.name for t in body.tools]:
                raise bad_request(f"tool_choice names {body.tool_choice.name!r}, which is not a tool", "tool_choice")
            forced = body.tool_choice.name
    fmt = body.text.format if body.text is not None else None
    grammar = None
    if fmt is not None and fmt.type != "text":
        if forced is not None:
            raise bad_request("a forced tool call cannot be combined with text.format", "text.format")
        grammar = json_grammar(fmt.json_schema if fmt.type == "json_schema" else None, "text.format")
    params = SamplingParams().with_options(
        temperature=body.temperature,
        top_p=None if body.top_p is None else body.top_p or 1e-6,
        grammar=grammar,
    )
    thinking = effort_enables(body.reasoning.effort) if body.reasoning is not None else None
    return ChatRequest(
        body.model, messages, tools, forced, params, body.max_output_tokens, None, body.stream, False, 1, thinking
    )


def parse_responses(body: Any) -> ChatRequest:
    """The chat request of a body with no previous_response_id (for tests)."""
    return responses_request(validated(ResponsesBody, body), [])


# ---- routes ------------------------------------------------------------------------------------

router = APIRouter()


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


@router.post("/v1/responses", summary="OpenAI's Responses API (streamed as its events with stream: true)")
async def create(body: ResponsesBody, request: Request) -> Response:
    earlier = _store(request).get(body.previous_response_id)[0] if body.previous_response_id else []
    parsed = responses_request(body, earlier)
    running = await generation(request, request.app.state.pool, body.model, lambda served: served.chat_job(parsed))
    reply = _Reply(running, body, parsed)
    if not body.stream:
        try:
            text, thought, last, _ = await running.reply()
        except ClientGone:
            return Response(status_code=499)
        finally:
            running.close()
        return json_answer(reply.finish(text, thought, last, _store(request)))
    try:
        await running.begin()
    except ClientGone:
        return Response(status_code=499)
    return EventStream(_events(reply, _store(request)))


@router.get("/v1/responses/{response_id}", summary="A stored response")
async def retrieve(response_id: str, request: Request) -> Response:
    return json_answer(_store(request).get(response_id)[1])


@router.delete("/v1/responses/{response_id}", summary="Forget a stored response")
async def delete(response_id: str, request: Request) -> Response:
    _store(request).delete(response_id)
    return json_answer({"id": response_id, "object": "response", "deleted": True})


# ---- answers -------------------------------------------------------------------------------------


class _Reply:
    """The response document of one request, as it grows."""

    def __init__(self, running: Generation, body: ResponsesBody, request: ChatRequest) -> None:
        self.running, self.body, self.request = running, body, request
        self.id = "resp_" + uuid.uuid4().hex
        self.message_id = "msg_" + uuid.uuid4().hex
        self.reasoning_id = "rs_" + uuid.uuid4().hex
        self.created = int(time.time())

    def document(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text is not None and body.text.format is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.running.id,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": body.store,
            "temperature": self.request.params.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) else "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": self.request.params.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.metadata or {},
        }

    def output(self, text: str, thought: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The output items of the whole reply (its thought first, as a reasoning item), and the
        assistant's message it adds to the conversation."""
        content, calls = parse_tool_calls(text) if self.running.job.tools else (text, [])
        items: list[dict[str, Any]] = [self.reasoning_item(thought)] if thought else []
        message: dict[str, Any] = {"role": "assistant", "content": content or ""}
        if thought:
            message["reasoning_content"] = thought
        if content or not calls:
            items.append(self.message_item(content or ""))
        for call in calls:
            items.append(
                {
                    "type": "function_call",
                    "id": "fc_" + uuid.uuid4().hex,
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
        if calls:
            message["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
                for c in calls
            ]
        return items, message

    def reasoning_item(self, thought: str | None) -> dict[str, Any]:
        """The reply's reasoning item: in progress and empty (None), or complete with its text."""
        content = [] if thought is None else [{"type": "reasoning_text", "text": thought}]
        status = "in_progress" if thought is None else "completed"
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def message_item(self, text: str | None) -> dict[str, Any]:
        """The reply's message item: in progress and empty (None), or complete with its text."""
        if text is None:
            return {
                "type": "message",
                "id": self.message_id,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": "completed", "role": "assistant", "content": [part]}

    def usage(self, output_tokens: int, thought_tokens: int) -> dict[str, Any]:
        prompt = len(self.running.job.prompt)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": self.running.job.cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": thought_tokens},
            "total_tokens": prompt + output_tokens,
        }

    def finish(self, text: str, thought: str | None, done: Done, store: ResponseStore) -> dict[str, Any]:
        items, message = self.output(text, thought)
        status = "incomplete" if done.finish_reason == "length" else "completed"
        document = self.document(status, items, self.usage(done.completion_tokens, done.thought_tokens))
        if self.body.store:
            conversation = self.request.messages[1:] if self.body.instructions else self.request.messages
            store.put(document, [*conversation, message])
        return document


async def _events(reply: _Reply, store: ResponseStore) -> AsyncGenerator[bytes, None]:
    """The Responses stream: response.created and .in_progress, then per output item its added,
    deltas and done events, then response.completed (or .incomplete)."""
    sequence = 0
    running = reply.running

    def event(kind: str, document: dict[str, Any]) -> bytes:
        nonlocal sequence
        sequence += 1
        data = json.dumps({"type": kind, "sequence_number": sequence - 1, **document}, ensure_ascii=False)
        return f"event: {kind}\ndata: ".encode() + data.encode() + b"\n\n"

    streaming_text = not running.job.tools
    pieces: list[str] = []
    thoughts: list[str] = []
    opened = False
    thinking = False  # the reasoning item is open
    message_index = 0  # 1 once a reasoning item came first

    def end_thought() -> Iterator[bytes]:
        nonlocal thinking, message_index
        thinking, message_index = False, 1
        thought = "".join(thoughts)
        where = {"item_id": reply.reasoning_id, "output_index": 0, "content_index": 0}
        yield event("response.reasoning_text.done", {**where, "text": thought})
        yield event("response.content_part.done", {**where, "part": {"type": "reasoning_text", "text": thought}})
        yield event("response.output_item.done", {"output_index": 0, "item": reply.reasoning_item(thought)})

    try:
        started = reply.document("in_progress", [], None)
        yield event("response.created", {"response": started})
        yield event("response.in_progress", {"response": started})
        async for item in running.events():
            if isinstance(item, Failed):
                error = failure(item)
                failed = {**reply.document("failed", [], None), "error": {"code": error.code, "message": error.message}}
                yield event("response.failed", {"response": failed})
                return
            if isinstance(item, Piece) and item.thinking:
                where = {"item_id": reply.reasoning_id, "output_index": 0, "content_index": 0}
                if not thoughts:
                    thinking = True
                    yield event("response.output_item.added", {"output_index": 0, "item": reply.reasoning_item(None)})
                    empty = {"type": "reasoning_text", "text": ""}
                    yield event("response.content_part.added", {**where, "part": empty})
                thoughts.append(item.text)
                yield event("response.reasoning_text.delta", {**where, "delta": item.text})
                continue
            if thinking and (not isinstance(item, Piece) or item.text):
                for chunk in end_thought():
                    yield chunk
            if isinstance(item, Piece):
                pieces.append(item.text)
                if streaming_text and item.text:
                    where = {"item_id": reply.message_id, "output_index": message_index, "content_index": 0}
                    if not opened:
                        opened = True
                        added = {"output_index": message_index, "item": reply.message_item(None)}
                        yield event("response.output_item.added", added)
                        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                        yield event("response.content_part.added", {**where, "part": part})
                    yield event("response.output_text.delta", {**where, "delta": item.text, "logprobs": []})
                continue
            document = reply.finish("".join(pieces), "".join(thoughts) or None, item, store)
            for index, output in enumerate(document["output"]):
                if output["type"] == "reasoning":  # streamed as it came
                    continue
                if output["type"] == "message":
                    text = output["content"][0]["text"]
                    where = {"item_id": output["id"], "output_index": index, "content_index": 0}
                    if not opened:
                        yield event(
                            "response.output_item.added", {"output_index": index, "item": reply.message_item(None)}
                        )
                        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                        yield event("response.content_part.added", {**where, "part": part})
                        if text:
                            yield event("response.output_text.delta", {**where, "delta": text, "logprobs": []})
                    yield event("response.output_text.done", {**where, "text": text, "logprobs": []})
                    yield event("response.content_part.done", {**where, "part": output["content"][0]})
                else:
                    added = {**output, "arguments": "", "status": "in_progress"}
                    yield event("response.output_item.added", {"output_index": index, "item": added})
                    where = {"item_id": output["id"], "output_index": index}
                    yield event("response.function_call_arguments.delta", {**where, "delta": output["arguments"]})
                    yield event("response.function_call_arguments.done", {**where, "arguments": output["arguments"]})
                yield event("response.output_item.done", {"output_index": index, "item": output})
            kind = "response.incomplete" if document["status"] == "incomplete" else "response.completed"
            yield event(kind, {"response": document})
    except ClientGone:
        return
    finally:
        running.close()
