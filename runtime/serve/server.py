"""slim's OpenAI-compatible HTTP server, with continuous batching, serving models on demand.

    from slim.runtime.inference import engine
    from slim.runtime.serve import server

    model = engine.load("smollm2.gguf", n_ctx=4 * 2048, n_seq_max=4)
    app = server.Server(model, model_names=["smollm2-135m", "smollm2.gguf"], api_key=None)
    app.serve("127.0.0.1", 8080)            # or app.start(...) for a background thread

    pool = server.ModelPool([server.ModelSpec(["small"], Path("small.gguf")),     # several models,
                             server.ModelSpec(["large"], Path("large.gguf"))],    # loaded on demand
                            parallel=4, memory_budget=8 << 30, keep_alive=300)
    server.Server(pool).serve()

Routes: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events ending in
`data: [DONE]`, or whole; response_format json_object / json_schema enforced by a grammar;
logprobs; `tools` for chat templates that render them, returning `tool_calls`, with tool_choice
"required" or a named function enforced by a grammar), POST /v1/embeddings (mean-pooled,
L2-normalised, from a second context made on first use), GET /v1/models, GET /health.
Errors use OpenAI's error shape {"error": {"message", "type", "param", "code"}}. With an API key,
every route but /health needs `Authorization: Bearer KEY`.

Models. A request's "model" picks one of the pool's models (ModelPool). A model is loaded by its
first request, on that request's thread (requests for it wait; the others go on), and gets its own
Scheduler and Embedder; it is unloaded `keep_alive` seconds after its last request. Each model's
memory is estimated before loading (file + KV cache + compute buffers, MemoryEstimate); a load that
would pass the budget unloads idle models, least recently used first, or is refused (503 while the
others are busy, 400 if the model alone is larger than the budget). A file that fails to load is a
500 for the requests that asked for it, and nothing else.

Design. Each model's scheduler thread owns its llama.cpp context. Every step it builds one
llama_batch that holds the next token of every generating sequence plus prompt chunks of newly
admitted requests, in ascending sequence order (see Scheduler._step), calls llama_decode once, and
samples each sequence that produced logits with that sequence's own sampler chain at its index in
the batch. Text pieces go through the engine's _TextAssembler (UTF-8
joins, stop strings) and are handed to the HTTP handler threads through a queue per request. The
HTTP side is the standard library's threading server: one thread per connection, which only parses,
validates, tokenizes and then waits on its request's queue; it watches its socket, so a client that
goes away cancels its request and the scheduler frees the sequence on its next step.

Sampling follows OpenAI's defaults (temperature 1, top_p 1, no top-k or min-p); temperature 0 is
greedy. presence_penalty and frequency_penalty count the generated tokens; max_tokens (or
max_completion_tokens) defaults to the rest of the sequence's context.

Each of the `parallel` KV-cache sequences (the engine's slots) keeps the tokens it holds after a
request ends, so a later request with the same prefix (the next turn of a chat) is only evaluated
from where the two differ.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import math
import os
import queue
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from slim.runtime.inference import engine
from slim.runtime.inference.engine import (
    FALLBACK_STOPS,
    ContextError,
    TemplateError,
    sampler_chain,
    _TextAssembler,
)
from slim.runtime.formats.gguf_file import check_gguf

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
_POLL_S = 0.1
# Prompt tokens a step takes beyond the oldest waiting prompt's chunk (see Scheduler._step)
PROMPT_BUDGET = 40


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------
# One generation request, as the scheduler sees it
# --------------------------------------------------------------------------------------------

@dataclass
class Job:
    """What to generate. Events on `events`: ("piece", text, logprobs | None), then either
    ("done", finish_reason, completion_tokens) or ("error", APIError)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the chosen token plus this many alternatives
    tools: bool = False          # the reply may hold tool calls, parsed when it ends
    events: queue.Queue[tuple] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # scheduler state
    slot: Any = None
    chain: Any = None
    fed: int = 0                 # prompt tokens already in the slot's KV cache
    next_token: int | None = None
    generated: int = 0
    text: _TextAssembler | None = None
    cached_tokens: int = 0


class Scheduler:
    """Continuous batching over the slots of one engine.Model. Thread-safe `submit`; everything
    that touches llama.cpp happens on the scheduler's own thread."""

    def __init__(self, model: engine.Model, queue_size: int = 64) -> None:
        self.model = model
        self._L = model._L
        self._slots = list(model._slots)
        self.parallel = len(self._slots)
        self.queue_size = queue_size
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._free = list(self._slots)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="slim-scheduler", daemon=True)
        self.steps = 0
        # events of this step, handed to the HTTP threads as the next llama_decode starts: woken
        # earlier, they take the GIL from the sampling loop (measured: 16% less time between steps)
        self._outbox: list[tuple[Job, tuple]] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", "server_error", code="unavailable")
            if len(self._pending) >= self.queue_size:  # forget waiting requests whose clients left
                self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            if len(self._pending) >= self.queue_size:
                raise APIError(503, f"the server is busy ({self.parallel} requests running, {len(self._pending)} "
                               "waiting); retry shortly", "server_error", code="overloaded",
                               headers={"Retry-After": "1"})
            self._pending.append(job)
            self._cond.notify_all()

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._active), "waiting": len(self._pending), "parallel": self.parallel}

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self._pending and len(admitted) < len(self._free):
                    job = self._pending.popleft()
                    if not job.cancelled.is_set():
                        admitted.append(job)
            for job in admitted:
                try:
                    self._admit(job)
                except APIError as error:
                    self._finish(job, error=error)
                except Exception as exc:
                    self._finish(job, error=APIError(500, f"internal error: {exc}", "server_error"))
            try:
                self._step()
            except Exception as exc:  # never let the scheduler die: fail what is running
                for job in list(self._active):
                    self._finish(job, error=APIError(500, f"internal error: {exc}", "server_error"))
            if not self._active:
                self._deliver()
        for job in list(self._active):
            self._finish(job, error=APIError(503, "the server is shutting down", "server_error"))
        self._deliver()
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for job in pending:
            job.events.put(("error", APIError(503, "the server is shutting down", "server_error")))

    def _admit(self, job: Job) -> None:
        model = self.model
        # the slot holding the longest prefix of the prompt; among equals the lowest sequence id,
        # which keeps the running sequences consecutive (see _step)
        best = max(self._free, key=lambda s: (engine._common_prefix(s.tokens, job.prompt), -s.seq_id))
        self._free.remove(best)
        keep = min(engine._common_prefix(best.tokens, job.prompt), len(job.prompt) - 1)
        model._truncate(best, keep)
        best.epoch += 1
        job.slot, job.fed, job.cached_tokens = best, len(best.tokens), len(best.tokens)
        job.chain = self._sampler(job)
        job.text = _TextAssembler(job.stop)
        self._active.append(job)

    def _sampler(self, job: Job) -> Any:
        try:
            return sampler_chain(self.model, temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
                                 min_p=job.min_p, seed=job.seed, frequency_penalty=job.frequency_penalty,
                                 presence_penalty=job.presence_penalty, penalty_last_n=job.max_tokens,
                                 grammar=job.grammar)
        except ValueError:
            raise APIError(400, "the response_format could not be turned into a grammar", param="response_format") from None

    def _finish(self, job: Job, reason: str | None = None, error: APIError | None = None) -> None:
        if job.chain is not None:
            self._L.llama_sampler_free(job.chain)
            job.chain = None
        if job in self._active:
            self._active.remove(job)
        if job.slot is not None:
            # the KV cache holds exactly slot.tokens: drop anything a failed decode left behind
            self.model._truncate(job.slot, len(job.slot.tokens))
            self._free.append(job.slot)
            job.slot = None
        if error is not None:
            self._outbox.append((job, ("error", error)))
        elif reason is not None:
            tail = job.text.finish() if job.text is not None else ""
            if tail:
                self._outbox.append((job, ("piece", tail, None)))
            self._outbox.append((job, ("done", reason, job.generated)))

    def _deliver(self) -> None:
        for job, event in self._outbox:
            job.events.put(event)
        self._outbox.clear()

    def _step(self) -> None:
        L, model = self._L, self.model
        for job in [j for j in self._active if j.cancelled.is_set()]:
            self._finish(job)
        if not self._active:
            return
        batch = model._batch
        # The next token of every generating sequence; the oldest waiting prompt, in chunks as large
        # as the batch allows; then, within PROMPT_BUDGET tokens, whole prompts shortest first: a
        # burst of short requests gets its first tokens over a few short steps rather than one long
        # one (8 clients: p50 first token -30%, measured), and the oldest prompt never starves.
        fed = [(job, [job.next_token]) for job in self._active if job.next_token is not None]
        room = batch.capacity - len(fed)
        prompting = [job for job in self._active if job.next_token is None and job.fed < len(job.prompt)]
        if prompting and room > 0:
            oldest = prompting[0]
            fed.append((oldest, oldest.prompt[oldest.fed:oldest.fed + room]))
            budget = min(room, PROMPT_BUDGET) - len(fed[-1][1])
            for job in sorted(prompting[1:], key=lambda j: len(j.prompt) - j.fed):
                if len(job.prompt) - job.fed > budget:
                    break
                fed.append((job, job.prompt[job.fed:]))
                budget -= len(fed[-1][1])
        if not fed:
            return
        # In ascending sequence order: with one KV stream per sequence, llama.cpp splits a batch
        # into micro-batches of consecutive, increasing sequence ids, so any other order costs
        # extra passes over the weights (8 sequences shuffled: +50% time per step, measured).
        fed.sort(key=lambda entry: entry[0].slot.seq_id)
        batch.clear()
        sample_at: list[tuple[Job, int]] = []
        for job, tokens in fed:
            pos = len(job.slot.tokens)
            last = job.next_token is not None or job.fed + len(tokens) == len(job.prompt)
            for i, token in enumerate(tokens):
                batch.add(token, pos + i, job.slot.seq_id, last and i == len(tokens) - 1)
            if last:
                sample_at.append((job, batch.n - 1))
        batch.raw.n_tokens = batch.n
        self._deliver()
        rc = L.llama_decode(model._ctx, batch.raw)
        self.steps += 1
        if rc != 0:
            message = ("the KV cache is full" if rc == 1 else f"llama.cpp failed to evaluate the batch ({rc})")
            for job, _ in fed:
                self._finish(job, error=APIError(500, message, "server_error"))
            return
        for job, tokens in fed:
            job.slot.tokens.extend(tokens)
            if job.next_token is None:
                job.fed += len(tokens)
            job.next_token = None
        for job, index in sample_at:
            self._sample(job, index)

    def _sample(self, job: Job, index: int) -> None:
        L, model = self._L, self.model
        logprobs = None
        if job.top_logprobs is not None:
            logits = _logits(L, model, index)
        token = L.llama_sampler_sample(job.chain, model._ctx, index)
        if L.llama_vocab_is_eog(model._vocab, token):
            self._finish(job, "stop")
            return
        job.generated += 1
        data = model.token_bytes(token)
        if job.top_logprobs is not None:
            logprobs = _token_logprobs(model, logits, token, data, job.top_logprobs)
        piece = job.text.push(data)
        if piece or logprobs is not None:
            self._outbox.append((job, ("piece", piece, logprobs)))
        if job.text.stopped:
            self._finish(job, "stop")
        elif job.generated >= job.max_tokens:
            self._finish(job, "length")
        else:
            job.next_token = token


def _logits(L: Any, model: engine.Model, index: int) -> Any:
    import numpy as np

    pointer = L.llama_get_logits_ith(model._ctx, index)
    values = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(model.n_vocab,))
    values = values.astype(np.float64)
    values -= values.max()
    return values - math.log(float(np.exp(values).sum()))


def _token_entry(model: engine.Model, token: int, data: bytes | None, logprob: float) -> dict[str, Any]:
    data = model.token_bytes(token) if data is None else data
    return {"token": data.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(data)}


def _token_logprobs(model: engine.Model, logprobs: Any, token: int, data: bytes, top: int) -> dict[str, Any]:
    import numpy as np

    entry = _token_entry(model, token, data, logprobs[token])
    best = np.argpartition(-logprobs, top)[:top] if top else []
    best = sorted(best, key=lambda t: -logprobs[t])
    entry["top_logprobs"] = [_token_entry(model, int(t), None, logprobs[t]) for t in best]
    return entry


# --------------------------------------------------------------------------------------------
# Embeddings: a second context on the same weights, with mean pooling
# --------------------------------------------------------------------------------------------

class Embedder:
    """Sentence embeddings from a context with embeddings on and mean pooling, made on first use.
    One input at a time (a lock); it never touches the generation context."""

    def __init__(self, model: engine.Model, n_ctx: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self._ctx = None
        self._batch: engine._Batch | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._ctx is not None

    def _open(self) -> None:
        L, model = self.model._L, self.model
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx  # pooling needs one ubatch per input
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = model.n_threads
        params.embeddings = True
        params.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
        params.no_perf = True
        ctx = L.llama_init_from_model(model._model, params)
        if not ctx:
            raise APIError(500, "llama.cpp could not create the embeddings context", "server_error")
        self._ctx = ctx
        self._batch = engine._Batch(L, self.n_ctx)
        self.n_embd = int(L.llama_model_n_embd(model._model))

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """The L2-normalised mean of the last layer's hidden states over `tokens`."""
        L = self.model._L
        with self._lock:
            if self._ctx is None:
                self._open()
            L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
            batch = self._batch
            batch.clear()
            for i, token in enumerate(tokens):
                batch.add(token, i, 0, True)
            batch.raw.n_tokens = batch.n
            rc = L.llama_decode(self._ctx, batch.raw)
            if rc != 0:
                raise APIError(500, f"llama.cpp failed to embed the input (llama_decode returned {rc})", "server_error")
            pointer = L.llama_get_embeddings_seq(self._ctx, 0)
            if not pointer:
                raise APIError(500, "llama.cpp returned no embedding", "server_error")
            values = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[:self.n_embd]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]

    def close(self) -> None:
        L = self.model._L
        with self._lock:
            if self._batch is not None:
                self._batch.free()
                self._batch = None
            if self._ctx is not None:
                L.llama_free(self._ctx)
                self._ctx = None


# --------------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------------

def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low} and {high}, not {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name, "invalid_type")
    if value < low or (high is not None and value > high):
        raise _bad(f"'{name}' must be {'between ' + str(low) + ' and ' + str(high) if high is not None else 'at least ' + str(low)}, not {value}", name)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOPS:
        raise _bad(f"'stop' may hold at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in stop if s)


def _message_content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise _bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise _bad(f"messages[{i}].role must be one of system, developer, user, assistant, tool", f"messages[{i}].role")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content parts must be text parts ({{'type': 'text', 'text': ...}})",
                           f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant" or (content is None and message.get("tool_calls")):
        content = ""
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")
    checked: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise _bad(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls", "invalid_type")
        checked["tool_calls"] = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _bad(f"messages[{i}].tool_calls entries need a function with a name", f"messages[{i}].tool_calls")
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):  # chat templates expect the arguments as an object
                try:
                    arguments = json.loads(arguments or "{}")
                except ValueError:
                    raise _bad(f"messages[{i}].tool_calls arguments must be JSON", f"messages[{i}].tool_calls") from None
            checked["tool_calls"].append({"id": call.get("id"), "type": "function",
                                          "function": {"name": function["name"], "arguments": arguments}})
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            checked[key] = message[key]
    return checked


def _grammar(body: dict[str, Any]) -> str | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}", "response_format")
    from llama_cpp import llama_grammar

    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise _bad("response_format.json_schema must be an object with a 'schema' object", "response_format")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(spec.get("schema", {})))
    except Exception as exc:
        raise _bad(f"the JSON schema is not supported: {exc}", "response_format") from None


# --------------------------------------------------------------------------------------------
# The HTTP side
# --------------------------------------------------------------------------------------------

def _check_tools(tools: Any, choice: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The tools (OpenAI's [{"type": "function", "function": {...}}]) and the name of the function
    tool_choice forces ("" for "required": any of them), None when no call is forced."""
    if not isinstance(tools, list) or not tools:
        raise _bad("'tools' must be a non-empty list", "tools", "invalid_type")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not isinstance(function.get("parameters", {}), dict):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}",
                       f"tools[{i}]")
        names.append(function["name"])
    if choice is None or choice == "auto":
        return tools, None
    if choice == "required":
        return tools, ""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        return tools, name
    raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
               "tool_choice")


def _tool_call_grammar(tools: list[dict[str, Any]], forced: str, tagged: bool) -> str:
    """GBNF for one call of the forced function (or of any tool when forced is ""), written as
    {"name": ..., "arguments": {...}}, inside <tool_call> tags when the template uses them."""
    from llama_cpp import llama_grammar

    choices = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"]}
               for t in tools if not forced or t["function"]["name"] == forced]
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps({"anyOf": choices}))
    except Exception as exc:
        raise _bad(f"the parameters schema of the tools is not supported: {exc}", "tools") from None
    if not tagged:
        return grammar
    grammar = re.sub(r"^root ::=", "call ::=", grammar, flags=re.M)
    return 'root ::= "<tool_call>\\n" call "\\n</tool_call>"\n' + grammar


_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the content left, the tool calls) of a reply: <tool_call>{"name", "arguments"}</tool_call>
    blocks, or a reply that is one such JSON object. No calls: (text, [])."""
    blocks = _TAGGED_CALL.findall(text)
    candidates = blocks or ([text.strip()] if text.strip().startswith("{") else [])
    calls = []
    for block in candidates:
        try:
            value = json.loads(block)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters", {}))
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": value["name"], "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})
    if not calls:
        return text, []
    content = _TAGGED_CALL.sub("", text).strip() if blocks else ""
    return content or None, calls


# --------------------------------------------------------------------------------------------
# One loaded model: its scheduler, its embedder, and requests turned into its jobs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """What a loaded model costs: its file (the mapped weights), the KV cache of its context, and
    llama.cpp's compute buffers, which the logits of one micro-batch dominate (n_ubatch x n_vocab
    floats). tests/test_serve.py holds it to the buffer sizes llama.cpp reports (KV exact, compute
    within 2%); the embeddings context is counted once it is open (Served.memory)."""

    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def __str__(self) -> str:
        return (f"{format_bytes(self.total)} (file {format_bytes(self.weights)} + KV cache "
                f"{format_bytes(self.kv_cache)} + compute buffers {format_bytes(self.compute)})")


FALLBACK_VOCAB = 256 * 1024  # a GGUF without {arch}.vocab_size: assume a large vocabulary


def estimate_memory(path: Path, metadata: dict[str, Any], n_ctx: int, n_ubatch: int) -> MemoryEstimate:
    """The memory a context of `n_ctx` tokens (all sequences) over this GGUF takes, from its
    metadata: f16 K and V for every layer and cell, and 4 bytes x n_ubatch x (n_vocab + 2 n_embd)."""
    arch = metadata.get("general.architecture", "")
    get = lambda key, default: metadata.get(f"{arch}.{key}", default)  # noqa: E731
    n_embd = int(get("embedding_length", 0))
    n_head = int(get("attention.head_count", 1)) or 1
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_k = int(get("attention.key_length", n_embd // n_head))
    head_v = int(get("attention.value_length", n_embd // n_head))
    cells = -(-n_ctx // 256) * 256  # llama.cpp pads the cache to 256 cells
    kv_cache = int(get("block_count", 0)) * cells * n_head_kv * (head_k + head_v) * 2
    compute = 4 * n_ubatch * (int(get("vocab_size", FALLBACK_VOCAB)) + 2 * n_embd)
    return MemoryEstimate(path.stat().st_size, kv_cache, compute)


def format_bytes(n: int) -> str:
    """1.50 GiB, 92 MiB: how sizes read in messages."""
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


class Served:
    """A loaded model with its own Scheduler (continuous batching over its sequences) and Embedder,
    and what turns requests for it into jobs (tokenizing and chat templates need the model).
    `users` counts the requests using it; the pool unloads it only when that is zero."""

    def __init__(self, model_id: str, model: engine.Model, memory: MemoryEstimate, *, queue_size: int = 64,
                 owns_model: bool = True) -> None:
        self.id = model_id
        self.model = model
        self._memory = memory
        self.owns_model = owns_model
        self.scheduler = Scheduler(model, queue_size)
        self.embedder = Embedder(model, min(model.n_ctx, 2048))
        template = model.chat_template if model.has_chat_template else ""
        self.supports_tools = "tools" in template  # the template renders a tools list
        self.tagged_tool_calls = "<tool_call>" in template
        self._tools_template: Any = None
        self.users = 0
        self.last_used = time.monotonic()
        self.scheduler.start()

    @property
    def memory(self) -> MemoryEstimate:
        """The estimate for the generation context, plus the embeddings context once it is open."""
        if not self.embedder.is_open:
            return self._memory
        extra = estimate_memory(self.model.path, self.model.metadata, self.embedder.n_ctx, self.embedder.n_ctx)
        return MemoryEstimate(self._memory.weights, self._memory.kv_cache + extra.kv_cache,
                              self._memory.compute + extra.compute)

    def close(self) -> None:
        """Stop the scheduler (failing what still runs), free the embedder, and the model if it is ours."""
        self.scheduler.stop()
        self.embedder.close()
        if self.owns_model:
            self.model.close()

    # ---- requests into jobs ------------------------------------------------------------------

    def make_job(self, body: dict[str, Any], prompt: list[int], stops: tuple[str, ...]) -> Job:
        _integer(body, "n", 1, 1)  # one choice per request
        max_tokens = _integer(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1)
        n_ctx = self.model.n_ctx
        if not prompt:
            raise _bad("the prompt is empty", "prompt")
        if max_tokens is None:
            if len(prompt) >= n_ctx:
                raise APIError(400, str(ContextError(len(prompt), 1, n_ctx)), param="messages",
                               code="context_length_exceeded")
            max_tokens = n_ctx - len(prompt)
        elif len(prompt) + max_tokens > n_ctx:
            raise APIError(400, str(ContextError(len(prompt), max_tokens, n_ctx)), param="max_tokens",
                           code="context_length_exceeded")
        top_logprobs = None
        logprobs = body.get("logprobs")
        if "messages" in body:
            if logprobs is not None and not isinstance(logprobs, bool):
                raise _bad("'logprobs' must be a boolean", "logprobs", "invalid_type")
            top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
            if top is not None and not logprobs:
                raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            top_logprobs = (top or 0) if logprobs else None
        else:
            top_logprobs = _integer(body, "logprobs", 0, 5)
        seed = _integer(body, "seed", -(2 ** 63))
        return Job(
            prompt=prompt, max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-6,
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            seed=None if seed is None else seed % 0xFFFFFFFF,
            stop=stops, grammar=_grammar(body), top_logprobs=top_logprobs)

    def chat_job(self, body: dict[str, Any]) -> Job:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
        if body.get("functions"):
            raise _bad("'functions' is not supported; use 'tools'", "functions", "unsupported_parameter")
        tools, forced = None, None
        if body.get("tools") is not None and body.get("tool_choice") != "none":
            if not self.supports_tools:
                raise _bad(f"the chat template of {self.id} does not support tools", "tools",
                           "unsupported_parameter")
            tools, forced = _check_tools(body["tools"], body.get("tool_choice"))
        checked = [_message_content(m, i) for i, m in enumerate(messages)]
        stops = _stops(body)
        if not self.model.has_chat_template:
            stops = tuple(dict.fromkeys(stops + FALLBACK_STOPS))
        try:
            prompt = self.render_tools(checked, tools) if tools else self.model.render_chat(checked)
        except TemplateError as exc:
            raise _bad(str(exc), "messages") from None
        if forced is not None and body.get("response_format") not in (None, {"type": "text"}):
            raise _bad("a forced tool call cannot be combined with response_format", "response_format")
        job = self.make_job(body, self.model.tokenize(prompt), stops)
        if tools:
            job.tools = True
            if forced is not None:
                job.grammar = _tool_call_grammar(tools, forced, self.tagged_tool_calls)
        return job

    def render_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        """The prompt for messages plus tools, rendered by the model's template in the sandbox."""
        from jinja2 import TemplateError as JinjaError

        try:
            if self._tools_template is None:
                self._tools_template = engine._jinja_env().from_string(self.model.chat_template)
            return self._tools_template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                               bos_token=self.model.bos_token, eos_token=self.model.eos_token)
        except TemplateError:
            raise
        except JinjaError as exc:
            raise TemplateError(f"the chat template failed to render: {exc.__class__.__name__}: {exc}") from None

    def completion_job(self, body: dict[str, Any]) -> Job:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < self.model.n_vocab for t in prompt):
                raise _bad("token ids in 'prompt' must be in the model's vocabulary", "prompt")
            tokens = list(prompt)
        elif isinstance(prompt, str):
            tokens = self.model.tokenize(prompt)
        else:
            raise _bad("'prompt' must be a string (or one list of token ids); batches of prompts are not supported",
                       "prompt", "invalid_type")
        if body.get("echo") or body.get("suffix") or (body.get("best_of") not in (None, 1)):
            raise _bad("'echo', 'suffix' and 'best_of' are not supported", "echo", "unsupported_parameter")
        return self.make_job(body, tokens, _stops(body))

    def embedding_inputs(self, body: dict[str, Any]) -> list[list[int]]:
        value = body.get("input")
        if isinstance(value, str) or (isinstance(value, list) and value and all(
                isinstance(t, int) and not isinstance(t, bool) for t in value)):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _bad("'input' must be a string, a list of strings, or token ids", "input", "invalid_type")
        if len(value) > 256:
            raise _bad("'input' may hold at most 256 items", "input")
        inputs = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                tokens = self.model.tokenize(item)
            elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                if not all(0 <= t < self.model.n_vocab for t in item):
                    raise _bad(f"input[{i}] holds token ids outside the vocabulary", "input")
                tokens = list(item)
            else:
                raise _bad(f"input[{i}] must be a string or a list of token ids", "input", "invalid_type")
            if not tokens:
                raise _bad(f"input[{i}] is empty", "input")
            if len(tokens) > self.embedder.n_ctx:
                raise APIError(400, f"input[{i}] is {len(tokens)} tokens; at most {self.embedder.n_ctx} can be "
                               "embedded", param="input", code="context_length_exceeded")
            inputs.append(tokens)
        return inputs


# --------------------------------------------------------------------------------------------
# Models on demand, within a memory budget
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """A model the server can serve: the names a request may give for it (the first is its id),
    its GGUF, and whether it stays loaded while idle (the preloaded default model)."""

    names: list[str]
    path: Path
    keep_loaded: bool = False

    @property
    def id(self) -> str:
        return self.names[0]


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget() -> int:
    """Three quarters of the machine's RAM: room for the models, with some left for everything else."""
    return int(0.75 * ram_bytes())


# llama.cpp crashes when two threads load models at once (seen here): loads take turns
_LOAD_LOCK = threading.Lock()


@dataclass
class _Loading:
    memory: MemoryEstimate
    error: APIError | None = None


class ModelPool:
    """The models a server can serve. A model is loaded by its first request (later requests for it
    wait; requests for loaded models go on), stays loaded while requests use it, and is unloaded
    `keep_alive` seconds after its last one ends (0: at once; negative: never). A load that would
    take the estimated memory of the loaded models past `memory_budget` first unloads idle models,
    least recently used first; if that is not enough it is refused with 503 (400 when the model
    alone is larger than the budget). `parallel`, `ctx` (tokens per sequence; default the model's
    context, at most engine.DEFAULT_MAX_CTX) and `load_options` (n_threads, n_batch: engine.load's)
    apply to every model. `discover` returns the current specs (the store), asked again for a
    name the pool does not know and for the listing."""

    def __init__(self, specs: Sequence[ModelSpec], *, parallel: int = 4, ctx: int | None = None,
                 memory_budget: int | None = None, keep_alive: float = 300.0, queue_size: int = 64,
                 discover: Callable[[], Sequence[ModelSpec]] | None = None, **load_options: Any) -> None:
        self.parallel, self.ctx, self.keep_alive, self.queue_size = parallel, ctx, keep_alive, queue_size
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.load_options = load_options
        self._discover = discover
        self._specs: dict[str, ModelSpec] = {}
        self._names: dict[str, ModelSpec] = {}
        self._loaded: dict[str, Served] = {}
        self._loading: dict[str, _Loading] = {}
        self._estimates: dict[tuple[str, int], MemoryEstimate] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._add(specs)
        self._reaper = None
        if keep_alive >= 0:
            self._reaper = threading.Thread(target=self._reap, name="slim-keep-alive", daemon=True)
            self._reaper.start()

    @classmethod
    def of(cls, model: engine.Model, names: Sequence[str], *, queue_size: int = 64) -> "ModelPool":
        """A pool of one model the caller loaded (and closes): always loaded, never unloaded."""
        spec = ModelSpec(list(dict.fromkeys(names)), model.path, keep_loaded=True)
        pool = cls([spec], parallel=len(model._slots), keep_alive=-1, queue_size=queue_size)
        memory = estimate_memory(model.path, model.metadata, int(model._L.llama_n_ctx(model._ctx)), model.n_batch)
        pool._loaded[spec.id] = Served(spec.id, model, memory, queue_size=queue_size, owns_model=False)
        return pool

    # ---- names -----------------------------------------------------------------------------

    def _add(self, specs: Sequence[ModelSpec]) -> None:
        for spec in specs:
            if spec.id in self._specs:
                continue
            self._specs[spec.id] = spec
            for name in spec.names:
                self._names.setdefault(name, spec)

    def _refresh(self) -> None:
        if self._discover is None:
            return
        try:
            specs = self._discover()
        except ValueError:  # a damaged store index: serve what is known
            return
        with self._cond:
            self._add(specs)

    def spec(self, name: str) -> ModelSpec:
        """The model a request's "model" names; 404 in OpenAI's shape if none."""
        spec = self._names.get(name)
        if spec is None:
            self._refresh()
            spec = self._names.get(name)
        if spec is None:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                           f"{', '.join(self._specs) or 'no models'}", param="model", code="model_not_found")
        return spec

    # ---- using a model ----------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Served]:
        served = self.acquire(name)
        try:
            yield served
        finally:
            self.release(served)

    def acquire(self, name: str) -> Served:
        """The loaded model `name`, loading it first if need be; release() it when done."""
        spec = self.spec(name)
        with self._cond:
            while True:
                if self._closed:
                    raise APIError(503, "the server is shutting down", "server_error", code="unavailable")
                served = self._loaded.get(spec.id)
                if served is not None:
                    served.users += 1
                    return served
                loading = self._loading.get(spec.id)
                if loading is None:
                    break
                while self._loading.get(spec.id) is loading:
                    self._cond.wait()
                if loading.error is not None:
                    raise loading.error
            memory = self._estimate(spec)
            self._make_room(spec, memory)
            loading = self._loading[spec.id] = _Loading(memory)
        served = None
        try:
            served = self._load(spec, memory)
        except APIError as error:
            loading.error = error
            raise
        except BaseException:
            loading.error = APIError(500, f"loading the model '{spec.id}' was interrupted", "server_error",
                                     param="model", code="model_load_failed")
            raise
        finally:
            with self._cond:
                del self._loading[spec.id]
                if served is not None:
                    served.users += 1
                    self._loaded[spec.id] = served
                self._cond.notify_all()
        return served

    def release(self, served: Served) -> None:
        with self._cond:
            served.users -= 1
            served.last_used = time.monotonic()
            self._cond.notify_all()  # the keep-alive clock starts

    def _estimate(self, spec: ModelSpec) -> MemoryEstimate:
        try:
            key = (str(spec.path), spec.path.stat().st_mtime_ns)
            if key not in self._estimates:
                metadata = check_gguf(spec.path)
                n_ctx = self._context(metadata) * self.parallel
                n_batch = self.load_options.get("n_batch", 512)  # engine.load's default
                n_ubatch = min(self.load_options.get("n_ubatch") or n_batch, n_batch)
                self._estimates[key] = estimate_memory(spec.path, metadata, n_ctx, n_ubatch)
            return self._estimates[key]
        except (OSError, ValueError) as exc:
            raise self._load_error(spec, exc) from None

    def _context(self, metadata: dict[str, Any]) -> int:
        """Tokens per sequence: --ctx, else the model's trained context up to DEFAULT_MAX_CTX."""
        if self.ctx is not None:
            return self.ctx
        trained = metadata.get(f"{metadata.get('general.architecture', '')}.context_length")
        return min(int(trained), engine.DEFAULT_MAX_CTX) if trained else engine.DEFAULT_MAX_CTX

    def _used(self) -> int:
        return (sum(s.memory.total for s in self._loaded.values())
                + sum(loading.memory.total for loading in self._loading.values()))

    def _make_room(self, spec: ModelSpec, memory: MemoryEstimate) -> None:
        """Unload idle models, least recently used first, until `memory` fits in the budget."""
        if memory.total > self.memory_budget:
            raise APIError(400, f"the model '{spec.id}' needs about {memory}, more than the whole memory budget "
                           f"of {format_bytes(self.memory_budget)} (--memory-budget)", param="model",
                           code="model_too_large")
        while self._used() + memory.total > self.memory_budget:
            idle = [s for s in self._loaded.values() if s.users == 0 and s.owns_model]
            if not idle:
                busy = ", ".join(f"{s.id} ({format_bytes(s.memory.total)})" for s in self._loaded.values())
                raise APIError(503, f"the model '{spec.id}' needs about {format_bytes(memory.total)}, which does "
                               f"not fit in the memory budget of {format_bytes(self.memory_budget)} next to the "
                               f"models in use ({busy}); retry when they are idle", "server_error",
                               code="model_busy", headers={"Retry-After": "5"})
            self._unload(min(idle, key=lambda s: s.last_used))

    def _load(self, spec: ModelSpec, memory: MemoryEstimate) -> Served:
        try:
            n_ctx = self._context(check_gguf(spec.path))
            with _LOAD_LOCK:
                model = engine.load(spec.path, n_ctx=n_ctx * self.parallel, n_seq_max=self.parallel,
                                    **self.load_options)
        except (OSError, ValueError, engine.EngineError) as exc:
            raise self._load_error(spec, exc) from None
        return Served(spec.id, model, memory, queue_size=self.queue_size)

    @staticmethod
    def _load_error(spec: ModelSpec, exc: Exception) -> APIError:
        return APIError(500, f"the model '{spec.id}' could not be loaded: {exc}", "server_error", param="model",
                        code="model_load_failed")

    def _unload(self, served: Served) -> None:
        del self._loaded[served.id]
        served.close()

    def _reap(self) -> None:
        """Unload the models idle for keep_alive seconds; sleep until the next one is due."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                idle = [s for s in self._loaded.values()
                        if s.users == 0 and s.owns_model and not self._specs[s.id].keep_loaded]
                for served in idle:
                    if now - served.last_used >= self.keep_alive:
                        self._unload(served)
                due = [s.last_used + self.keep_alive - now for s in idle if s.id in self._loaded]
                self._cond.wait(timeout=max(0.01, min(due)) if due else None)

    def close(self) -> None:
        """Stop every scheduler and free every model the pool loaded."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._reaper is not None:
            self._reaper.join(timeout=30)
        with self._cond:
            while self._loading:  # a load under way finishes first, then goes with the rest
                self._cond.wait()
            for served in list(self._loaded.values()):
                self._unload(served)

    # ---- what is served -----------------------------------------------------------------------

    def state(self, spec: ModelSpec) -> str:
        return "loaded" if spec.id in self._loaded else "loading" if spec.id in self._loading else "unloaded"

    def listing(self) -> list[ModelSpec]:
        self._refresh()
        with self._cond:
            return list(self._specs.values())

    def health(self) -> dict[str, Any]:
        """Load per loaded model and in all, and the memory the loaded models are estimated to use."""
        with self._cond:
            models = {s.id: {"state": "loaded", **s.scheduler.load(), "memory_bytes": s.memory.total}
                      for s in self._loaded.values()}
            models.update({name: {"state": "loading", "memory_bytes": loading.memory.total}
                           for name, loading in self._loading.items()})
            used = self._used()
        return {"running": sum(m.get("running", 0) for m in models.values()),
                "waiting": sum(m.get("waiting", 0) for m in models.values()),
                "parallel": self.parallel, "memory_budget_bytes": self.memory_budget, "memory_used_bytes": used,
                "models": models}


class Server:
    """The HTTP routes over a ModelPool (or over one model the caller loaded: `Server(model, names)`,
    where `model_names` are the names requests may give in "model", the first its id)."""

    def __init__(self, models: ModelPool | engine.Model, model_names: Sequence[str] = (), *,
                 api_key: str | None = None, cors_origin: str | None = None, queue_size: int = 64,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.pool = models if isinstance(models, ModelPool) else ModelPool.of(models, model_names,
                                                                               queue_size=queue_size)
        self.api_key = api_key
        self.cors_origin = cors_origin
        self.max_body_bytes = max_body_bytes
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def bind(self, host: str = "127.0.0.1", port: int = 8080) -> tuple[str, int]:
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = _HTTPServer((host, port), handler)
        return self.httpd.server_address[:2]

    def serve(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Bind and serve until shutdown() or KeyboardInterrupt."""
        if self.httpd is None:
            self.bind(host, port)
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.pool.close()
            self.httpd.server_close()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve on a background thread; returns the bound address."""
        address = self.bind(host, port)
        self._thread = threading.Thread(target=self.serve, name="slim-http", daemon=True)
        self._thread.start()
        return address

    def shutdown(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def model_entry(self, spec: ModelSpec) -> dict[str, Any]:
        """OpenAI's model object, plus `state` (loaded, loading or unloaded) and the other names."""
        return {"id": spec.id, "object": "model", "created": int(spec.path.stat().st_mtime) if spec.path.exists()
                else 0, "owned_by": "slim", "state": self.pool.state(spec), "aliases": spec.names[1:]}


def _model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str):
        raise _bad("'model' is required and must be a string", "model", "invalid_type")
    return name


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connecting at once must not be refused


def _client_gone(sock: socket.socket) -> bool:
    """True when the peer closed its side (or reset) the connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(BaseHTTPRequestHandler):
    app: Server
    protocol_version = "HTTP/1.1"
    server_version = "slim"
    sys_version = ""
    disable_nagle_algorithm = True  # each streamed token goes out at once, not after the last one's ACK

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no per-request log lines
        pass

    # ---- plumbing ---------------------------------------------------------------------------

    def _headers(self, status: int, content_type: str, length: int | None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.close_connection = True
        if self.app.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.app.cors_origin)
            self.send_header("Vary", "Origin")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, status: int, document: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(document, ensure_ascii=False).encode()
        self._headers(status, "application/json", len(data), extra)
        self.wfile.write(data)

    def _error(self, error: APIError) -> None:
        self._json(error.status, error.body(), error.headers)

    def _authorized(self) -> bool:
        key = self.app.api_key
        if key is None:
            return True
        import hmac

        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        return bool(given) and hmac.compare_digest(given.encode(), key.encode())

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _read_body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length", code="length_required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _bad("bad Content-Length", None, "invalid_request")
        if length > self.app.max_body_bytes:
            self.close_connection = True  # the body is not read
            raise APIError(413, f"the request body is {length} bytes; the limit is {self.app.max_body_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the body is not valid JSON: {exc}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object", None, "invalid_type")
        return body

    # ---- verbs ------------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:
        if not self.app.cors_origin:
            self._error(APIError(405, "method not allowed", code="method_not_allowed"))
            return
        self._headers(204, "text/plain", 0, {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"})

    def do_GET(self) -> None:
        route = self._route()
        if route == "/health":
            self._json(200, {"status": "ok", **self.app.pool.health()})
            return
        if not self._authorized():
            self._error(APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 "authentication_error", code="invalid_api_key"))
            return
        if route == "/v1/models":
            self._json(200, {"object": "list", "data": [self.app.model_entry(s) for s in self.app.pool.listing()]})
        elif route.startswith("/v1/models/"):
            try:
                self._json(200, self.app.model_entry(self.app.pool.spec(route[len("/v1/models/"):])))
            except APIError as error:
                self._error(error)
        else:
            self._error(APIError(404, f"no route GET {route}", code="not_found"))

    def do_POST(self) -> None:
        route = self._route()
        try:
            if not self._authorized():
                self.close_connection = True
                raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                               "authentication_error", code="invalid_api_key")
            if route not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                self.close_connection = True
                raise APIError(404, f"no route POST {route}", code="not_found")
            body = self._read_body()
            served = self.app.pool.acquire(_model_name(body))  # loads the model if need be
        except APIError as error:
            self._error(error)
            return
        except Exception as exc:  # a bug must not cost the client its answer
            self._internal_error(exc)
            return
        try:
            self._answer(served, route, body)
        finally:
            self.app.pool.release(served)

    def _internal_error(self, exc: Exception) -> None:
        self.close_connection = True
        self._error(APIError(500, f"internal error: {exc.__class__.__name__}: {exc}", "server_error"))

    def _answer(self, served: Served, route: str, body: dict[str, Any]) -> None:
        try:
            if route == "/v1/embeddings":
                self._embeddings(served, body)
                return
            chat = route == "/v1/chat/completions"
            job = served.chat_job(body) if chat else served.completion_job(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise _bad("'stream' must be a boolean", "stream", "invalid_type")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
            served.scheduler.submit(job)
        except APIError as error:
            self._error(error)
            return
        except Exception as exc:  # a bug must not cost the client its answer
            self._internal_error(exc)
            return
        try:
            if stream:
                self._stream(job, served.id, chat, bool(options.get("include_usage")))
            else:
                self._whole(job, served.id, chat)
        except (BrokenPipeError, ConnectionError, TimeoutError, OSError):
            self.close_connection = True
        finally:
            job.cancelled.set()  # a no-op for a finished job; frees the sequence of an abandoned one

    # ---- answers ----------------------------------------------------------------------------

    def _embeddings(self, served: Served, body: dict[str, Any]) -> None:
        import base64
        import struct

        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        if body.get("dimensions") is not None:
            raise _bad("'dimensions' is not supported", "dimensions", "unsupported_parameter")
        inputs = served.embedding_inputs(body)
        data = []
        for i, tokens in enumerate(inputs):
            vector = served.embedder.embed(tokens)
            if encoding == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        n = sum(len(t) for t in inputs)
        self._json(200, {"object": "list", "data": data, "model": served.id,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _events(self, job: Job):
        """The job's events; stops (cancelling the job) if the client goes away meanwhile."""
        checked = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=_POLL_S)
            except queue.Empty:
                event = None
            if time.monotonic() - checked >= _POLL_S:
                checked = time.monotonic()
                if _client_gone(self.connection):
                    job.cancelled.set()
                    raise ConnectionError("the client went away")
            if event is None:
                continue
            yield event
            if event[0] != "piece":
                return

    def _usage(self, job: Job, completion_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(job.prompt) + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

    def _whole(self, job: Job, model_id: str, chat: bool) -> None:
        pieces, logprobs = [], []
        for event in self._events(job):
            if event[0] == "piece":
                pieces.append(event[1])
                if event[2] is not None:
                    logprobs.append(event[2])
            elif event[0] == "error":
                self._error(event[1])
                return
            else:
                _, reason, n = event
        text = "".join(pieces)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if job.tools:
                content, calls = parse_tool_calls(text)
                if calls:
                    message, reason = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            choice = {"index": 0, "message": message,
                      "logprobs": {"content": logprobs} if job.top_logprobs is not None else None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": _completion_logprobs(logprobs)
                      if job.top_logprobs is not None else None, "finish_reason": reason}
        self._json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": model_id, "system_fingerprint": "slim",
                         "choices": [choice], "usage": self._usage(job, n)})

    def _stream(self, job: Job, model_id: str, chat: bool, include_usage: bool) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        started = False

        def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model_id, "system_fingerprint": "slim", "choices": choices}
            if include_usage:
                chunk["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        def start() -> None:
            nonlocal started
            if not started:
                self._headers(200, "text/event-stream", None)
                if chat:
                    send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}])
                started = True

        held: list[str] = []  # a reply that may hold tool calls is sent when it is complete
        for event in self._events(job):
            if event[0] == "error":
                if not started:
                    self._error(event[1])
                    return
                self.wfile.write(b"data: " + json.dumps(event[1].body()).encode() + b"\n\n")
                break
            start()
            if event[0] == "piece" and job.tools:
                held.append(event[1])
            elif event[0] == "piece":
                _, text, lp = event
                if chat:
                    send([{"index": 0, "delta": {"content": text},
                           "logprobs": {"content": [lp]} if lp is not None else None, "finish_reason": None}])
                else:
                    send([{"index": 0, "text": text, "logprobs": _completion_logprobs([lp]) if lp is not None
                           else None, "finish_reason": None}])
            else:
                _, reason, n = event
                if job.tools:
                    content, calls = parse_tool_calls("".join(held))
                    if calls:
                        reason = "tool_calls"
                        send([{"index": 0, "delta": {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]},
                               "logprobs": None, "finish_reason": None}])
                    if content:
                        send([{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}])
                if chat:
                    send([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])
                else:
                    send([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}])
                if include_usage:
                    send([], self._usage(job, n))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions logprobs layout."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}
