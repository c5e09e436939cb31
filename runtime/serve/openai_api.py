"""OpenAI's API: the request bodies (pydantic models, which /openapi.json describes), what they
become (ChatRequest, CompletionRequest, EmbeddingRequest with the engine's SamplingParams), and
the routes: POST /v1/chat/completions and /v1/completions (whole, or server-sent events ending in
`data: [DONE]`), POST /v1/embeddings, GET /v1/models and /v1/models/{name}."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from slim.runtime.formats.quality import read_quality
from slim.runtime.inference import Failed, Piece, SamplingParams, effort_enables
from slim.runtime.serve.jobs import ClientGone, EventStream, Generation, failure, generations, json_answer, request_log
from slim.runtime.serve.pool import ModelPool, ModelSpec
from slim.runtime.serve.requests import (
    MAX_EMBEDDING_INPUTS,
    Body,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    bad_request,
    json_grammar,
    validated,
)
from slim.runtime.serve.tools import parse_tool_calls

__all__ = [
    "MAX_CHOICES",
    "MAX_EMBEDDING_INPUTS",
    "MAX_STOPS",
    "MAX_TEMPLATE_KWARGS",
    "MAX_TOP_LOGPROBS",
    "ChatBody",
    "CompletionBody",
    "EmbeddingBody",
    "chat_request",
    "completion_request",
    "embedding_request",
    "model_entry",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
    "router",
]

MAX_STOPS = 4
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
MAX_TEMPLATE_KWARGS = 16

# ---- bodies ----------------------------------------------------------------------------------


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # a reply's message sent back as it came (the openai client's message.model_dump()): ignored
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    reasoning_content: str | None = None


class FunctionDefinition(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(Body):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(Body):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="ignored")


# a chat template's own switches: a few names, each a JSON scalar
TemplateVariables = Annotated[dict[str, str | bool | int | float | None], Field(max_length=MAX_TEMPLATE_KWARGS)]


class SamplingFields(Body):
    """What chat and completion requests share: sampling, length, streaming. Beside OpenAI's
    fields, top_k, min_p and repeat_penalty (as llama-server and vLLM take them)."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported; an empty map is accepted")
    # what changes nothing on a local server: accepted and ignored
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def sampling(self, grammar: str | None = None) -> SamplingParams:
        """The engine's defaults (those of `slim run`) for what the request leaves out; the
        penalties count the generated tokens only, as OpenAI's do. max_tokens and penalty_last_n
        are settled once the prompt is known."""
        if self.logit_bias:
            raise bad_request("'logit_bias' is not supported", "logit_bias", "unsupported_parameter")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams().with_options(
            temperature=self.temperature,
            top_p=None if self.top_p is None else self.top_p or 1e-6,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            penalize_prompt=False,
            seed=None if self.seed is None else self.seed % 0xFFFFFFFF,
            stop=tuple(s for s in stops if s),
            grammar=grammar,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatBody(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: use tools")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="for a thinking template: none and minimal switch thinking off, the others on"
    )
    thinking_budget: Annotated[int, Field(ge=0)] | None = Field(
        None, description="for a thinking template: the most tokens of thought, then </think> is written (Qwen's name)"
    )
    chat_template_kwargs: TemplateVariables | None = Field(
        None, description="variables for the chat template (enable_thinking...), as llama-server and vLLM take them"
    )
    parallel_tool_calls: bool | None = Field(None, description="ignored: a reply may hold several calls")


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingBody(Body):
    model: str
    input: str | list[int] | list[str | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(None, description="ignored")


# ---- what they become ----------------------------------------------------------------------------


def chat_request(body: ChatBody) -> ChatRequest:
    if body.functions:
        raise bad_request("'functions' is not supported; use 'tools'", "functions", "unsupported_parameter")
    tools, forced = None, None
    if body.tools is not None and body.tool_choice != "none":
        tools, forced = _tools(body.tools, body.tool_choice)
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    if forced is not None and body.response_format is not None and body.response_format.type != "text":
        raise bad_request("a forced tool call cannot be combined with response_format", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return ChatRequest(
        body.model,
        messages,
        tools,
        forced,
        body.sampling(_grammar(body.response_format)).with_options(thinking_budget=body.thinking_budget),
        max_tokens,
        (body.top_logprobs or 0) if body.logprobs else None,
        body.stream,
        body.include_usage,
        body.n or 1,
        effort_enables(body.reasoning_effort),
        dict(body.chat_template_kwargs or {}),
    )


def completion_request(body: CompletionBody) -> CompletionRequest:
    prompt: str | list[int]
    if isinstance(body.prompt, str):
        prompt = body.prompt
    elif len(body.prompt) == 1 and isinstance(body.prompt[0], str):
        prompt = body.prompt[0]
    elif body.prompt and all(isinstance(t, int) for t in body.prompt):
        prompt = [int(t) for t in body.prompt]
    else:
        raise bad_request(
            "'prompt' must be a string (or one list of token ids); batches of prompts are not supported",
            "prompt",
            "invalid_type",
        )
    if body.echo or body.suffix or body.best_of not in (None, 1):
        raise bad_request("'echo', 'suffix' and 'best_of' are not supported", "echo", "unsupported_parameter")
    return CompletionRequest(
        body.model,
        prompt,
        body.sampling(),
        body.max_tokens,
        body.logprobs,
        body.stream,
        body.include_usage,
        body.n or 1,
    )


def embedding_request(body: EmbeddingBody) -> EmbeddingRequest:
    if body.dimensions is not None:
        raise bad_request("'dimensions' is not supported", "dimensions", "unsupported_parameter")
    value = body.input
    inputs: list[str | list[int]] = []
    if isinstance(value, str):
        inputs = [value]
    elif value and all(isinstance(t, int) for t in value):
        inputs = [[t for t in value if isinstance(t, int)]]  # one list of token ids
    else:
        inputs = [t for t in value if not isinstance(t, int)]
    if not inputs:
        raise bad_request("'input' must be a string, a list of strings, or token ids", "input", "invalid_type")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items", "input")
    return EmbeddingRequest(body.model, inputs, body.encoding_format)


def parse_chat(body: Any) -> ChatRequest:
    """A chat request from a parsed JSON body (as the route gets it, validated by the same model)."""
    return chat_request(validated(ChatBody, body))


def parse_completion(body: Any) -> CompletionRequest:
    return completion_request(validated(CompletionBody, body))


def parse_embeddings(body: Any) -> EmbeddingRequest:
    return embedding_request(validated(EmbeddingBody, body))


def _message(message: Message, i: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    if content is None:
        if message.role != "assistant" and not message.tool_calls:
            raise bad_request(
                f"messages[{i}].content must be a string or a list of text parts",
                f"messages[{i}].content",
                "invalid_type",
            )
        content = ""
    checked: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": content}
    if message.tool_calls:
        checked["tool_calls"] = []
        for call in message.tool_calls:
            arguments = call.function.arguments
            if isinstance(arguments, str):  # chat templates expect the arguments as an object
                try:
                    arguments = json.loads(arguments or "{}")
                except ValueError:
                    raise bad_request(
                        f"messages[{i}].tool_calls arguments must be JSON", f"messages[{i}].tool_calls"
                    ) from None
            checked["tool_calls"].append(
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
            )
    if message.tool_call_id is not None:
        checked["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        checked["name"] = message.name
    if message.reasoning_content:  # a thinking template may render an earlier turn's thought
        checked["reasoning_content"] = message.reasoning_content
    return checked


def _grammar(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_grammar(None, "response_format")
    if fmt.json_schema is None:
        raise bad_request("response_format.json_schema must be an object with a 'schema' object", "response_format")
    return json_grammar(fmt.json_schema.json_schema, "response_format")


def _tools(tools: list[Tool], choice: str | NamedToolChoice | None) -> tuple[list[dict[str, Any]], str | None]:
    """The tools as chat templates take them, and the name of the function tool_choice forces
    ("" for "required": any of them), None when no call is forced."""
    listed = [tool.model_dump(exclude_none=True) for tool in tools]
    names = [tool.function.name for tool in tools]
    if choice is None or choice == "auto":
        return listed, None
    if choice == "required":
        return listed, ""
    assert isinstance(choice, NamedToolChoice)
    if choice.function.name not in names:
        raise bad_request(f"tool_choice names {choice.function.name!r}, which is not one of the tools", "tool_choice")
    return listed, choice.function.name


# ---- routes ------------------------------------------------------------------------------------

router = APIRouter()


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def model_entry(pool: ModelPool, spec: ModelSpec) -> dict[str, Any]:
    """OpenAI's model object, plus `state` (loaded, loading or unloaded) and the other names."""
    return {
        "id": spec.id,
        "object": "model",
        "created": int(spec.path.stat().st_mtime) if spec.path.exists() else 0,
        "owned_by": "slim",
        "state": pool.state(spec),
        "aliases": spec.names[1:],
        "quality": asdict(quality) if (quality := read_quality(spec.path)) else None,
    }


@router.get("/v1/models", summary="The models this server serves")
async def list_models(request: Request) -> Response:
    pool = _pool(request)
    return json_answer({"object": "list", "data": [model_entry(pool, spec) for spec in pool.listing()]})


@router.get("/v1/models/{name:path}", summary="One model, by any of its names")
async def get_model(name: str, request: Request) -> Response:
    pool = _pool(request)
    return json_answer(model_entry(pool, pool.spec(name)))


@router.post("/v1/chat/completions", summary="A chat reply (streamed as server-sent events with stream: true)")
async def chat_completions(body: ChatBody, request: Request) -> Response:
    parsed = chat_request(body)
    runs = await generations(request, _pool(request), parsed.model, lambda served: served.chat_job(parsed), parsed.n)
    return await _answer(runs, True, parsed.stream, parsed.include_usage)


@router.post("/v1/completions", summary="A continuation of a prompt (streamed with stream: true)")
async def completions(body: CompletionBody, request: Request) -> Response:
    parsed = completion_request(body)
    runs = await generations(
        request, _pool(request), parsed.model, lambda served: served.completion_job(parsed), parsed.n
    )
    return await _answer(runs, False, parsed.stream, parsed.include_usage)


@router.post("/v1/embeddings", summary="Mean-pooled, L2-normalised embeddings")
async def embeddings(body: EmbeddingBody, request: Request) -> Response:
    parsed = embedding_request(body)
    pool = _pool(request)
    log = request_log(request)
    log.model = parsed.model

    def embed() -> tuple[str, list[list[float]], int]:
        with pool.use(parsed.model) as served:
            inputs = served.embedding_inputs(parsed)
            return served.id, [served.embed(tokens) for tokens in inputs], sum(len(t) for t in inputs)

    model_id, vectors, n = await run_in_threadpool(embed)
    log.prompt_tokens = n
    data = []
    for i, vector in enumerate(vectors):
        value: Any = vector
        if parsed.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return json_answer(
        {"object": "list", "data": data, "model": model_id, "usage": {"prompt_tokens": n, "total_tokens": n}}
    )


# ---- answers -------------------------------------------------------------------------------------


def _usage(runs: list[Generation], completion_tokens: int, thought_tokens: int) -> dict[str, Any]:
    """The prompt counted once (as OpenAI counts it for n choices), the completions together."""
    prompt = len(runs[0].job.prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": runs[0].job.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": thought_tokens},
    }


async def _answer(runs: list[Generation], chat: bool, stream: bool, include_usage: bool) -> Response:
    if not stream:
        try:
            return await _whole(runs, chat)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the log says the client left
        finally:
            for running in runs:
                running.close()
    try:
        for running in runs:
            await running.begin()
    except BaseException:
        for running in runs:
            running.close()
        raise
    return EventStream(_chunks(runs, chat, include_usage))


def _reply(running: Generation, text: str, thought: str | None = None) -> tuple[dict[str, Any], bool]:
    """A chat reply's message (its thought in reasoning_content, as llama-server and vLLM put it),
    and whether it is tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thought is not None:
        message["reasoning_content"] = thought
    if running.job.tools:
        content, calls = parse_tool_calls(text)
        if calls:
            return {**message, "content": content, "tool_calls": calls}, True
    return message, False


async def _whole(runs: list[Generation], chat: bool) -> Response:
    choices, generated, thought_tokens = [], 0, 0
    for index, (text, thought, last, logprobs) in enumerate(await asyncio.gather(*(r.reply() for r in runs))):
        running, reason = runs[index], last.finish_reason
        generated += last.completion_tokens
        thought_tokens += last.thought_tokens
        wanted = running.job.top_logprobs is not None
        if chat:
            message, calls = _reply(running, text, thought)
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": {"content": logprobs} if wanted else None,
                    "finish_reason": "tool_calls" if calls else reason,
                }
            )
        else:
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": _completion_logprobs(logprobs) if wanted else None,
                    "finish_reason": reason,
                }
            )
    return json_answer(
        {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": runs[0].id,
            "system_fingerprint": "slim",
            "choices": choices,
            "usage": _usage(runs, generated, thought_tokens),
        }
    )


async def _merged(runs: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) as the choices' events come."""
    if len(runs) == 1:
        async for event in runs[0].events():
            yield 0, event
        return
    streams = [r.events() for r in runs]
    waiting = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = waiting.pop(future)
                try:
                    event = future.result()
                except StopAsyncIteration:
                    continue
                yield index, event
                waiting[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for future in waiting:
            future.cancel()


async def _chunks(runs: list[Generation], chat: bool, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The server-sent events of a streamed answer, the choices' chunks as they come."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        document: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": runs[0].id,
            "system_fingerprint": "slim",
            "choices": choices,
        }
        if include_usage:
            document["usage"] = usage
        return b"data: " + json.dumps(document, ensure_ascii=False).encode() + b"\n\n"

    def choice(
        index: int, delta: dict[str, Any] | str, reason: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        if chat:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": reason}

    held: list[list[str]] = [[] for _ in runs]  # a reply that may hold tool calls is sent when complete
    generated = thought_tokens = 0
    try:
        if chat:
            yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(len(runs))])
        async for index, event in _merged(runs):
            running = runs[index]
            if isinstance(event, Failed):
                yield b"data: " + json.dumps(failure(event).body()).encode() + b"\n\n"
                break
            if isinstance(event, Piece) and event.thinking:
                yield chunk([choice(index, {"reasoning_content": event.text})])
            elif isinstance(event, Piece) and running.job.tools:
                held[index].append(event.text)
            elif isinstance(event, Piece):
                lp = event.logprobs
                if chat:
                    logprobs = {"content": [lp]} if lp is not None else None
                    yield chunk([choice(index, {"content": event.text}, None, logprobs)])
                else:
                    logprobs = _completion_logprobs([lp]) if lp is not None else None
                    yield chunk([choice(index, event.text, None, logprobs)])
            else:
                reason = event.finish_reason
                generated += event.completion_tokens
                thought_tokens += event.thought_tokens
                if running.job.tools:
                    message, calls = _reply(running, "".join(held[index]))
                    if calls:
                        reason = "tool_calls"
                        deltas = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                        yield chunk([choice(index, {"tool_calls": deltas})])
                    if message["content"]:
                        yield chunk([choice(index, {"content": message["content"]})])
                yield chunk([choice(index, {} if chat else "", reason)])
        else:
            if include_usage:
                yield chunk([], _usage(runs, generated, thought_tokens))
        yield b"data: [DONE]\n\n"
    except ClientGone:
        return
    finally:
        for running in runs:
            running.close()


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions logprobs layout."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }
