"""Ollama's API, for the apps written for Ollama: POST /api/chat and /api/generate (streamed as
NDJSON by default, or whole with "stream": false), POST /api/embed (and the older
/api/embeddings), GET /api/tags, POST /api/show, GET /api/ps, GET /api/version. `options` map
onto the engine's SamplingParams (what is left out takes the defaults of `slim run`; what only
sets up a model, such as num_gpu, is accepted and ignored); `keep_alive` sets how long the model
stays loaded after the request, as the pool's keep-alive does for every model; a request with no
messages (or prompt) only loads the model, or with keep_alive 0 unloads it. Errors come in
Ollama's shape {"error": "message"}."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import AfterValidator, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from slim.runtime.inference import Done, Failed, Piece, SamplingParams
from slim.runtime.serve.jobs import ClientGone, EventStream, Generation, failure, generation, json_answer, request_log
from slim.runtime.serve.pool import ModelPool, ModelSpec, Served
from slim.runtime.serve.requests import (
    MAX_EMBEDDING_INPUTS,
    APIError,
    Body,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    bad_request,
    json_grammar,
)
from slim.runtime.serve.tools import parse_tool_calls

__all__ = ["OllamaChatBody", "GenerateBody", "Options", "error_body", "keep_alive_seconds", "router"]

# ---- bodies ----------------------------------------------------------------------------------


class Options(Body):
    """Ollama's options. Sampling ones map onto SamplingParams; the ones that set up a model (the
    server's flags do that for every request) are accepted and ignored."""

    num_predict: Annotated[int | None, Field(description="tokens to generate; -1 or -2: the rest of the context")] = (
        None
    )
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0)] | None = None
    repeat_last_n: Annotated[int | None, Field(ge=-1, description="-1: the whole context")] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    typical_p: Annotated[float | None, Field(description="only 1 (off) is supported")] = None
    mirostat: Annotated[int | None, Field(description="only 0 (off) is supported")] = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    tfs_z: float | None = None
    penalize_newline: bool | None = None
    # set up by the server's flags: ignored
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    numa: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    vocab_only: bool | None = None
    logits_all: bool | None = None
    embedding_only: bool | None = None

    def sampling(self, grammar: str | None) -> tuple[SamplingParams, int | None]:
        """The sampling parameters (penalties as llama.cpp counts them, the prompt's tokens
        included) and the tokens to generate (None: the rest of the context)."""
        if self.mirostat:
            raise bad_request("mirostat sampling is not supported", "options.mirostat", "unsupported_parameter")
        if self.typical_p not in (None, 1.0):
            raise bad_request("typical_p sampling is not supported", "options.typical_p", "unsupported_parameter")
        params = SamplingParams().with_options(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=None if self.top_p is None else self.top_p or 1e-6,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            penalty_last_n=None if self.repeat_last_n is None else max(self.repeat_last_n, 0) or None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None or self.seed < 0 else self.seed % 0xFFFFFFFF,
            stop=None if self.stop is None else tuple(s for s in self.stop if s),
            grammar=grammar,
        )
        if self.repeat_last_n == -1:
            params = params.with_options(penalty_last_n=1 << 30)
        max_tokens = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        return params, max_tokens


class OllamaFunctionCall(Body):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class OllamaToolCall(Body):
    function: OllamaFunctionCall
    id: str | None = None
    type: Literal["function"] | None = None


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = Field(None, description="an earlier reply's thought (a thinking template may render it)")


class Function(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(Body):
    type: Literal["function"] = "function"
    function: Function


KeepAlive = float | str
# Ollama's names carry a tag, ":latest" when none is given; slim's have none
ModelName = Annotated[str, AfterValidator(lambda name: name.removesuffix(":latest"))]


class GenerationFields(Body):
    model: ModelName
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive | None = Field(None, description='how long the model stays loaded: 300, "5m", -1, 0')
    think: bool | Literal["low", "medium", "high"] | None = Field(
        None, description="for a thinking template: false switches thinking off, the others on"
    )
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class OllamaChatBody(GenerationFields):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None


class GenerateBody(GenerationFields):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class EmbedBody(Body):
    model: ModelName
    input: str | Annotated[list[str], Field(max_length=MAX_EMBEDDING_INPUTS)]
    truncate: bool = True
    options: Options | None = None
    keep_alive: KeepAlive | None = None
    dimensions: int | None = None


class EmbeddingsBody(Body):
    model: ModelName
    prompt: str
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class ShowBody(Body):
    model: ModelName | None = None
    name: ModelName | None = Field(None, description="the older name of model")
    verbose: bool | None = None


# ---- what they become ----------------------------------------------------------------------------

FOREVER = 100 * 365 * 86400.0  # seconds: a keep_alive longer than this is for ever
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: KeepAlive | None) -> float | None:
    """Ollama's keep_alive in seconds: a number of seconds, or a duration such as "5m" or "1h30m";
    negative, or longer than FOREVER: for ever (-1). None when not given."""
    if value is None:
        return None
    seconds = _duration(value)
    if math.isnan(seconds):
        raise bad_request(f"keep_alive {value!r} is not a duration such as 300, '5m' or '-1'", "keep_alive")
    return -1.0 if seconds < 0 or seconds > FOREVER else seconds


def _duration(value: float | int | str) -> float:
    if isinstance(value, float | int):
        return float(value)
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    try:
        return sign * float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise bad_request(f"keep_alive {value!r} is not a duration such as 300, '5m' or '-1'", "keep_alive")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def _grammar(fmt: Literal["", "json"] | dict[str, Any] | None) -> str | None:
    if not fmt:
        return None
    return json_grammar(fmt if isinstance(fmt, dict) else None, "format")


def chat_request(body: OllamaChatBody) -> ChatRequest:
    if any(m.images for m in body.messages):
        raise bad_request("images are not supported", "messages", "unsupported_parameter")
    messages = []
    for message in body.messages:
        checked: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            checked["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in message.tool_calls
            ]
        if message.tool_name is not None:
            checked["name"] = message.tool_name
        if message.tool_call_id is not None:
            checked["tool_call_id"] = message.tool_call_id
        if message.thinking:
            checked["reasoning_content"] = message.thinking
        messages.append(checked)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    params, max_tokens = (body.options or Options()).sampling(_grammar(body.format))
    top = (body.top_logprobs or 0) if body.logprobs else None
    return ChatRequest(
        body.model, messages, tools, None, params, max_tokens, top, body.stream, False, 1, _think(body.think)
    )


def generate_request(body: GenerateBody) -> ChatRequest | CompletionRequest:
    """Raw: the prompt continued as it is; else the prompt (and system) as a chat's user turn."""
    for name in ("suffix", "template", "context", "images"):
        if getattr(body, name):
            raise bad_request(f"'{name}' is not supported", name, "unsupported_parameter")
    params, max_tokens = (body.options or Options()).sampling(_grammar(body.format))
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.raw:
        return CompletionRequest(body.model, body.prompt, params, max_tokens, top, body.stream, False)
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    return ChatRequest(
        body.model, messages, None, None, params, max_tokens, top, body.stream, False, 1, _think(body.think)
    )


def _think(think: bool | str | None) -> bool | None:
    """Ollama's think (true, false, or an effort) as the switch of a thinking template."""
    return think if think is None or isinstance(think, bool) else True


def error_body(error: APIError) -> dict[str, Any]:
    return {"error": error.message}


# ---- routes ------------------------------------------------------------------------------------

router = APIRouter()


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@router.get("/api/version", summary="The server's version")
async def version() -> Response:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        number = package_version("slim-llm")
    except PackageNotFoundError:
        number = "0.0.0"
    return json_answer({"version": number})


@router.post("/api/chat", summary="A chat reply (streamed as NDJSON unless stream is false)")
async def chat(body: OllamaChatBody, request: Request) -> Response:
    parsed = chat_request(body)
    keep_alive = keep_alive_seconds(body.keep_alive)
    if not body.messages:
        return await _load_only(request, body.model, keep_alive, "message")
    running = await generation(request, _pool(request), body.model, lambda served: served.chat_job(parsed))
    running.keep_alive = keep_alive
    return await _answer(running, parsed.stream, chat=True)


@router.post("/api/generate", summary="A completion of a prompt (streamed as NDJSON unless stream is false)")
async def generate(body: GenerateBody, request: Request) -> Response:
    parsed = generate_request(body)
    keep_alive = keep_alive_seconds(body.keep_alive)
    if not body.prompt and not body.system:
        return await _load_only(request, body.model, keep_alive, "response")
    if isinstance(parsed, ChatRequest):
        chat_parsed = parsed
        running = await generation(request, _pool(request), body.model, lambda s: s.chat_job(chat_parsed))
    else:
        raw = parsed
        running = await generation(request, _pool(request), body.model, lambda s: s.completion_job(raw))
    running.keep_alive = keep_alive
    return await _answer(running, body.stream, chat=False)


@router.post("/api/embed", summary="Embeddings of one text or several")
async def embed(body: EmbedBody, request: Request) -> Response:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.dimensions is not None:
        raise bad_request("'dimensions' is not supported", "dimensions", "unsupported_parameter")
    vectors, n, seconds = await _embed(request, body.model, texts, body.truncate, keep_alive_seconds(body.keep_alive))
    return json_answer(
        {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": int(seconds * 1e9),
            "load_duration": 0,
            "prompt_eval_count": n,
        }
    )


@router.post("/api/embeddings", summary="The embedding of one prompt (Ollama's older route)")
async def embeddings(body: EmbeddingsBody, request: Request) -> Response:
    vectors, _, _ = await _embed(request, body.model, [body.prompt], True, keep_alive_seconds(body.keep_alive))
    return json_answer({"embedding": vectors[0]})


@router.get("/api/tags", summary="The models this server serves")
async def tags(request: Request) -> Response:
    pool = _pool(request)
    return json_answer({"models": [await run_in_threadpool(_model_entry, spec) for spec in pool.listing()]})


@router.get("/api/ps", summary="The models loaded now")
async def ps(request: Request) -> Response:
    pool = _pool(request)
    models = []
    for served in pool.loaded():
        entry = await run_in_threadpool(_model_entry, pool.spec(served.id))
        expires = pool.expires_in(served)
        until = datetime.now(UTC) + timedelta(seconds=FOREVER if expires is None else min(expires, FOREVER))
        entry.update(
            size_vram=0,
            size=served.memory.total,
            context_length=served.model.n_ctx,
            expires_at=until.isoformat().replace("+00:00", "Z"),
        )
        models.append(entry)
    return json_answer({"models": models})


@router.post("/api/show", summary="A model's details, chat template and metadata")
async def show(body: ShowBody, request: Request) -> Response:
    name = body.model or body.name
    if not name:
        raise bad_request("'model' is required", "model", "missing_required_parameter")
    spec = _pool(request).spec(name)
    return json_answer(await run_in_threadpool(_show, spec))


# ---- answers -------------------------------------------------------------------------------------


def _model_entry(spec: ModelSpec) -> dict[str, Any]:
    """An entry of /api/tags: names, file size and time, and details from the GGUF's header."""
    from slim.runtime.formats.gguf_file import check_gguf

    stat = spec.path.stat()
    metadata = check_gguf(spec.path)
    family = str(metadata.get("general.architecture", ""))
    return {
        "name": spec.id,
        "model": spec.id,
        "modified_at": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat().replace("+00:00", "Z"),
        "size": stat.st_size,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": str(metadata.get("general.size_label", "")),
            "quantization_level": _file_type(metadata.get("general.file_type")),
        },
    }


def _file_type(value: Any) -> str:
    """Q4_K_M, Q8_0, F16, ... from general.file_type."""
    if value is None:
        return ""
    import gguf

    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(value)


def _show(spec: ModelSpec) -> dict[str, Any]:
    from slim.runtime.formats.gguf_file import check_gguf

    metadata = check_gguf(spec.path)
    template = str(metadata.get("tokenizer.chat_template", ""))
    entry = _model_entry(spec)
    capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    info = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.chat_template")}
    return {
        "license": str(metadata.get("general.license", "")),
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": entry["details"],
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": entry["modified_at"],
    }


async def _load_only(request: Request, model: str, keep_alive: float | None, field: str) -> Response:
    """No messages (or prompt): load the model, or with keep_alive 0 let it go at once."""
    pool = _pool(request)
    request_log(request).model = model
    served: Served = await run_in_threadpool(pool.acquire, model)
    pool.release(served, keep_alive)
    reason = "unload" if keep_alive == 0 else "load"
    document: dict[str, Any] = {"model": served.id, "created_at": _now(), "done": True, "done_reason": reason}
    document[field] = {"role": "assistant", "content": ""} if field == "message" else ""
    return json_answer(document)


async def _embed(
    request: Request, model: str, texts: list[str], truncate: bool, keep_alive: float | None
) -> tuple[list[list[float]], int, float]:
    pool = _pool(request)
    log = request_log(request)
    log.model = model
    started = time.monotonic()

    def run() -> tuple[list[list[float]], int]:
        served = pool.acquire(model)
        try:
            limit = served.embedder.n_ctx
            tokens = [served.model.tokenize(t)[:limit] if truncate else served.model.tokenize(t) for t in texts]
            inputs = served.embedding_inputs(EmbeddingRequest(model, list(tokens), "float"))
            return [served.embed(t) for t in inputs], sum(len(t) for t in inputs)
        finally:
            pool.release(served, keep_alive)

    vectors, n = await run_in_threadpool(run)
    log.prompt_tokens = n
    return vectors, n, time.monotonic() - started


def _final(running: Generation, done: Done, started: float, first: float) -> dict[str, Any]:
    """The last object's counts and durations (nanoseconds: the prompt's until the first token)."""
    now = time.monotonic()
    return {
        "done": True,
        "done_reason": done.finish_reason,
        "total_duration": int((now - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": len(running.job.prompt),
        "prompt_eval_duration": int((first - started) * 1e9),
        "eval_count": done.completion_tokens,
        "eval_duration": int((now - first) * 1e9),
    }


def _message(text: str, tools: bool, thought: str | None = None) -> dict[str, Any]:
    content, calls = parse_tool_calls(text) if tools else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if thought:
        message["thinking"] = thought
    if calls:
        message["tool_calls"] = [
            {"function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in calls
        ]
    return message


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


async def _answer(running: Generation, stream: bool, chat: bool) -> Response:
    started = request_log(running.request).arrived
    if not stream:
        try:
            text, thought, last, logprobs = await running.reply()
        except ClientGone:
            return Response(status_code=499)
        finally:
            running.close()
        document: dict[str, Any] = {"model": running.id, "created_at": _now()}
        if chat:
            document["message"] = _message(text, running.job.tools, thought)
        else:
            document["response"] = text
            if thought:
                document["thinking"] = thought
        if running.job.top_logprobs is not None:
            document["logprobs"] = logprobs
        return json_answer({**document, **_final(running, last, started, running.first_at or started)})
    try:
        await running.begin()
    except ClientGone:
        return Response(status_code=499)
    return EventStream(_lines(running, chat, started), "application/x-ndjson")


async def _lines(running: Generation, chat: bool, started: float) -> AsyncGenerator[bytes, None]:
    """One JSON object per line: a piece of the reply each, then the counts (with tools, the
    whole reply in one object once it is complete)."""

    def line(document: dict[str, Any]) -> bytes:
        return json.dumps({"model": running.id, "created_at": _now(), **document}, ensure_ascii=False).encode() + b"\n"

    tools = running.job.tools
    held: list[str] = []
    try:
        async for event in running.events():
            if isinstance(event, Failed):
                yield line({"error": failure(event).message})
                return
            if isinstance(event, Piece):
                if tools and not event.thinking:
                    held.append(event.text)
                    continue
                piece: dict[str, Any]
                if event.thinking:  # Ollama's thought: message.thinking (chat) or thinking, beside an empty answer
                    thought = {"role": "assistant", "content": "", "thinking": event.text}
                    piece = {"message": thought} if chat else {"response": "", "thinking": event.text}
                elif chat:
                    piece = {"message": {"role": "assistant", "content": event.text}}
                else:
                    piece = {"response": event.text}
                if event.logprobs is not None:
                    piece["logprobs"] = [event.logprobs]
                yield line({**piece, "done": False})
                continue
            if held:
                yield line({"message": _message("".join(held), True), "done": False})
            end: dict[str, Any] = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            yield line({**end, **_final(running, event, started, running.first_at or started)})
    except ClientGone:
        return
    finally:
        running.close()
