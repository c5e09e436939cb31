"""The prompt cache across requests: KV states of sequences kept in RAM, keyed by their tokens.

An agent resends its whole conversation every turn, and with several conversations on a few
slots the next turn often lands on a slot that now holds another conversation. Before a slot's
cache is cut back for a prompt that shares less of it, the Batcher saves the slot's sequence state
here (llama.cpp's llama_state_seq_get_data: the KV cells in the cache's types); a later prompt that
continues one of these states further than any free slot does is started from it instead
(llama_state_seq_set_data), and only its new tokens are evaluated. Bounded in bytes, the least
recently used state leaves first; a state that another one extends is dropped as redundant.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from slim.runtime.inference.batching import common_prefix

__all__ = ["CachedState", "PromptCache"]

#: States of fewer tokens are not worth a copy: evaluating them again is cheap.
MIN_TOKENS = 32


@dataclass(frozen=True)
class CachedState:
    tokens: tuple[int, ...]
    data: bytes


class PromptCache:
    """Saved sequence states within `capacity` bytes. Not thread-safe: the Batcher's thread uses it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0  # bytes held
        self._states: OrderedDict[tuple[int, ...], CachedState] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._states)

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether a kept state already holds `tokens` (or more after them)."""
        key = tuple(tokens)
        return any(state[: len(key)] == key for state in self._states)

    def put(self, tokens: Sequence[int], data: bytes) -> bool:
        """Keep the state `data` of a sequence that holds `tokens`; whether it was kept (a state too
        short, or larger than the whole cache, is not). States it extends are dropped."""
        key = tuple(tokens)
        if len(key) < MIN_TOKENS or len(data) > self.capacity:
            return False
        for older in [state for state in self._states if key[: len(state)] == state]:
            self._drop(older)
        while self.size + len(data) > self.capacity:
            self._drop(next(iter(self._states)))
        self._states[key] = CachedState(key, data)
        self.size += len(data)
        return True

    def longest(self, prompt: Sequence[int]) -> tuple[CachedState | None, int]:
        """The kept state that shares the longest prefix with `prompt`, and that prefix's length
        (None and 0 when none shares MIN_TOKENS); it becomes the most recently used."""
        best, best_len = None, 0
        for state in self._states.values():
            shared = common_prefix(state.tokens, prompt)
            if shared > best_len:
                best, best_len = state, shared
        if best is None or best_len < MIN_TOKENS:
            return None, 0
        self._states.move_to_end(best.tokens)
        return best, best_len

    def clear(self) -> None:
        self._states.clear()
        self.size = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        self.size -= len(self._states.pop(key).data)
