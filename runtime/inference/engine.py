"""slim's inference engine: llama.cpp's C API driven directly, one token at a time.

    from slim.runtime.inference import engine

    model = engine.load("smollm2.gguf")                       # threads and context chosen for the machine
    reply = model.chat([{"role": "user", "content": "Hi!"}], temperature=0)
    print(reply.text, reply.finish_reason, reply.timings.generation_tokens_per_s)

    stream = model.complete("Once upon a time", stream=True, max_tokens=64)
    for piece in stream:                                       # text pieces as they are generated
        print(piece, end="", flush=True)
    print(stream.result.completion_tokens)

    chat = model.session(system="You are terse.")              # multi-turn, reuses the KV cache
    chat.send("Name a colour.")
    chat.send("Another one?")                                  # evaluates only the new tokens

The public API is `load`, `Model` (`chat`, `complete`, `session`, `tokenize`, `detokenize`,
`render_chat`), `ChatSession` (`send`, `messages`, `last_result`), `SamplingParams`, `Stream`,
`Result`, `Timings`, and the errors `ContextError` (the prompt does not fit), `TemplateError`,
`EngineError` (llama.cpp refused) and `slim.runtime.formats.gguf_file.GGUFError` (not a usable GGUF).

Design. One `Model` holds one llama.cpp model and one context whose KV cache has `n_seq_max`
sequences ("slots"). Each slot records exactly which tokens its KV cache holds; every request
finds the common prefix of its prompt with those tokens, removes the rest from the cache
(`llama_memory_seq_rm`) and evaluates only the new suffix. That is what makes a chat's next turn
cheap, and what keeps the cache consistent after an interrupted generation: whatever was not
recorded is removed before the next request. Sampling uses llama.cpp's C sampler chain; the Python
loop per token is a decode call, a sample call and a piece lookup.

A later server that decodes several slots in one batch reuses the same pieces: `_Slot`, `_Batch`,
the sampler chain builder and the text assembly (`_TextAssembler`).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence


from slim.runtime.formats.gguf_file import GGUFError, check_gguf

__all__ = [
    "ChatSession", "ContextError", "EngineError", "GGUFError", "Model", "Result", "SamplingParams",
    "Stream", "TemplateError", "Timings", "load", "sampler_chain", "physical_cores", "render_chat",
]

DEFAULT_MAX_CTX = 4096
REPEAT_LAST_N = 64  # tokens the repeat penalty looks back over (llama.cpp's default)

# Used when a GGUF carries no tokenizer.chat_template: ChatML, the most common layout. The engine
# says so (Model.template_warning) and adds the layout's markers as stop strings.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_STOPS = ("<|im_end|>", "<|im_start|>")


class EngineError(RuntimeError):
    """llama.cpp could not load the model, create the context or evaluate a batch."""


class ContextError(ValueError):
    """The prompt plus the tokens to generate do not fit in the context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int, detail: str = "") -> None:
        self.prompt_tokens, self.max_tokens, self.n_ctx = prompt_tokens, max_tokens, n_ctx
        message = (f"the prompt is {prompt_tokens} tokens and up to {max_tokens} tokens are to be generated: "
                   f"{prompt_tokens + max_tokens} do not fit in the context of {n_ctx} tokens")
        super().__init__(message + (f" {detail}" if detail else
                                    "; shorten the prompt, lower max_tokens or use a larger context"))


class TemplateError(ValueError):
    """The chat template failed to render the messages (or the messages are malformed)."""


# --------------------------------------------------------------------------------------------
# Sampling parameters and results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 means greedy (deterministic); the defaults are
    llama.cpp's. top_k 0, top_p 1, min_p 0 and repeat_penalty 1 each turn that step off.
    seed None draws a random seed. Generation stops at an end-of-generation token, at any of
    `stop` (which is not included in the text) or after max_tokens tokens."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1 turns it off)"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.seed is None or 0 <= self.seed < 0xFFFFFFFF, "seed must be in [0, 4294967295)"),
            (all(isinstance(s, str) for s in self.stop), "stop strings must be strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def with_options(self, **options: Any) -> "SamplingParams":
        """A copy with the given fields changed; unknown names raise TypeError, None values are ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in options.items() if v is not None})


@dataclass
class Timings:
    """Seconds and rates of one request. Generation speed counts the tokens after the first
    (each needs one decode) over the time from the first token to the last."""

    prompt_eval_s: float = 0.0
    time_to_first_token_s: float = 0.0
    generation_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0


@dataclass
class Result:
    """One finished request. finish_reason: "stop" (end-of-generation token or a stop string)
    or "length" (max_tokens reached). prompt_eval_tokens of the prompt_tokens were evaluated;
    the other cached_tokens were already in the KV cache. dropped_messages counts the old chat
    messages a "drop-oldest" session removed to make room."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prompt_eval_tokens: int
    cached_tokens: int
    timings: Timings = field(default_factory=Timings)
    dropped_messages: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Stream:
    """An iterator over the text pieces of one request. Once it is exhausted, `result` holds the
    Result. close() (or leaving a `with` block) stops generation early."""

    def __init__(self, generator: Iterator[str]) -> None:
        self._generator = generator
        self.result: Result | None = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._generator)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None

    def close(self) -> None:
        self._generator.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def collect(self) -> Result:
        """Run to the end and return the Result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


# --------------------------------------------------------------------------------------------
# Text assembly: UTF-8 across token boundaries, and stop strings that never leak
# --------------------------------------------------------------------------------------------

class _TextAssembler:
    """Turns token bytes into text that is safe to show: multi-byte characters split across
    tokens are joined (incremental UTF-8 decoding), and text that could be the start of a stop
    string is held back until it is known not to be one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """The text that can be shown now; sets `stopped` when a stop string appeared."""
        return self._accept(self._decoder.decode(data))

    def finish(self) -> str:
        """The text still held back, once generation has ended without a stop string."""
        text = self._accept(self._decoder.decode(b"", final=True))
        if self.stopped:
            return text
        text, self._held = text + self._held, ""
        return text

    def _accept(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        if not self._stops:
            self._held = ""
            return buffer
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:k]):
                    hold = k
                    break
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold]


# --------------------------------------------------------------------------------------------
# Sampling: llama.cpp's C sampler chain
# --------------------------------------------------------------------------------------------

def sampler_chain(model: "Model", *, temperature: float, top_k: int, top_p: float, min_p: float,
                  seed: int | None, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, penalty_last_n: int = REPEAT_LAST_N,
                  grammar: str | None = None) -> Any:
    """A C sampler chain (the caller frees it with llama_sampler_free): grammar first, so the
    output must match it; penalties (llama.cpp's repeat penalty, OpenAI's frequency and presence
    penalties) over the last `penalty_last_n` tokens; then greedy at temperature 0, or top-k,
    top-p, min-p, temperature and a seeded draw. ValueError if llama.cpp rejects the grammar."""
    L = model._L
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    add = lambda sampler: L.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    if grammar is not None:
        sampler = L.llama_sampler_init_grammar(model._vocab, grammar.encode(), b"root")
        if not sampler:
            L.llama_sampler_free(chain)
            raise ValueError("llama.cpp could not parse the grammar")
        add(sampler)
    if repeat_penalty != 1.0 or frequency_penalty or presence_penalty:
        add(L.llama_sampler_init_penalties(model.n_vocab, penalty_last_n, repeat_penalty, frequency_penalty,
                                           presence_penalty))
    if temperature <= 0:
        add(L.llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        add(L.llama_sampler_init_top_k(top_k))
    if top_p < 1.0:
        add(L.llama_sampler_init_top_p(top_p, 1))
    if min_p > 0.0:
        add(L.llama_sampler_init_min_p(min_p, 1))
    add(L.llama_sampler_init_temp(temperature))
    add(L.llama_sampler_init_dist(L.LLAMA_DEFAULT_SEED if seed is None else seed))
    return chain


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

def _jinja_env() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the messages: {message}")

    def strftime_now(fmt: str) -> str:
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise TemplateError("there are no messages to send")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TemplateError(f"message {i} must be a dict with a 'role' and a 'content' string")
        if not isinstance(message.get("content"), str):
            raise TemplateError(f"message {i} ({message['role']}) has no 'content' string")
        checked.append(dict(message))
    return checked


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, compiled: Any = None) -> str:
    """Render `messages` ({"role", "content"} dicts) with a Hugging Face style Jinja chat template,
    in jinja2's immutable sandbox (a template cannot touch Python objects or files)."""
    from jinja2 import TemplateError as JinjaError

    messages = _check_messages(messages)
    try:
        tmpl = compiled if compiled is not None else _jinja_env().from_string(template)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token)
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"the chat template failed to render: {exc.__class__.__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------

def physical_cores() -> int:
    """Physical cores this process may run on (llama.cpp is fastest with one thread per core)."""
    try:
        allowed: set[int] | None = os.sched_getaffinity(0)
    except AttributeError:
        allowed = None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        cpu, package = -1, ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, package = int(value), ""
                elif key == "physical id":
                    package = value
                elif key == "core id" and (allowed is None or cpu in allowed):
                    cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores), logical) if cores else logical)


# --------------------------------------------------------------------------------------------
# llama.cpp plumbing
# --------------------------------------------------------------------------------------------

_LOG_CALLBACK: Any = None  # kept alive for as long as llama.cpp may call it
_BACKEND_READY = False


def llama_bindings() -> Any:
    """The llama.cpp bindings, silenced and initialised once."""
    global _LOG_CALLBACK, _BACKEND_READY
    import llama_cpp.llama_cpp as L

    if not _BACKEND_READY:
        _LOG_CALLBACK = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_LOG_CALLBACK, None)
        L.llama_backend_init()
        _BACKEND_READY = True
    return L


class _Batch:
    """A llama_batch that holds up to `capacity` tokens, each for one sequence."""

    def __init__(self, L: Any, capacity: int) -> None:
        self._L = L
        self.capacity = capacity
        self.raw = L.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        raw, i = self.raw, self.n
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = logits
        self.n = i + 1

    def free(self) -> None:
        if self.raw is not None:
            self._L.llama_batch_free(self.raw)
            self.raw = None


@dataclass
class _Slot:
    """One KV-cache sequence and exactly the tokens it holds (positions 0..len-1)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    epoch: int = 0  # bumped by each request, so a superseded stream can tell


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def load(model_path: str | os.PathLike[str], **options: Any) -> "Model":
    """Load a GGUF for generation. Options: n_ctx (default min(model's context, 4096)),
    n_threads (default: physical cores), n_batch (512: prompt tokens per llama_decode), n_ubatch
    (default n_batch: tokens per compute pass), n_seq_max (1: KV-cache sequences, sharing n_ctx),
    extra_buffers (weight repacking; default on unless llama.cpp was built with its AMX kernels,
    whose multi-token batches crash: extra_buffers=True with n_ubatch=1 uses them safely),
    eval_callback (llama.cpp's cb_eval, to observe intermediate tensors: slim.runtime.pipeline.calibrate).
    Raises GGUFError for a file that is not a usable GGUF, EngineError if llama.cpp refuses it."""
    return Model(model_path, **options)


class Model:
    """A GGUF loaded in llama.cpp, with one context. Not thread-safe: one request at a time
    (a stream holds the context between its pieces).

    Attributes: path, n_ctx (tokens per sequence: prompt plus reply must fit), n_threads,
    n_ctx_train (the model's own context length), has_chat_template, template_warning (a line to
    show the user when the model has no template and a generic one is used), metadata (the
    GGUF's scalar and string metadata)."""

    def __init__(self, model_path: str | os.PathLike[str], *, n_ctx: int | None = None,
                 n_threads: int | None = None, n_batch: int = 512, n_ubatch: int | None = None,
                 n_seq_max: int = 1, extra_buffers: bool | None = None, eval_callback: Any = None) -> None:
        self.path = Path(model_path)
        self._model = self._ctx = None
        self._batch: _Batch | None = None
        self.metadata = check_gguf(self.path)
        if n_ctx is not None and n_ctx < 16:
            raise ValueError("n_ctx must be at least 16")
        if n_threads is not None and n_threads < 1:
            raise ValueError("n_threads must be at least 1")
        if n_batch < 1 or n_seq_max < 1 or (n_ubatch is not None and n_ubatch < 1):
            raise ValueError("n_batch, n_ubatch and n_seq_max must be at least 1")
        L = self._L = llama_bindings()

        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = L.LLAMA_LOAD_MODE_MMAP
        # The "extra" CPU buffers repack weights for faster kernels. In a llama.cpp built with AMX,
        # they route Q4_0/Q4_1 matmuls to ggml's AMX kernels, which crash on multi-token batches
        # (llama.cpp issue #20824): off there, on elsewhere.
        if extra_buffers is None:
            extra_buffers = b"AMX_INT8 = 1" not in L.llama_print_system_info()
        params.use_extra_bufts = extra_buffers
        self._model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            arch = self.metadata.get("general.architecture", "?")
            raise EngineError(f"llama.cpp could not load {self.path} (architecture {arch!r}): "
                              "the architecture is unsupported by this llama.cpp or the file is damaged")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self._model))
        self.n_threads = n_threads or physical_cores()
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx or min(self.n_ctx_train or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch or n_batch, n_batch)
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        if eval_callback is not None:  # a ggml_backend_sched_eval_callback the caller keeps alive
            cparams.cb_eval = eval_callback
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise EngineError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens "
                              "(not enough memory?)")
        self.n_ctx = int(L.llama_n_ctx_seq(self._ctx))  # per sequence
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self._memory = L.llama_get_memory(self._ctx)
        self._batch = _Batch(L, self.n_batch)
        self._slots = [_Slot(i) for i in range(n_seq_max)]
        self._next_slot = 0
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self._piece_buffer = ctypes.create_string_buffer(256)

        template = L.llama_model_chat_template(self._model, None)
        self.has_chat_template = bool(template)
        self.chat_template = template.decode("utf-8", errors="replace") if template else FALLBACK_TEMPLATE
        self.template_warning: str | None = None if template else (
            f"{self.path.name} has no chat template; using a generic ChatML layout, so replies may be "
            "poor (plain completion needs no template)")
        self._compiled_template: Any = None
        self.bos_token = self._special_text(L.llama_vocab_bos(self._vocab))
        self.eos_token = self._special_text(L.llama_vocab_eos(self._vocab))

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model (also done when the object is collected)."""
        L = getattr(self, "_L", None)
        if L is None:
            return
        if self._batch is not None:
            self._batch.free()
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- text <-> tokens --------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. add_special adds BOS (and EOS) where the model asks for them;
        parse_special turns control-token text such as "<|im_start|>" into the control token."""
        L = self._L
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (L.llama_token * capacity)()
        n = L.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buffer = (L.llama_token * capacity)()
            n = L.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if n < 0:
            raise EngineError("llama.cpp could not tokenize the text")
        tokens = list(buffer[:n])
        bos = L.llama_vocab_bos(self._vocab)
        if len(tokens) >= 2 and tokens[0] == tokens[1] == bos:  # the template wrote BOS itself
            tokens.pop(0)
        return tokens

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless special)."""
        L, buffer = self._L, self._piece_buffer
        n = L.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    # ---- prompts ----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        if self._compiled_template is None:
            from jinja2 import TemplateError as JinjaError

            try:
                self._compiled_template = _jinja_env().from_string(self.chat_template)
            except JinjaError as exc:
                raise TemplateError(f"the model's chat template does not compile: {exc}") from None
        return render_chat(self.chat_template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt, compiled=self._compiled_template)

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.tokenize(self.render_chat(messages))

    def _chat_params(self, params: SamplingParams) -> SamplingParams:
        if self.has_chat_template:
            return params
        return replace(params, stop=tuple(dict.fromkeys(params.stop + FALLBACK_STOPS)))

    # ---- requests ---------------------------------------------------------------------------

    def complete(self, prompt: str, *, stream: bool = False, params: SamplingParams | None = None,
                 **sampling: Any) -> Result | Stream:
        """Continue `prompt` as plain text (no chat template). Returns a Result, or with
        stream=True a Stream of text pieces. Sampling options as in SamplingParams."""
        params = (params or SamplingParams()).with_options(**sampling)
        tokens = self.tokenize(prompt)
        return self._request(self._take_slot(), tokens, params, stream)

    def chat(self, messages: Sequence[dict[str, Any]], *, stream: bool = False,
             params: SamplingParams | None = None, **sampling: Any) -> Result | Stream:
        """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": str}]),
        rendered with the model's chat template. Returns a Result, or a Stream with stream=True.
        Calls with a growing history reuse the KV cache of the previous call."""
        params = self._chat_params((params or SamplingParams()).with_options(**sampling))
        tokens = self.chat_tokens(messages)
        return self._request(self._take_slot(), tokens, params, stream)

    @property
    def prompt_bos(self) -> int | None:
        """The BOS token id when the model starts every prompt with it, else None."""
        L = self._L
        return int(L.llama_vocab_bos(self._vocab)) if L.llama_vocab_get_add_bos(self._vocab) else None

    def logits(self, tokens: Sequence[int], first: int = 0) -> Any:
        """Logits at positions first..len(tokens)-1 of `tokens` evaluated as one fresh sequence
        (the first slot's cache is cleared): a float32 array (len(tokens) - first, n_vocab).
        This is what perplexity and KL divergence are computed from (slim.runtime.inference.evaluate)."""
        import numpy as np

        if len(tokens) > self.n_ctx:
            raise ContextError(len(tokens), 0, self.n_ctx)
        L, batch, slot = self._L, self._batch, self._slots[0]
        assert batch is not None
        slot.epoch += 1  # a stream still open on this slot must not continue on this cache
        self._truncate(slot, 0)
        rows = []
        for start in range(0, len(tokens), batch.capacity):
            chunk = list(tokens[start:start + batch.capacity])
            batch.clear()
            for i, token in enumerate(chunk):
                batch.add(token, start + i, slot.seq_id, start + i >= first)
            batch.raw.n_tokens = batch.n
            rc = L.llama_decode(self._ctx, batch.raw)
            if rc != 0:
                self._truncate(slot, 0)
                raise EngineError(f"llama.cpp failed to evaluate the batch (llama_decode returned {rc})")
            slot.tokens.extend(chunk)
            wanted = sum(start + i >= first for i in range(len(chunk)))
            if wanted:
                out = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(wanted * self.n_vocab,))
                rows.append(out.reshape(wanted, self.n_vocab).copy())
        return np.concatenate(rows) if rows else np.zeros((0, self.n_vocab), dtype=np.float32)

    def session(self, system: str | None = None, *, context_policy: str = "stop",
                params: SamplingParams | None = None, **sampling: Any) -> "ChatSession":
        """A multi-turn chat. context_policy: "stop" raises ContextError when the history no longer
        fits, "drop-oldest" drops the oldest non-system messages until it does."""
        return ChatSession(self, system=system, context_policy=context_policy,
                           params=(params or SamplingParams()).with_options(**sampling))

    def clear_cache(self) -> None:
        """Forget every cached prompt: the next request evaluates its whole prompt."""
        self._L.llama_memory_clear(self._memory, True)
        for slot in self._slots:
            slot.tokens.clear()
            slot.epoch += 1

    def _take_slot(self) -> _Slot:
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        return slot

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.n_ctx:
            raise ContextError(prompt_tokens, max_tokens, self.n_ctx)

    def _request(self, slot: _Slot, tokens: list[int], params: SamplingParams, stream: bool,
                 dropped: int = 0) -> Result | Stream:
        if self._ctx is None:
            raise EngineError("the model is closed")
        if not tokens:
            raise ValueError("the prompt is empty")
        self.check_fits(len(tokens), params.max_tokens)
        result = Stream(self._generate(slot, tokens, params, dropped))
        return result if stream else result.collect()

    # ---- the core loop -----------------------------------------------------------------------

    def _sampler(self, params: SamplingParams) -> Any:
        return sampler_chain(self, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             min_p=params.min_p, seed=params.seed, repeat_penalty=params.repeat_penalty)

    def _truncate(self, slot: _Slot, keep: int) -> None:
        """Keep the first `keep` tokens of a slot's KV cache, drop the rest."""
        if not self._L.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._L.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)  # whole sequence: never fails
            keep = 0
        del slot.tokens[keep:]

    def _decode(self, slot: _Slot, tokens: Sequence[int]) -> None:
        """Append `tokens` to a slot's KV cache, n_batch at a time; logits for the last one."""
        L, batch = self._L, self._batch
        assert batch is not None
        for start in range(0, len(tokens), batch.capacity):
            chunk = tokens[start:start + batch.capacity]
            batch.clear()
            pos = len(slot.tokens)
            last = len(chunk) - 1
            for i, token in enumerate(chunk):
                batch.add(token, pos + i, slot.seq_id, i == last)
            batch.raw.n_tokens = batch.n
            rc = L.llama_decode(self._ctx, batch.raw)
            if rc != 0:
                self._truncate(slot, len(slot.tokens))  # drop whatever a failed decode left behind
                if rc == 1:
                    raise EngineError(f"the KV cache is full ({self.n_ctx} tokens per sequence)")
                raise EngineError(f"llama.cpp failed to evaluate the batch (llama_decode returned {rc})")
            slot.tokens.extend(chunk)

    def _generate(self, slot: _Slot, prompt: list[int], params: SamplingParams, dropped: int) -> Iterator[str]:
        """Yields text pieces; returns the Result. At every yield the slot's KV cache holds exactly
        slot.tokens, so a consumer may abandon the stream at any point."""
        L = self._L
        slot.epoch += 1
        epoch = slot.epoch
        t_start = time.perf_counter()
        keep = _common_prefix(slot.tokens, prompt)
        if keep == len(prompt):
            keep -= 1  # re-evaluate the last prompt token: its logits are needed
        chain = None
        try:
            self._truncate(slot, keep)
            chain = self._sampler(params)
            if params.repeat_penalty != 1.0:
                for token in prompt[-REPEAT_LAST_N:]:
                    L.llama_sampler_accept(chain, token)
            self._decode(slot, prompt[keep:])
            t_prompt = time.perf_counter()
            text = _TextAssembler(params.stop)
            pieces: list[str] = []
            n_generated = 0
            finish = "length"
            t_first = t_last = t_prompt
            while True:
                token = L.llama_sampler_sample(chain, self._ctx, -1)
                t_last = time.perf_counter()
                if n_generated == 0:
                    t_first = t_last
                if L.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                n_generated += 1
                piece = text.push(self.token_bytes(token))
                if piece:
                    pieces.append(piece)
                    yield piece
                    if self._ctx is None:
                        raise EngineError("the model was closed while this stream was paused")
                    if slot.epoch != epoch:
                        raise RuntimeError("this stream was superseded by a newer request on the same sequence")
                if text.stopped:
                    finish = "stop"
                    break
                if n_generated >= params.max_tokens:
                    break
                self._decode(slot, [token])
            tail = text.finish()
            if tail:
                pieces.append(tail)
                yield tail
        finally:
            if chain is not None:
                L.llama_sampler_free(chain)
            if self._ctx is not None and slot.epoch == epoch:
                self._truncate(slot, len(slot.tokens))  # drop anything not recorded (interrupted decode)
        t_end = time.perf_counter()
        n_eval = len(prompt) - keep
        prompt_s = t_prompt - t_start
        gen_s = t_last - t_first
        timings = Timings(
            prompt_eval_s=prompt_s, time_to_first_token_s=t_first - t_start, generation_s=gen_s,
            total_s=t_end - t_start, prompt_tokens_per_s=n_eval / prompt_s if prompt_s > 0 else 0.0,
            generation_tokens_per_s=(n_generated - 1) / gen_s if n_generated > 1 and gen_s > 0 else 0.0)
        return Result(text="".join(pieces), finish_reason=finish, prompt_tokens=len(prompt),
                      completion_tokens=n_generated, prompt_eval_tokens=n_eval, cached_tokens=keep,
                      timings=timings, dropped_messages=dropped)


# --------------------------------------------------------------------------------------------
# Multi-turn chat
# --------------------------------------------------------------------------------------------

@dataclass
class _Turn:
    user: dict[str, str]
    text: str = ""
    done: bool = False


class ChatSession:
    """A conversation with one model. `send` adds a user message and returns the reply (a Result,
    or a Stream with stream=True); the reply joins `messages` when it ends. The KV cache keeps the
    conversation, so each turn evaluates only the tokens it adds (see last_result.prompt_eval_tokens).

    Interrupted turns (KeyboardInterrupt, an abandoned or closed stream): the part of the reply
    already produced is kept as the assistant's message; if nothing was produced the user's
    message is removed too, as if the turn had not happened. Either way the session stays usable."""

    POLICIES = ("stop", "drop-oldest")

    def __init__(self, model: Model, system: str | None = None, *, context_policy: str = "stop",
                 params: SamplingParams | None = None) -> None:
        if context_policy not in self.POLICIES:
            raise ValueError(f"context_policy must be one of {', '.join(self.POLICIES)}, not {context_policy!r}")
        self.model = model
        self.context_policy = context_policy
        self.params = params or SamplingParams()
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.last_result: Result | None = None
        self._slot = model._take_slot()
        self._pending: _Turn | None = None

    def send(self, content: str, *, stream: bool = False, params: SamplingParams | None = None,
             **sampling: Any) -> Result | Stream:
        """Send one user message and get the assistant's reply."""
        self._settle()
        params = self.model._chat_params((params or self.params).with_options(**sampling))
        turn = _Turn({"role": "user", "content": content})
        self.messages.append(turn.user)
        try:
            tokens, dropped = self._fit(params)
        except BaseException:
            self._remove(turn.user)
            raise
        self._pending = turn
        inner = self.model._request(self._slot, tokens, params, stream=True, dropped=dropped)
        assert isinstance(inner, Stream)
        reply = Stream(self._follow(turn, inner))
        return reply if stream else reply.collect()

    def _follow(self, turn: _Turn, inner: Stream) -> Iterator[str]:
        try:
            for piece in inner:
                turn.text += piece
                yield piece
            turn.done = True
            self.last_result = inner.result
            return inner.result
        finally:
            inner.close()
            self._end(turn)

    def _settle(self) -> None:
        """Finish a turn whose stream was abandoned without being closed."""
        if self._pending is not None:
            self._end(self._pending)

    def _end(self, turn: _Turn) -> None:
        if turn is not self._pending:
            return
        self._pending = None
        if turn.done or turn.text:
            self.messages.append({"role": "assistant", "content": turn.text})
        else:
            self._remove(turn.user)

    def _remove(self, message: dict[str, str]) -> None:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i] is message:
                del self.messages[i]
                return

    def _fit(self, params: SamplingParams) -> tuple[list[int], int]:
        """The prompt tokens for the messages, after dropping old turns if the policy allows;
        the drops are only applied when the prompt then fits."""
        model, messages = self.model, list(self.messages)
        while True:
            tokens = model.chat_tokens(messages)
            if len(tokens) + params.max_tokens <= model.n_ctx:
                dropped = len(self.messages) - len(messages)
                self.messages[:] = messages
                return tokens, dropped
            if self.context_policy == "stop":
                raise ContextError(len(tokens), params.max_tokens, model.n_ctx,
                                   "; start a new chat, lower max_tokens or use a larger context")
            oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if oldest is None:
                raise ContextError(len(tokens), params.max_tokens, model.n_ctx,
                                   "even with every earlier message dropped; shorten the message, "
                                   "lower max_tokens or use a larger context")
            removed = messages.pop(oldest)
            if removed["role"] == "user" and oldest < len(messages) - 1 and messages[oldest]["role"] == "assistant":
                del messages[oldest]  # its reply goes with it
