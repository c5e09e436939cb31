"""The offline pipeline: HF -> GGUF (convert), GGUF -> HF (export), the importance matrix
(calibrate), pruning (prune) and fetching a model into the store (pull). Each is a library
function the CLI only wraps; the long ones report through a `Progress` callback.

Imports: formats, store, inference and train (pruning's healing distils); kernels and models.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """How a long pipeline (prune_model, pull) reports: `done` of `total` units (None: not known
    yet) of the named stage; a training stage also gives its latest loss."""

    def __call__(self, stage: str, done: int, total: int | None, *, loss: float | None = None) -> None: ...
