"""Thinking told apart from the answer.

Reasoning models (Qwen3, QwQ, DeepSeek-R1 distills, SmolLM3) write their thoughts between <think>
and </think> before the reply. A template that knows the markers is a thinking template; some
(DeepSeek-R1's) open the block in the generation prompt themselves, so the reply starts inside it.
ThinkingSplitter cuts a reply into thought and answer as it streams: a piece of text may end in
the middle of a marker, so the characters that could begin one are held back until the next piece
(or the end) says what they are. Only the reply's start may open a thought, and the first close
ends it: a marker quoted later in the answer stays text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CLOSE",
    "OPEN",
    "ThinkingSplitter",
    "effort_enables",
    "prompt_opens_thinking",
    "split_thinking",
    "template_thinks",
    "thinking_variables",
]

OPEN, CLOSE = "<think>", "</think>"

# what the template's `enable_thinking` (Qwen3, SmolLM3) becomes for OpenAI's reasoning_effort
_EFFORT_OFF = frozenset({"none", "minimal"})


def template_thinks(template: str) -> bool:
    """Whether a chat template writes (or strips) thinking blocks: its replies are split."""
    return CLOSE in template


def prompt_opens_thinking(prompt_end: str) -> bool:
    """Whether the rendered prompt (its last characters suffice) leaves a thinking block open, so
    that the reply starts inside it."""
    head, opened, rest = prompt_end.rpartition(OPEN)
    return bool(opened) and CLOSE not in rest


def thinking_variables(enabled: bool | None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The template variables of a request: its own (chat_template_kwargs) and enable_thinking
    when the request switched thinking on or off (None: the template's default)."""
    variables = dict(extra or {})
    if enabled is not None:
        variables["enable_thinking"] = enabled
    return variables


def effort_enables(effort: str | None) -> bool | None:
    """OpenAI's reasoning_effort as enable_thinking: "none" and "minimal" switch it off."""
    return None if effort is None else effort not in _EFFORT_OFF


class ThinkingSplitter:
    """feed() each piece of a reply, then flush(): each gives [(is_thought, text)], in order, with
    the markers, and the whitespace around the thought and before the answer, removed."""

    def __init__(self, inside: bool = False) -> None:
        self._state = "thought" if inside else "start"
        self._held = ""
        self._thought_began = False

    @property
    def in_thought(self) -> bool:
        """Whether the text fed so far has opened a thought and not closed it."""
        return self._state == "thought"

    def feed(self, text: str) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        text, self._held = self._held + text, ""
        while text:
            if self._state == "start":
                stripped = text.lstrip()
                if stripped.startswith(OPEN):
                    self._state, text = "thought", stripped[len(OPEN) :]
                elif OPEN.startswith(stripped):  # whitespace, or the start of <think>: wait and see
                    self._held = text
                    return out
                else:
                    self._state = "answer"
            elif self._state == "thought":
                if not self._thought_began:  # the whitespace after <think> is dropped
                    text = text.lstrip()
                    self._thought_began = bool(text)
                before, closed, after = text.partition(CLOSE)
                if closed:
                    self._emit(out, True, before.rstrip())
                    self._state, text = "after", after
                    continue
                # held back: what may begin </think>, and the whitespace before it (dropped if it closes)
                body = text[: len(text) - _partial_suffix(text, CLOSE)]
                shown = body.rstrip()
                self._emit(out, True, shown)
                self._held = text[len(shown) :]
                return out
            elif self._state == "after":  # the whitespace between </think> and the answer is dropped
                text = text.lstrip()
                if text:
                    self._state = "answer"
            else:
                self._emit(out, False, text)
                return out
        return out

    def flush(self) -> list[tuple[bool, str]]:
        """What was held back, once the reply has ended: an unfinished marker is text."""
        held, self._held = self._held, ""
        out: list[tuple[bool, str]] = []
        if self._state == "thought":
            self._emit(out, True, held.rstrip())
        elif held.strip():
            self._emit(out, False, held)
        return out

    @staticmethod
    def _emit(out: list[tuple[bool, str]], thought: bool, text: str) -> None:
        if text:
            out.append((thought, text))


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (0 when none does)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split_thinking(text: str, inside: bool = False) -> tuple[str | None, str]:
    """A whole reply's (thought, answer); thought is None when the reply has none."""
    splitter = ThinkingSplitter(inside)
    parts = splitter.feed(text) + splitter.flush()
    thought = "".join(t for is_thought, t in parts if is_thought)
    answer = "".join(t for is_thought, t in parts if not is_thought)
    return (thought or None), answer
