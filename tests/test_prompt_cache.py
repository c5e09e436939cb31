"""The prompt cache across requests: a conversation whose slot was taken by another one starts its
next turn from its saved KV state (on any slot), evaluates only the new tokens, answers exactly as
if its whole prompt had been evaluated, and says so in usage; the cache stays within its bytes."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from helpers import serving

from slim.runtime import inference
from slim.runtime.inference import Batcher, Piece, SamplingParams
from slim.runtime.inference.prompt_cache import MIN_TOKENS, PromptCache

GREEDY = SamplingParams(temperature=0, max_tokens=12)
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. " * 3
OTHER = "The mitochondria is the powerhouse of the cell, and photosynthesis happens in the chloroplasts. " * 3


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_the_cache_keeps_the_longest_states_within_its_bytes() -> None:
    cache = PromptCache(capacity=300)
    assert not cache.put(tokens(MIN_TOKENS - 1), b"x" * 10)  # too short to be worth keeping
    assert not cache.put(tokens(40), b"x" * 301)  # larger than the whole cache
    assert cache.put(tokens(40), b"a" * 100) and cache.put(tokens(50, start=1000), b"b" * 100)
    assert cache.put(tokens(60), b"c" * 100)  # extends the first: that one is dropped
    assert len(cache) == 2 and cache.size == 200 and cache.covers(tokens(45)) and not cache.covers(tokens(61))
    state, shared = cache.longest(tokens(55) + [7, 7])
    assert state is not None and state.data == b"c" * 100 and shared == 55  # now the most recently used
    assert cache.put(tokens(40, start=5000), b"d" * 150)  # past the bound: the least recently used leaves
    assert cache.size == 250 and cache.longest(tokens(50, start=1000)) == (None, 0)
    assert cache.longest(tokens(MIN_TOKENS - 1)) == (None, 0)  # a short match is not worth a copy
    cache.clear()
    assert len(cache) == 0 and cache.size == 0


def run(batcher: Batcher, prompt: list[int]) -> tuple[str, int]:
    sequence = batcher.add(prompt, GREEDY)
    text = []
    while batcher.running:
        for _, event in batcher.step():
            if isinstance(event, Piece):
                text.append(event.text)
    return "".join(text), sequence.cached_tokens


def test_a_displaced_conversation_resumes_from_its_saved_state(smollm2_gguf: Path) -> None:
    with inference.load(smollm2_gguf, n_ctx=512, n_threads=1, prompt_cache_bytes=64 << 20) as model:
        story, other = model.tokenize(STORY), model.tokenize(OTHER)
        batcher = Batcher(model)  # one slot: every new conversation displaces the last
        first, _ = run(batcher, story)
        run(batcher, other)  # the story's state is kept aside before its slot is cut back
        assert model.prompt_cache is not None and model.prompt_cache.covers(story)
        turn = story + model.tokenize(first + " And then", add_special=False)
        resumed, cached = run(batcher, turn)
        assert cached >= len(story)
        batcher.close()
    with inference.load(smollm2_gguf, n_ctx=512, n_threads=1) as fresh:
        batcher = Batcher(fresh)
        assert run(batcher, turn) == (resumed, 0)  # the same answer as from the whole prompt
        batcher.close()


@pytest.fixture(scope="module")
def base(smollm2_gguf: Path):
    with serving({"smollm2-135m": smollm2_gguf}, parallel=1, ctx=1024, prompt_cache_bytes=128 << 20) as base_url:
        yield base_url


def test_usage_counts_the_tokens_taken_from_the_cache(base: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    system = {"role": "system", "content": STORY}

    def chat(messages: list[dict[str, str]]) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0)

    ask = [system, {"role": "user", "content": "Who lived by the sea?"}]
    first = chat(ask)
    chat([{"role": "system", "content": OTHER}, {"role": "user", "content": "Where is the powerhouse?"}])
    again = ask + [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And what did he do?"},
    ]
    second = chat(again)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
