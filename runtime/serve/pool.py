"""The models a server serves: ModelSpec (names and file), ModelPool (loaded on demand within a
memory budget, unloaded when idle), MemoryEstimate, and Served, one loaded model with its
scheduler and embedder, which turns validated requests into jobs."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slim.runtime.formats.gguf_file import check_gguf
from slim.runtime.inference import DEFAULT_MAX_CTX, Embedder, EngineError, Model, SamplingParams, TemplateError, load
from slim.runtime.serve.requests import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    bad_request,
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
    within 2%); the embeddings context is counted once it is open (Served.memory)."""

    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def __str__(self) -> str:
        return (
            f"{format_bytes(self.total)} (file {format_bytes(self.weights)} + KV cache "
            f"{format_bytes(self.kv_cache)} + compute buffers {format_bytes(self.compute)})"
        )


FALLBACK_VOCAB = 256 * 1024  # a GGUF without {arch}.vocab_size: assume a large vocabulary


def estimate_memory(path: Path, metadata: dict[str, Any], n_ctx: int, n_ubatch: int) -> MemoryEstimate:
    """The memory a context of `n_ctx` tokens (all sequences) over this GGUF takes, from its
    metadata: f16 K and V for every layer and cell, and 4 bytes x n_ubatch x (n_vocab + 2 n_embd)."""
    arch = metadata.get("general.architecture", "")

    def get(key: str, default: int) -> int:
        return int(metadata.get(f"{arch}.{key}", default))

    n_embd = get("embedding_length", 0)
    n_head = get("attention.head_count", 1) or 1
    n_head_kv = get("attention.head_count_kv", n_head)
    head_k = get("attention.key_length", n_embd // n_head)
    head_v = get("attention.value_length", n_embd // n_head)
    cells = -(-n_ctx // 256) * 256  # llama.cpp pads the cache to 256 cells
    kv_cache = get("block_count", 0) * cells * n_head_kv * (head_k + head_v) * 2
    compute = 4 * n_ubatch * (get("vocab_size", FALLBACK_VOCAB) + 2 * n_embd)
    return MemoryEstimate(path.stat().st_size, kv_cache, compute)


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
        self.users = 0
        self.last_used = time.monotonic()
        self.scheduler.start()

    @property
    def memory(self) -> MemoryEstimate:
        """The estimate for the generation context, plus the embeddings context once it is open."""
        if not self.embedder.is_open:
            return self._memory
        extra = estimate_memory(self.model.path, self.model.metadata, self.embedder.n_ctx, self.embedder.n_ctx)
        return MemoryEstimate(
            self._memory.weights, self._memory.kv_cache + extra.kv_cache, self._memory.compute + extra.compute
        )

    def close(self) -> None:
        """Stop the scheduler (failing what still runs), free the embedder, and the model if it is ours."""
        self.scheduler.stop()
        self.embedder.close()
        if self.owns_model:
            self.model.close()

    # ---- requests into jobs ------------------------------------------------------------------

    def chat_job(self, request: ChatRequest) -> Job:
        model = self.model
        if request.tools is not None and not self.supports_tools:
            raise bad_request(
                f"the chat template of {self.id} does not support tools", "tools", "unsupported_parameter"
            )
        try:
            prompt = model.render_chat(request.messages, tools=request.tools)
        except TemplateError as exc:
            raise bad_request(str(exc), "messages") from None
        params = model.chat_params(request.params)
        if request.forced_tool is not None:
            assert request.tools is not None
            params = params.with_options(
                grammar=tool_call_grammar(request.tools, request.forced_tool, self.tagged_tool_calls)
            )
        job = self._job(model.tokenize(prompt), request.max_tokens, params, request.top_logprobs)
        job.tools = request.tools is not None
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
        max_tokens = fit_max_tokens(max_tokens, len(prompt), self.model.n_ctx, "messages")
        # OpenAI's penalties count every generated token
        return Job(prompt, params.with_options(max_tokens=max_tokens, penalty_last_n=max_tokens), top_logprobs)

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
    `keep_alive` seconds after its last one ends (0: at once; negative: never). A load that would
    take the estimated memory of the loaded models past `memory_budget` first unloads idle models,
    least recently used first; if that is not enough it is refused with 503 (400 when the model
    alone is larger than the budget). `parallel`, `ctx` (tokens per sequence; default the model's
    context, at most DEFAULT_MAX_CTX) and `load_options` (n_threads, n_batch: inference.load's)
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
        self._reaper = None
        if keep_alive >= 0:
            self._reaper = threading.Thread(target=self._reap, name="slim-keep-alive", daemon=True)
            self._reaper.start()

    @classmethod
    def of(cls, model: Model, names: Sequence[str], *, queue_size: int = 64) -> ModelPool:
        """A pool of one model the caller loaded (and closes): always loaded, never unloaded."""
        spec = ModelSpec(list(dict.fromkeys(names)), model.path, keep_loaded=True)
        pool = cls([spec], parallel=len(model.slots), keep_alive=-1, queue_size=queue_size)
        memory = estimate_memory(model.path, model.metadata, model.n_ctx_total, model.n_batch)
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
                n_batch = self.load_options.get("n_batch", 512)  # inference.load's default
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
        """Unload the models idle for keep_alive seconds; sleep until the next one is due."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                idle = [
                    s
                    for s in self._loaded.values()
                    if s.users == 0 and s.owns_model and not self._specs[s.id].keep_loaded
                ]
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
            models = {
                s.id: {"state": "loaded", **s.scheduler.load(), "memory_bytes": s.memory.total}
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
