"""The models a server serves: ModelSpec (names and file), ModelPool (loaded on demand within a
memory budget, unloaded when idle), MemoryEstimate, and Served, one loaded model with its
scheduler and embedder, which turns validated requests into jobs."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slim.runtime.formats.gguf_file import check_gguf
from slim.runtime.inference import (
    DEFAULT_MAX_CTX,
    Embedder,
    EngineError,
    Model,
    SamplingParams,
    TemplateError,
    kv_cache_bytes,
    load,
    prompt_opens_thinking,
    template_thinks,
    thinking_variables,
)
from slim.runtime.serve.requests import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    bad_request,
    check_limits,
    fit_max_tokens,
)
from slim.runtime.serve.scheduler import Job, Scheduler
from slim.runtime.serve.tools import tool_call_grammar

__all__ = [
    "MemoryEstimate",
    "ModelPool",
    "ModelSpec",
    "Served",
    "default_memory_budget",
    "estimate_memory",
    "format_bytes",
    "ram_bytes",
]


@dataclass(frozen=True)
class MemoryEstimate:
    """What a loaded model costs: its file (the mapped weights), the KV cache of its context, and
    llama.cpp's compute buffers, which the logits of one micro-batch dominate (n_ubatch x n_vocab
    floats). tests/test_serve.py holds it to the buffer sizes llama.cpp reports (KV exact, compute
    within 2%); the embeddings context is counted once it is open (Served.memory). The prompt
    cache across requests is counted at its bound (--cache-ram), which it may fill."""

    weights: int
    kv_cache: int
    compute: int
    prompt_cache: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.prompt_cache

    def __str__(self) -> str:
        cache = f" + prompt cache {format_bytes(self.prompt_cache)}" if self.prompt_cache else ""
        return (
            f"{format_bytes(self.total)} (file {format_bytes(self.weights)} + KV cache "
            f"{format_bytes(self.kv_cache)} + compute buffers {format_bytes(self.compute)}{cache})"
        )


FALLBACK_VOCAB = 256 * 1024  # a GGUF without {arch}.vocab_size: assume a large vocabulary


def estimate_memory(
    path: Path,
    metadata: dict[str, Any],
    n_ctx: int,
    n_ubatch: int,
    cache_types: tuple[str, str] = ("f16", "f16"),
    prompt_cache: int = 0,
) -> MemoryEstimate:
    """The memory a context of `n_ctx` tokens (all sequences) over this GGUF takes, from its
    metadata: K and V of their cache types for every layer and cell, and 4 bytes x n_ubatch x
    (n_vocab + 2 n_embd); and the prompt cache's bound."""
    arch = metadata.get("general.architecture", "")
    n_embd = int(metadata.get(f"{arch}.embedding_length", 0))
    vocab = int(metadata.get(f"{arch}.vocab_size", FALLBACK_VOCAB))
    compute = 4 * n_ubatch * (vocab + 2 * n_embd)
    kv_cache = kv_cache_bytes(metadata, n_ctx, *cache_types)
    return MemoryEstimate(path.stat().st_size, kv_cache, compute, prompt_cache)


def format_bytes(n: int) -> str:
    """1.50 GiB, 92 MiB: how sizes read in messages."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class Served:
    """A loaded model with its own Scheduler (continuous batching over its sequences) and Embedder,
    and what turns validated requests for it into jobs (tokenizing and chat templates need the
    model). `users` counts the requests using it; the pool unloads it only when that is zero."""

    def __init__(
        self, model_id: str, model: Model, memory: MemoryEstimate, *, queue_size: int = 64, owns_model: bool = True
    ) -> None:
        self.id = model_id
        self.model = model
        self._memory = memory
        self.owns_model = owns_model
        self.scheduler = Scheduler(model, queue_size)
        self.embedder = Embedder(model, min(model.n_ctx, 2048))
        template = model.chat_template if model.has_chat_template else ""
        self.supports_tools = "tools" in template  # the template renders a tools list
        self.tagged_tool_calls = "<tool_call>" in template
        self.thinks = template_thinks(template)  # its replies are split into thought and answer
        self.users = 0
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None  # a request's own keep-alive (Ollama's), else the pool's
        self.scheduler.start()

    @property
    def memory(self) -> MemoryEstimate:
        """The estimate for the generation context, plus the embeddings context once it is open."""
        if not self.embedder.is_open:
            return self._memory
        extra = estimate_memory(self.model.path, self.model.metadata, self.embedder.n_ctx, self.embedder.n_ctx)
        mine = self._memory
        return replace(mine, kv_cache=mine.kv_cache + extra.kv_cache, compute=mine.compute + extra.compute)

    def close(self) -> None:
        """Stop the scheduler (failing what still runs), free the embedder, and the model if it is ours."""
        self.scheduler.stop()
        self.embedder.close()
        if self.owns_model:
            self.model.close()

    # ---- requests into jobs ------------------------------------------------------------------

    def chat_prompt(self, request: ChatRequest) -> list[int]:
        """The tokens of the request's messages (and tools) rendered by the model's chat template."""
        check_limits(request.params, request.messages)
        if request.tools is not None and not self.supports_tools:
            raise bad_request(
                f"the chat template of {self.id} does not support tools", "tools", "unsupported_parameter"
            )
        try:
            variables = thinking_variables(request.thinking, request.template_variables)
            return self.model.chat_tokens(request.messages, tools=request.tools, variables=variables)
        except TemplateError as exc:
            raise bad_request(str(exc), "messages") from None

    def chat_job(self, request: ChatRequest) -> Job:
        prompt = self.chat_prompt(request)
        params = self.model.chat_params(request.params)
        if request.forced_tool is not None:
            assert request.tools is not None
            params = params.with_options(
                grammar=tool_call_grammar(request.tools, request.forced_tool, self.tagged_tool_calls)
            )
        job = self._job(prompt, request.max_tokens, params, request.top_logprobs)
        job.tools = request.tools is not None
        if self.thinks:
            job.thinking = prompt_opens_thinking(self.model.detokenize(prompt[-8:], special=True))
        return job

    def completion_job(self, request: CompletionRequest) -> Job:
        if isinstance(request.prompt, str):
            tokens = self.model.tokenize(request.prompt)
        elif all(0 <= t < self.model.n_vocab for t in request.prompt):
            tokens = list(request.prompt)
        else:
            raise bad_request("token ids in 'prompt' must be in the model's vocabulary", "prompt")
        return self._job(tokens, request.max_tokens, request.params, request.top_logprobs)

    def _job(self, prompt: list[int], max_tokens: int | None, params: SamplingParams, top_logprobs: int | None) -> Job:
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        check_limits(params)
        max_tokens = fit_max_tokens(max_tokens, len(prompt), self.model.n_ctx, "messages")
        # OpenAI's penalties (penalize_prompt off) count every generated token; llama.cpp's look back
        # over penalty_last_n tokens, the prompt's included
        window = params.penalty_last_n if params.penalize_prompt else max_tokens
        return Job(prompt, params.with_options(max_tokens=max_tokens, penalty_last_n=window), top_logprobs)

    def embedding_inputs(self, request: EmbeddingRequest) -> list[list[int]]:
        inputs = []
        for i, item in enumerate(request.inputs):
            if isinstance(item, str):
                tokens = self.model.tokenize(item)
            elif all(0 <= t < self.model.n_vocab for t in item):
                tokens = list(item)
            else:
                raise bad_request(f"input[{i}] holds token ids outside the vocabulary", "input")
            if not tokens:
                raise bad_request(f"input[{i}] is empty", "input")
            if len(tokens) > self.embedder.n_ctx:
                raise APIError(
                    400,
                    f"input[{i}] is {len(tokens)} tokens; at most {self.embedder.n_ctx} can be embedded",
                    param="input",
                    code="context_length_exceeded",
                )
            inputs.append(tokens)
        return inputs

    def embed(self, tokens: list[int]) -> list[float]:
        try:
            return self.embedder.embed(tokens)
        except EngineError as exc:
            raise APIError(500, str(exc), "server_error") from None


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
    `keep_alive` seconds after its last one ends (0: at once; negative: never; a request may set
    its own for the model, as Ollama's keep_alive does, through release()). A load that would
    take the estimated memory of the loaded models past `memory_budget` first unloads idle models,
    least recently used first; if that is not enough it is refused with 503 (400 when the model
    alone is larger than the budget). `parallel`, `ctx` (tokens per sequence; default the model's
    context, at most DEFAULT_MAX_CTX) and `load_options` (inference.load's: n_threads, n_batch, the
    cache types, prompt_cache_bytes)
    apply to every model. `discover` returns the current specs (the store), asked again for a
    name the pool does not know and for the listing."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        *,
        parallel: int = 4,
        ctx: int | None = None,
        memory_budget: int | None = None,
        keep_alive: float = 300.0,
        queue_size: int = 64,
        discover: Callable[[], Sequence[ModelSpec]] | None = None,
        **load_options: Any,
    ) -> None:
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
        self._reaper = threading.Thread(target=self._reap, name="slim-keep-alive", daemon=True)
        self._reaper.start()

    @classmethod
    def of(cls, model: Model, names: Sequence[str], *, queue_size: int = 64) -> ModelPool:
        """A pool of one model the caller loaded (and closes): always loaded, never unloaded."""
        spec = ModelSpec(list(dict.fromkeys(names)), model.path, keep_loaded=True)
        pool = cls([spec], parallel=len(model.slots), keep_alive=-1, queue_size=queue_size)
        kept = model.prompt_cache.capacity if model.prompt_cache is not None else 0
        types = (model.cache_type_k, model.cache_type_v)
        memory = estimate_memory(model.path, model.metadata, model.n_ctx_total, model.n_batch, types, kept)
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
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves {', '.join(self._specs) or 'no models'}",
                param="model",
                code="model_not_found",
            )
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
            loading.error = APIError(
                500,
                f"loading the model '{spec.id}' was interrupted",
                "server_error",
                param="model",
                code="model_load_failed",
            )
            raise
        finally:
            with self._cond:
                del self._loading[spec.id]
                if served is not None:
                    served.users += 1
                    self._loaded[spec.id] = served
                self._cond.notify_all()
        return served

    def release(self, served: Served, keep_alive: float | None = None) -> None:
        """The request is done with `served`; keep_alive (seconds, negative: forever) replaces the
        pool's for this model from now on."""
        with self._cond:
            served.users -= 1
            served.last_used = time.monotonic()
            if keep_alive is not None:
                served.keep_alive = keep_alive
            self._cond.notify_all()  # the keep-alive clock starts

    def _keep_alive(self, served: Served) -> float | None:
        """Seconds an idle model stays loaded, None for ever."""
        if not served.owns_model:
            return None
        if served.keep_alive is not None:  # a request asked for it, which overrides keep_loaded
            return served.keep_alive if served.keep_alive >= 0 else None
        if self._specs[served.id].keep_loaded or self.keep_alive < 0:
            return None
        return self.keep_alive

    def expires_in(self, served: Served) -> float | None:
        """Seconds until the model is unloaded if no request comes (None: never; 0 while in use)."""
        with self._cond:
            keep = self._keep_alive(served)
            if keep is None:
                return None
            return 0.0 if served.users else max(0.0, served.last_used + keep - time.monotonic())

    def loaded(self) -> list[Served]:
        with self._cond:
            return list(self._loaded.values())

    def _estimate(self, spec: ModelSpec) -> MemoryEstimate:
        try:
            key = (str(spec.path), spec.path.stat().st_mtime_ns)
            if key not in self._estimates:
                metadata = check_gguf(spec.path)
                n_ctx = self._context(metadata) * self.parallel
                n_batch = self.load_options.get("n_batch", 512)  # inference.load's default
                n_ubatch = min(self.load_options.get("n_ubatch") or n_batch, n_batch)
                options = self.load_options
                cache_types = (options.get("cache_type_k", "f16"), options.get("cache_type_v", "f16"))
                prompt_cache = options.get("prompt_cache_bytes", 0)
                self._estimates[key] = estimate_memory(spec.path, metadata, n_ctx, n_ubatch, cache_types, prompt_cache)
            return self._estimates[key]
        except (OSError, ValueError) as exc:
            raise self._load_error(spec, exc) from None

    def _context(self, metadata: dict[str, Any]) -> int:
        """Tokens per sequence: --ctx, else the model's trained context up to DEFAULT_MAX_CTX."""
        if self.ctx is not None:
            return self.ctx
        trained = metadata.get(f"{metadata.get('general.architecture', '')}.context_length")
        return min(int(trained), DEFAULT_MAX_CTX) if trained else DEFAULT_MAX_CTX

    def _used(self) -> int:
        return sum(s.memory.total for s in self._loaded.values()) + sum(
            loading.memory.total for loading in self._loading.values()
        )

    def _make_room(self, spec: ModelSpec, memory: MemoryEstimate) -> None:
        """Unload idle models, least recently used first, until `memory` fits in the budget."""
        if memory.total > self.memory_budget:
            raise APIError(
                400,
                f"the model '{spec.id}' needs about {memory}, more than the whole memory budget "
                f"of {format_bytes(self.memory_budget)} (--memory-budget)",
                param="model",
                code="model_too_large",
            )
        while self._used() + memory.total > self.memory_budget:
            idle = [s for s in self._loaded.values() if s.users == 0 and s.owns_model]
            if not idle:
                busy = ", ".join(f"{s.id} ({format_bytes(s.memory.total)})" for s in self._loaded.values())
                raise APIError(
                    503,
                    f"the model '{spec.id}' needs about {format_bytes(memory.total)}, which does "
                    f"not fit in the memory budget of {format_bytes(self.memory_budget)} next to the "
                    f"models in use ({busy}); retry when they are idle",
                    "server_error",
                    code="model_busy",
                    headers={"Retry-After": "5"},
                )
            self._unload(min(idle, key=lambda s: s.last_used))

    def _load(self, spec: ModelSpec, memory: MemoryEstimate) -> Served:
        try:
            n_ctx = self._context(check_gguf(spec.path))
            with _LOAD_LOCK:
                model = load(spec.path, n_ctx=n_ctx * self.parallel, n_seq_max=self.parallel, **self.load_options)
        except (OSError, ValueError, EngineError) as exc:
            raise self._load_error(spec, exc) from None
        return Served(spec.id, model, memory, queue_size=self.queue_size)

    @staticmethod
    def _load_error(spec: ModelSpec, exc: Exception) -> APIError:
        return APIError(
            500,
            f"the model '{spec.id}' could not be loaded: {exc}",
            "server_error",
            param="model",
            code="model_load_failed",
        )

    def _unload(self, served: Served) -> None:
        del self._loaded[served.id]
        served.close()

    def _reap(self) -> None:
        """Unload the models idle for their keep-alive; sleep until the next one is due."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = []
                for served in list(self._loaded.values()):
                    keep = self._keep_alive(served)
                    if served.users or keep is None:
                        continue
                    if now - served.last_used >= keep:
                        self._unload(served)
                    else:
                        due.append(served.last_used + keep - now)
                self._cond.wait(timeout=max(0.01, min(due)) if due else None)

    def close(self) -> None:
        """Stop every scheduler and free every model the pool loaded."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
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
            models = {
                s.id: {
                    "state": "loaded",
                    **s.scheduler.load(),
                    "context_length": s.model.n_ctx,
                    "memory_bytes": s.memory.total,
                }
                for s in self._loaded.values()
            }
            models.update(
                {
                    name: {"state": "loading", "memory_bytes": loading.memory.total}
                    for name, loading in self._loading.items()
                }
            )
            used = self._used()
        return {
            "running": sum(m.get("running", 0) for m in models.values()),
            "waiting": sum(m.get("waiting", 0) for m in models.values()),
            "parallel": self.parallel,
            "memory_budget_bytes": self.memory_budget,
            "memory_used_bytes": used,
            "models": models,
        }
