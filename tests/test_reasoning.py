"""Thinking told apart from the answer (inference/reasoning.py): the same split however the reply
is cut into pieces, the markers and the whitespace around them left out, a marker quoted inside
the answer kept as text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slim.runtime.inference import ThinkingSplitter, prompt_opens_thinking, split_thinking, template_thinks

REPLIES = [
    # (reply, starts inside a thought, thought, answer)
    ("<think>\nThe user greets me.\n</think>\n\nHello!", False, "The user greets me.", "Hello!"),
    ("  <think>a < b</think>b", False, "a < b", "b"),
    ("The answer is 4.", False, None, "The answer is 4."),
    ("Say <think> to start. </think>", False, None, "Say <think> to start. </think>"),
    ("<think>unfinished thought", False, "unfinished thought", ""),
    ("<think>\n\n</think>\n\nNo thought.", False, None, "No thought."),
    ("<thi", False, None, "<thi"),
    ("Weighing it up.\n</think>\nYes. </think> stays.", True, "Weighing it up.", "Yes. </think> stays."),
    ("still thinking </thi", True, "still thinking </thi", ""),
    ("", True, None, ""),
]


def pieces(text: str, cuts: list[int]) -> list[str]:
    at = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]


@pytest.mark.parametrize(("reply", "inside", "thought", "answer"), REPLIES)
def test_a_whole_reply_is_split(reply: str, inside: bool, thought: str | None, answer: str) -> None:
    assert split_thinking(reply, inside) == (thought, answer)


@given(st.sampled_from(REPLIES), st.lists(st.integers(min_value=0, max_value=60), max_size=12))
def test_any_cut_into_pieces_gives_the_same_split(case: tuple[str, bool, str | None, str], cuts: list[int]) -> None:
    reply, inside, thought, answer = case
    splitter = ThinkingSplitter(inside)
    parts = [part for piece in pieces(reply, cuts) for part in splitter.feed(piece)] + splitter.flush()
    assert all(text for _, text in parts)
    got_thought = "".join(text for is_thought, text in parts if is_thought) or None
    assert (got_thought, "".join(text for is_thought, text in parts if not is_thought)) == (thought, answer)
    kinds = [is_thought for is_thought, _ in parts]
    assert kinds == sorted(kinds, reverse=True)  # the thought, then the answer: never back


def test_thinking_templates_and_prompts_left_inside_a_thought() -> None:
    assert template_thinks("{% if '</think>' in content %}{% endif %}") and not template_thinks("<|im_start|>")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
