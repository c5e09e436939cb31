"""Sentence embeddings: a second llama.cpp context on a Model's weights, with mean pooling."""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from slim.runtime.inference.batching import Batch
from slim.runtime.inference.errors import EngineError

if TYPE_CHECKING:
    from slim.runtime.inference.model import Model

__all__ = ["Embedder"]


class Embedder:
    """Sentence embeddings from a context with embeddings on and mean pooling, made on first use
    (n_embd is known from then). One input at a time (a lock); it never touches the generation
    context, so it may run beside a Batcher on the same Model. EngineError if llama.cpp fails."""

    def __init__(self, model: Model, n_ctx: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.n_embd = 0
        self._ctx = None
        self._batch: Batch | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._ctx is not None

    def _open(self) -> None:
        model = self.model
        L = model._L
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx  # pooling needs one ubatch per input
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = model.n_threads
        params.embeddings = True
        params.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
        params.no_perf = True
        ctx = L.llama_init_from_model(model._model, params)
        if not ctx:
            raise EngineError("llama.cpp could not create the embeddings context")
        self._ctx = ctx
        self._batch = Batch(self.n_ctx)
        self.n_embd = int(L.llama_model_n_embd(model._model))

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """The L2-normalised mean of the last layer's hidden states over `tokens` (at most n_ctx)."""
        L = self.model._L
        with self._lock:
            if self._ctx is None:
                self._open()
            assert self._batch is not None
            L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
            batch = self._batch
            batch.clear()
            for i, token in enumerate(tokens):
                batch.add(token, i, 0, True)
            batch.raw.n_tokens = batch.n
            rc = L.llama_decode(self._ctx, batch.raw)
            if rc != 0:
                raise EngineError(f"llama.cpp failed to embed the input (llama_decode returned {rc})")
            pointer = L.llama_get_embeddings_seq(self._ctx, 0)
            if not pointer:
                raise EngineError("llama.cpp returned no embedding")
            values = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[: self.n_embd]
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
