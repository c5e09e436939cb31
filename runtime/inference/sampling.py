"""How tokens are chosen: SamplingParams, and Sampler, llama.cpp's C sampler chain built from them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slim.runtime.inference.model import Model

__all__ = ["REPEAT_LAST_N", "GrammarError", "Sampler", "SamplingParams"]

REPEAT_LAST_N = 64  # tokens the penalties look back over (llama.cpp's default)


class GrammarError(ValueError):
    """llama.cpp could not parse a GBNF grammar."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 means greedy (deterministic); the defaults are
    llama.cpp's. top_k 0, top_p 1, min_p 0 and repeat_penalty 1 each turn that step off.
    seed None draws a random seed. Generation stops at an end-of-generation token, at any of
    `stop` (which is not included in the text) or after max_tokens tokens.

    The penalties (llama.cpp's repeat_penalty, OpenAI's frequency_penalty and presence_penalty)
    look back over the last penalty_last_n tokens, the prompt's included when penalize_prompt
    (llama.cpp's way) or only the generated ones (OpenAI's). grammar (GBNF, root rule "root")
    constrains the output. thinking_budget: for a reply told apart into thought and answer, the
    most tokens of thought before </think> is written in place of the next sampled tokens."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = REPEAT_LAST_N
    penalize_prompt: bool = True
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    thinking_budget: int | None = None

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
            (
                math.isfinite(self.frequency_penalty) and math.isfinite(self.presence_penalty),
                "frequency_penalty and presence_penalty must be finite numbers",
            ),
            (self.penalty_last_n >= 0, "penalty_last_n must be >= 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.seed is None or 0 <= self.seed < 0xFFFFFFFF, "seed must be in [0, 4294967295)"),
            (all(isinstance(s, str) for s in self.stop), "stop strings must be strings"),
            (self.thinking_budget is None or self.thinking_budget >= 0, "thinking_budget must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on."""
        return self.repeat_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    def with_options(self, **options: Any) -> SamplingParams:
        """A copy with the given fields changed; unknown names raise TypeError, None values are ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in options.items() if v is not None})


class Sampler:
    """A C sampler chain for one generation: grammar first, so the output must match it; the
    penalties; then greedy at temperature 0, or top-k, top-p, min-p, temperature and a seeded draw.
    GrammarError if llama.cpp rejects the grammar. close() frees it."""

    def __init__(self, model: Model, params: SamplingParams) -> None:
        L = self._L = model._L
        self._model = model
        chain = self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda sampler: L.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if params.grammar is not None:
            sampler = L.llama_sampler_init_grammar(model._vocab, params.grammar.encode(), b"root")
            if not sampler:
                self.close()
                raise GrammarError("llama.cpp could not parse the grammar")
            add(sampler)
        if params.penalized:
            add(
                L.llama_sampler_init_penalties(
                    model.n_vocab,
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0:
            add(L.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(L.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(L.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(L.llama_sampler_init_min_p(params.min_p, 1))
        add(L.llama_sampler_init_temp(params.temperature))
        add(L.llama_sampler_init_dist(L.LLAMA_DEFAULT_SEED if params.seed is None else params.seed))

    def accept(self, tokens: Iterable[int]) -> None:
        """Count `tokens` as already generated (what the penalties look back over)."""
        for token in tokens:
            self._L.llama_sampler_accept(self._chain, token)

    def sample(self, index: int) -> int:
        """The token chosen from the logits at row `index` of the last decoded batch (accepted)."""
        return self._L.llama_sampler_sample(self._chain, self._model._ctx, index)

    def close(self) -> None:
        if self._chain is not None:
            self._L.llama_sampler_free(self._chain)
            self._chain = None
