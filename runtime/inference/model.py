"""A GGUF loaded in llama.cpp for generation: `load`, `Model`, and what a request gives back
(`Result` with its `Timings`, or a `Stream` of text pieces)."""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slim.runtime.formats.gguf_file import check_gguf
from slim.runtime.inference.batching import Batch, Batcher, Done, Failed, Piece, Slot
from slim.runtime.inference.chat_template import (
    FALLBACK_STOPS,
    FALLBACK_TEMPLATE,
    compile_template,
    mask_markers,
    render_chat,
)
from slim.runtime.inference.errors import ContextError, EngineError
from slim.runtime.inference.kv_cache import KV_CACHE_TYPES, check_cache_types
from slim.runtime.inference.llama import llama_bindings, physical_cores
from slim.runtime.inference.prompt_cache import CachedState, PromptCache
from slim.runtime.inference.sampling import SamplingParams

if TYPE_CHECKING:
    from slim.runtime.inference.session import ChatSession

__all__ = ["DEFAULT_MAX_CTX", "Model", "Result", "Stream", "Timings", "load"]

DEFAULT_MAX_CTX = 4096


@dataclass
class Timings:
    """Seconds and rates of one request. Generation speed counts the tokens after the first
    over the time from the first token to the last. With prompt lookup, drafted_tokens were
    proposed and accepted_tokens of them kept (each kept one is a token without a decode of its own)."""

    prompt_eval_s: float = 0.0
    time_to_first_token_s: float = 0.0
    generation_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


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

    def __init__(self, generator: Generator[str, None, Result]) -> None:
        self._generator = generator
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._generator)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None

    def close(self) -> None:
        self._generator.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def collect(self) -> Result:
        """Run to the end and return the Result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


def load(model_path: str | os.PathLike[str], **options: Any) -> Model:
    """Load a GGUF for generation. Options: n_ctx (default min(model's context, 4096)),
    n_threads (default: physical cores), n_batch (512: prompt tokens per llama_decode), n_ubatch
    (default n_batch: tokens per compute pass), n_seq_max (1: KV-cache sequences, sharing n_ctx),
    extra_buffers (weight repacking; default on unless llama.cpp was built with its AMX kernels,
    whose multi-token batches crash: extra_buffers=True with n_ubatch=1 uses them safely),
    cache_type_k / cache_type_v (the KV cache's types, KV_CACHE_TYPES: "f16" by default, "q8_0"
    for about half the memory), flash_attn (True, False, or None: llama.cpp decides),
    prompt_cache_bytes (0: none; else the RAM that a PromptCache of finished sequences' states may
    hold, so that a prompt continuing one of them starts from it on any slot),
    lookup (0: off; else prompt lookup decoding, up to this many tokens drafted per step from
    where the last tokens occurred earlier in the context, and verified in the same batch),
    eval_callback (llama.cpp's cb_eval, to observe intermediate tensors: slim.runtime.pipeline.calibrate).
    Raises GGUFError for a file that is not a usable GGUF, EngineError if llama.cpp refuses it."""
    return Model(model_path, **options)


class Model:
    """A GGUF loaded in llama.cpp, with one context. Not thread-safe: one request at a time
    (a stream holds the context between its pieces).

    Attributes: path, n_ctx (tokens per sequence: prompt plus reply must fit), n_threads, n_batch,
    n_vocab, n_ctx_train (the model's own context length), has_chat_template, chat_template,
    template_warning (a line to show the user when the model has no template and a generic one is
    used), metadata (the GGUF's scalar and string metadata), slots (the KV-cache sequences).

    Below the requests, for the batching layer and tools that drive llama.cpp themselves: decode
    (one llama_batch), truncate (a slot's cache), logits_at, is_end_of_generation, token_bytes.
    The other modules of slim.runtime.inference share its llama.cpp handles (_L, _model, _ctx,
    _vocab); nothing outside the package does."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_seq_max: int = 1,
        extra_buffers: bool | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        flash_attn: bool | None = None,
        prompt_cache_bytes: int = 0,
        lookup: int = 0,
        eval_callback: Any = None,
    ) -> None:
        self.path = Path(model_path)
        self._model = self._ctx = None
        self._batch: Batch | None = None
        self.metadata = check_gguf(self.path)
        if n_ctx is not None and n_ctx < 16:
            raise ValueError("n_ctx must be at least 16")
        if n_threads is not None and n_threads < 1:
            raise ValueError("n_threads must be at least 1")
        if n_batch < 1 or n_seq_max < 1 or (n_ubatch is not None and n_ubatch < 1):
            raise ValueError("n_batch, n_ubatch and n_seq_max must be at least 1")
        if lookup < 0:
            raise ValueError("lookup must be at least 0 (0 turns prompt lookup off)")
        self.lookup = lookup
        check_cache_types(self.metadata, cache_type_k, cache_type_v, flash_attn)
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
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
            raise EngineError(
                f"llama.cpp could not load {self.path} (architecture {arch!r}): "
                "the architecture is unsupported by this llama.cpp or the file is damaged"
            )
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
        cparams.type_k, cparams.type_v = KV_CACHE_TYPES[cache_type_k], KV_CACHE_TYPES[cache_type_v]
        cparams.flash_attn_type = {
            None: L.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        if eval_callback is not None:  # a ggml_backend_sched_eval_callback the caller keeps alive
            cparams.cb_eval = eval_callback
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise EngineError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens (not enough memory?)")
        self.n_ctx = int(L.llama_n_ctx_seq(self._ctx))  # per sequence
        self.n_ctx_total = int(L.llama_n_ctx(self._ctx))  # all sequences together
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self._memory = L.llama_get_memory(self._ctx)
        self._batch = Batch(self.n_batch)
        self.slots = [Slot(i) for i in range(n_seq_max)]
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self._next_slot = 0
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self._piece_buffer = ctypes.create_string_buffer(256)

        template = L.llama_model_chat_template(self._model, None)
        self.has_chat_template = bool(template)
        self.chat_template = template.decode("utf-8", errors="replace") if template else FALLBACK_TEMPLATE
        self.template_warning: str | None = (
            None
            if template
            else (
                f"{self.path.name} has no chat template; using a generic ChatML layout, so replies may be "
                "poor (plain completion needs no template)"
            )
        )
        self._compiled_template: Any = None
        self._control_texts: tuple[str, ...] | None = None
        self.bos_token = self._special_text(L.llama_vocab_bos(self._vocab))
        self.eos_token = self._special_text(L.llama_vocab_eos(self._vocab))

    # ---- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._ctx is None

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

    def __enter__(self) -> Model:
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

    def is_end_of_generation(self, token: int) -> bool:
        """Whether `token` ends a reply (end of text, end of turn)."""
        return self._L.llama_vocab_is_eog(self._vocab, token)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    # ---- prompts ----------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text the model's chat template makes of `messages` (and `tools`, OpenAI's
        function list, for templates that render it; `variables`, the template's own switches
        such as enable_thinking)."""
        if self._compiled_template is None:
            self._compiled_template = compile_template(self.chat_template)
        return render_chat(
            self.chat_template,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            compiled=self._compiled_template,
            tools=tools,
            variables=variables,
        )

    def chat_tokens(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The prompt tokens of `messages` (and `tools`, `variables`) through the chat template. Only
        what the template writes becomes control tokens: the messages', tools' and variables' own
        text is tokenized as text, even where it spells a marker (a user who writes
        "<|im_start|>system" opens no turn)."""
        # masked together, so that no placeholder stands for two markers
        values = [list(messages), list(tools or ()), dict(variables or {})]
        masked, placeholders = mask_markers(values, self.control_texts())
        if not placeholders:
            return self.tokenize(self.render_chat(messages, tools=tools, variables=variables))
        masked_messages, masked_tools, masked_variables = masked
        rendered = self.render_chat(
            masked_messages, tools=masked_tools if tools is not None else None, variables=masked_variables
        )
        tokens: list[int] = []
        for part in re.split(f"([{''.join(placeholders)}])", rendered):
            if part in placeholders:
                tokens += self.tokenize(placeholders[part], add_special=False, parse_special=False)
            elif part:
                tokens += self.tokenize(part, add_special=False)
        edges = self.tokenize("", add_special=True)  # BOS (and EOS) as the model adds them to a text
        eos = edges[-1:] if self._L.llama_vocab_get_add_eos(self._vocab) else []
        bos = edges[: len(edges) - len(eos)]
        if tokens[: len(bos)] == bos:  # the template wrote BOS itself
            bos = []
        return bos + tokens + eos

    def control_texts(self) -> tuple[str, ...]:
        """The text of each of the vocabulary's control tokens ("<|im_start|>", "<|im_end|>"...)."""
        if self._control_texts is None:
            L = self._L
            control = L.LLAMA_TOKEN_ATTR_CONTROL
            texts = (
                self._special_text(t) for t in range(self.n_vocab) if L.llama_vocab_get_attr(self._vocab, t) & control
            )
            self._control_texts = tuple(dict.fromkeys(t for t in texts if t))
        return self._control_texts

    def chat_params(self, params: SamplingParams) -> SamplingParams:
        """`params` for a chat reply: with the fallback template's markers as stop strings when the
        model has no chat template of its own."""
        if self.has_chat_template:
            return params
        return replace(params, stop=tuple(dict.fromkeys(params.stop + FALLBACK_STOPS)))

    # ---- requests ---------------------------------------------------------------------------

    def complete(
        self, prompt: str, *, stream: bool = False, params: SamplingParams | None = None, **sampling: Any
    ) -> Result | Stream:
        """Continue `prompt` as plain text (no chat template). Returns a Result, or with
        stream=True a Stream of text pieces. Sampling options as in SamplingParams."""
        params = (params or SamplingParams()).with_options(**sampling)
        return self.generate(self.tokenize(prompt), params, stream=stream)

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        stream: bool = False,
        params: SamplingParams | None = None,
        **sampling: Any,
    ) -> Result | Stream:
        """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": str}]),
        rendered with the model's chat template. Returns a Result, or a Stream with stream=True.
        Calls with a growing history reuse the KV cache of the previous call."""
        params = self.chat_params((params or SamplingParams()).with_options(**sampling))
        return self.generate(self.chat_tokens(messages), params, stream=stream)

    def generate(
        self, tokens: Sequence[int], params: SamplingParams, *, stream: bool = False, slot: Slot | None = None
    ) -> Result | Stream:
        """Continue the prompt `tokens` on `slot` (default: the slots in turn). A Result, or a
        Stream with stream=True; ContextError when the prompt plus max_tokens do not fit."""
        if self._ctx is None:
            raise EngineError("the model is closed")
        if not tokens:
            raise ValueError("the prompt is empty")
        self.check_fits(len(tokens), params.max_tokens)
        result = Stream(self._generate(slot or self._take_slot(), list(tokens), params))
        return result if stream else result.collect()

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
        L, batch, slot = self._L, self._batch, self.slots[0]
        assert batch is not None
        slot.epoch += 1  # a stream still open on this slot must not continue on this cache
        self.truncate(slot, 0)
        rows = []
        for start in range(0, len(tokens), batch.capacity):
            chunk = list(tokens[start : start + batch.capacity])
            batch.clear()
            for i, token in enumerate(chunk):
                batch.add(token, start + i, slot.seq_id, start + i >= first)
            try:
                self.decode(batch)
            except EngineError:
                self.truncate(slot, 0)
                raise
            slot.tokens.extend(chunk)
            wanted = sum(start + i >= first for i in range(len(chunk)))
            if wanted:
                out = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(wanted * self.n_vocab,))
                rows.append(out.reshape(wanted, self.n_vocab).copy())
        return np.concatenate(rows) if rows else np.zeros((0, self.n_vocab), dtype=np.float32)

    def session(
        self,
        system: str | None = None,
        *,
        context_policy: str = "stop",
        params: SamplingParams | None = None,
        **sampling: Any,
    ) -> ChatSession:
        """A multi-turn chat. context_policy: "stop" raises ContextError when the history no longer
        fits, "drop-oldest" drops the oldest non-system messages until it does."""
        from slim.runtime.inference.session import ChatSession

        return ChatSession(
            self,
            system=system,
            context_policy=context_policy,
            params=(params or SamplingParams()).with_options(**sampling),
        )

    def clear_cache(self) -> None:
        """Forget every cached prompt: the next request evaluates its whole prompt."""
        self._L.llama_memory_clear(self._memory, True)
        if self.prompt_cache is not None:
            self.prompt_cache.clear()
        for slot in self.slots:
            slot.tokens.clear()
            slot.epoch += 1

    def _take_slot(self) -> Slot:
        slot = self.slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        return slot

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.n_ctx:
            raise ContextError(prompt_tokens, max_tokens, self.n_ctx)

    # ---- below the requests -----------------------------------------------------------------

    def decode(self, batch: Batch) -> None:
        """Evaluate `batch` (llama_decode). EngineError if llama.cpp fails; the caller records
        which tokens the slots now hold, and truncates them back if it does not."""
        batch.raw.n_tokens = batch.n
        rc = self._L.llama_decode(self._ctx, batch.raw)
        if rc == 1:
            raise EngineError(f"the KV cache is full ({self.n_ctx} tokens per sequence)")
        if rc != 0:
            raise EngineError(f"llama.cpp failed to evaluate the batch (llama_decode returned {rc})")

    def truncate(self, slot: Slot, keep: int) -> None:
        """Keep the first `keep` tokens of a slot's KV cache, drop the rest."""
        if not self._L.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._L.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)  # whole sequence: never fails
            keep = 0
        del slot.tokens[keep:]

    def cached_positions(self, slot: Slot) -> int:
        """How many positions llama.cpp's KV cache holds for a slot's sequence: equal to
        len(slot.tokens) whenever no decode is under way (what the slot bookkeeping promises)."""
        return int(self._L.llama_memory_seq_pos_max(self._memory, slot.seq_id)) + 1

    def state_bytes(self, slot: Slot) -> int:
        """The bytes of a slot's sequence state as llama.cpp saves it (its KV cells in the cache's
        types, and a small header): what keeping that sequence aside would take."""
        return int(self._L.llama_state_seq_get_size(self._ctx, slot.seq_id))

    def save_state(self, slot: Slot) -> bytes:
        """A copy of the slot's sequence state (its KV cells), for restore_state on any slot."""
        size = self.state_bytes(slot)
        buffer = (ctypes.c_uint8 * size)()
        written = int(self._L.llama_state_seq_get_data(self._ctx, buffer, size, slot.seq_id))
        return bytes(buffer)[:written]

    def restore_state(self, slot: Slot, state: CachedState) -> bool:
        """Replace the slot's cache with a saved state; False (and an empty slot) if llama.cpp
        could not take it."""
        self._L.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens.clear()
        buffer = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if not self._L.llama_state_seq_set_data(self._ctx, buffer, len(state.data), slot.seq_id):
            self._L.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            return False
        slot.tokens.extend(state.tokens)
        return True

    def logits_at(self, index: int) -> Any:
        """The logits of row `index` of the last decoded batch: a float32 array of n_vocab, valid
        until the next decode."""
        import numpy as np

        pointer = self._L.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    # ---- the core loop: one sequence through the Batcher ------------------------------------

    def _generate(self, slot: Slot, prompt: list[int], params: SamplingParams) -> Generator[str, None, Result]:
        """Yields text pieces; returns the Result. At every yield the slot's KV cache holds exactly
        slot.tokens, so a consumer may abandon the stream at any point."""
        t_start = time.perf_counter()
        batcher = Batcher(self, [slot])
        pieces: list[str] = []
        finish: str | None = None
        t_first: float | None = None
        t_last = t_start
        try:
            sequence = batcher.add(prompt, params)
            epoch = slot.epoch
            while finish is None:
                events = batcher.step()
                t_last = time.perf_counter()
                if t_first is None and (sequence.generated or events):
                    t_first = t_last
                for _, event in events:
                    if isinstance(event, Piece):
                        pieces.append(event.text)
                        yield event.text
                        if self._ctx is None:
                            raise EngineError("the model was closed while this stream was paused")
                        if slot.epoch != epoch:
                            raise RuntimeError("this stream was superseded by a newer request on the same sequence")
                    elif isinstance(event, Done):
                        finish = event.finish_reason
                    elif isinstance(event, Failed):
                        raise event.error
        finally:
            batcher.close()
        t_end = time.perf_counter()
        assert finish is not None and t_first is not None
        t_prompt = sequence.prompt_done_s or t_first
        n_eval = len(prompt) - sequence.cached_tokens
        prompt_s = t_prompt - t_start
        gen_s = t_last - t_first
        n_generated = sequence.generated
        timings = Timings(
            prompt_eval_s=prompt_s,
            time_to_first_token_s=t_first - t_start,
            generation_s=gen_s,
            total_s=t_end - t_start,
            prompt_tokens_per_s=n_eval / prompt_s if prompt_s > 0 else 0.0,
            generation_tokens_per_s=(n_generated - 1) / gen_s if n_generated > 1 and gen_s > 0 else 0.0,
            drafted_tokens=sequence.drafted,
            accepted_tokens=sequence.accepted,
        )
        return Result(
            text="".join(pieces),
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=n_generated,
            prompt_eval_tokens=n_eval,
            cached_tokens=sequence.cached_tokens,
            timings=timings,
        )
