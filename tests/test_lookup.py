"""Prompt lookup decoding (Batcher's lookup, `--lookup N`): drafts copied from earlier in the context
and checked in the same batch change nothing in the output, greedy or seeded, alone or batched with
other sequences; only the steps it takes. On the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_slim

from slim.runtime import inference
from slim.runtime.inference import Batcher, Done, Piece, SamplingParams
from slim.runtime.inference.batching import propose

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
    "step. All that glitters is not gold."
)
PROMPTS = [
    f"Repeat this text exactly, word for word:\n\n{TEXT}",  # a reply that copies its prompt
    "Name three colours.",
    "Write a Python function that adds two numbers, then write it again with type hints.",
]


def test_proposals_follow_the_latest_earlier_occurrence_of_the_last_tokens() -> None:
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # the latest match, the longest first
    assert propose([5, 6, 7, 8, 5, 6, 7], 9) == [8, 5, 6, 7]  # as many as there are
    assert propose([5, 6, 7, 8, 6, 7], 4) == []  # two tokens are too weak a match by default
    assert propose([1, 2, 3, 4], 3) == [] and propose([1, 2, 1, 2], 0) == []
    assert propose([4, 1, 2, 9, 1, 2], 1, shortest=2) == [9]


@pytest.fixture(scope="module")
def models(smollm2_gguf: Path):
    with (
        inference.load(smollm2_gguf, n_ctx=1024, n_threads=1, n_seq_max=2) as plain,
        inference.load(smollm2_gguf, n_ctx=1024, n_threads=1, n_seq_max=2, lookup=8) as drafting,
    ):
        yield plain, drafting


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 7}])
def test_a_reply_is_the_same_with_drafts(models: tuple[inference.Model, inference.Model], sampling: dict) -> None:
    plain, drafting = models
    accepted = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        expected = plain.chat(messages, max_tokens=80, **sampling)
        got = drafting.chat(messages, max_tokens=80, **sampling)
        assert (got.text, got.finish_reason, got.completion_tokens) == (
            expected.text,
            expected.finish_reason,
            expected.completion_tokens,
        )
        assert expected.timings.drafted_tokens == 0
        accepted.append(got.timings.accepted_tokens)
    assert accepted[0] > 10  # the copied reply took its drafts


def test_batched_sequences_with_drafts_give_their_own_replies(models: tuple[inference.Model, inference.Model]) -> None:
    """Two sequences decoded together, each verifying its drafts in the shared batch."""
    plain, drafting = models
    params = SamplingParams(temperature=0, max_tokens=60)
    prompts = [plain.chat_tokens([{"role": "user", "content": p}]) for p in PROMPTS[:2]]
    expected = [plain.chat([{"role": "user", "content": p}], params=params).text for p in PROMPTS[:2]]
    batcher = Batcher(drafting)
    sequences = [batcher.add(tokens, params) for tokens in prompts]
    texts = {id(s): "" for s in sequences}
    while batcher.running:
        for sequence, event in batcher.step():
            if isinstance(event, Piece):
                texts[id(sequence)] += event.text
            else:
                assert isinstance(event, Done)
    batcher.close()
    assert [texts[id(s)] for s in sequences] == expected
    assert sequences[0].accepted > 10


def test_slim_run_lookup_reports_its_drafts(smollm2_gguf: Path) -> None:
    args = ["run", str(smollm2_gguf), PROMPTS[0], "--temperature", "0", "-n", "60", "--threads", "1", "--json"]
    plain = json.loads(run_slim(*args).stdout)
    drafted = json.loads(run_slim(*args, "--lookup", "8").stdout)
    assert drafted["text"] == plain["text"]
    timings = drafted["timings"]
    assert 0 < timings["accepted_tokens"] <= timings["drafted_tokens"]
