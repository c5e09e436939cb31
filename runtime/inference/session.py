"""Multi-turn chat on one Model: ChatSession keeps the conversation on one KV-cache sequence, so
each turn evaluates only the tokens it adds."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from slim.runtime.inference.errors import ContextError
from slim.runtime.inference.model import Model, Result, Stream
from slim.runtime.inference.reasoning import prompt_opens_thinking, split_thinking, template_thinks, thinking_variables
from slim.runtime.inference.sampling import SamplingParams

__all__ = ["ChatSession"]


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
    message is removed too, as if the turn had not happened. Either way the session stays usable.

    A thinking template's replies (`thinks`) keep only their answer in `messages`; `thinking`
    switches the thought on or off where the template can (None: its default), and
    `opens_thinking` says whether the last prompt left a thought open, so that a reader of the
    stream (inference.ThinkingSplitter) knows where the reply starts.

    `slot` is the KV-cache sequence the conversation lives on."""

    POLICIES = ("stop", "drop-oldest")

    def __init__(
        self,
        model: Model,
        system: str | None = None,
        *,
        context_policy: str = "stop",
        params: SamplingParams | None = None,
    ) -> None:
        if context_policy not in self.POLICIES:
            raise ValueError(f"context_policy must be one of {', '.join(self.POLICIES)}, not {context_policy!r}")
        self.model = model
        self.context_policy = context_policy
        self.params = params or SamplingParams()
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.last_result: Result | None = None
        self.slot = model._take_slot()
        self._pending: _Turn | None = None
        self.thinks = model.has_chat_template and template_thinks(model.chat_template)
        self.thinking: bool | None = None
        self.opens_thinking = False

    def send(
        self, content: str, *, stream: bool = False, params: SamplingParams | None = None, **sampling: Any
    ) -> Result | Stream:
        """Send one user message and get the assistant's reply."""
        self._settle()
        params = self.model.chat_params((params or self.params).with_options(**sampling))
        turn = _Turn({"role": "user", "content": content})
        self.messages.append(turn.user)
        try:
            tokens, dropped = self._fit(params)
        except BaseException:
            self._remove(turn.user)
            raise
        self._pending = turn
        inner = self.model.generate(tokens, params, stream=True, slot=self.slot)
        assert isinstance(inner, Stream)
        reply = Stream(self._follow(turn, inner, dropped))
        return reply if stream else reply.collect()

    def _follow(self, turn: _Turn, inner: Stream, dropped: int) -> Generator[str, None, Result]:
        try:
            for piece in inner:
                turn.text += piece
                yield piece
            assert inner.result is not None
            inner.result.dropped_messages = dropped
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
            answer = split_thinking(turn.text, self.opens_thinking)[1] if self.thinks else turn.text
            self.messages.append({"role": "assistant", "content": answer})
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
            tokens = model.chat_tokens(messages, variables=thinking_variables(self.thinking))
            if len(tokens) + params.max_tokens <= model.n_ctx:
                dropped = len(self.messages) - len(messages)
                self.messages[:] = messages
                self.opens_thinking = self.thinks and prompt_opens_thinking(model.detokenize(tokens[-8:], special=True))
                return tokens, dropped
            if self.context_policy == "stop":
                raise ContextError(
                    len(tokens),
                    params.max_tokens,
                    model.n_ctx,
                    "; start a new chat, lower max_tokens or use a larger context",
                )
            oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if oldest is None:
                raise ContextError(
                    len(tokens),
                    params.max_tokens,
                    model.n_ctx,
                    "even with every earlier message dropped; shorten the message, "
                    "lower max_tokens or use a larger context",
                )
            removed = messages.pop(oldest)
            if removed["role"] == "user" and oldest < len(messages) - 1 and messages[oldest]["role"] == "assistant":
                del messages[oldest]  # its reply goes with it
