"""A thinking model's thought told apart from its answer on every surface of slim serve, each driven
with its own client library against a real server on 127.0.0.1: OpenAI's reasoning_content,
Anthropic's thinking blocks, Ollama's thinking, the Responses API's reasoning item; whole and
streamed; and the request switches that turn thinking off.

The model is SmolLM2 with a thinking chat template (the generation prompt opens <think>, as
DeepSeek-R1's does; enable_thinking false writes an empty thought instead, as Qwen3's does) and
one vocabulary entry, " edible", renamed "</think>": its greedy reply to "Name a fruit." then
closes its thought at a known token, as a reasoning model's would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from helpers import serving

from slim.runtime.inference import split_thinking

MODEL = "thinker"
QUESTION = [{"role": "user", "content": "Name a fruit."}]
GREEDY = {"temperature": 0}
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n"
    "{% endif %}{% endif %}"
)
PROMPT = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
THOUGHT_TOKENS = 7  # "\n", "A", " fruit", " is", " a", " sweet", ",": then the renamed token closes it
RENAMED = (b"\x08" + bytes(7) + "\u0120edible".encode(), b"\x08" + bytes(7) + b"</think>")  # GGUF strings: u64 length


@pytest.fixture(scope="module")
def thinker_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("thinker")
    templated = folder / "templated.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_gguf), str(templated)]
        + ["--chat-template", THINKING_TEMPLATE, "--force"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = templated.read_bytes()
    assert data.count(RENAMED[0]) == 1  # the vocabulary's entry, and nothing else
    path = folder / "thinker.gguf"
    path.write_bytes(data.replace(*RENAMED))
    return path


@pytest.fixture(scope="module")
def base(thinker_gguf: Path):
    with serving({MODEL: thinker_gguf}) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def expected(base: str) -> tuple[str, str]:
    """(thought, answer) of the raw greedy continuation of the rendered prompt, thought opened."""
    raw = httpx.post(
        base + "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT + "<think>\n", "max_tokens": 24, **GREEDY},
        timeout=60,
    ).json()["choices"][0]["text"]
    thought, answer = split_thinking(raw, inside=True)
    assert thought == "A fruit is a sweet," and answer  # the renamed token closed it
    return thought, answer


@pytest.fixture(scope="module")
def plain_answer(base: str) -> str:
    """The greedy continuation of the prompt with an empty thought (thinking switched off)."""
    prompt = PROMPT + "<think>\n\n</think>\n\n"
    answer = httpx.post(
        base + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24, **GREEDY}, timeout=60
    ).json()["choices"][0]["text"]
    assert answer  # with </think> in it: past the reply's start, a marker is the answer's text
    return answer


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_chat_puts_the_thought_in_reasoning_content(oai: openai.OpenAI, expected: tuple[str, str]) -> None:
    reply = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, **GREEDY)  # type: ignore[arg-type]
    message = reply.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") == expected[0]
    assert message.content == expected[1]
    assert reply.usage and reply.usage.completion_tokens_details
    assert reply.usage.completion_tokens_details.reasoning_tokens == THOUGHT_TOKENS

    stream = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, stream=True, **GREEDY)  # type: ignore[arg-type]
    kinds, parts = [], {"reasoning_content": "", "content": ""}
    for chunk in stream:
        delta = chunk.choices[0].delta.model_dump(exclude_none=True) if chunk.choices else {}
        for kind in parts:
            if delta.get(kind):
                parts[kind] += delta[kind]
                kinds.append(kind)
    assert (parts["reasoning_content"], parts["content"]) == expected
    assert kinds == sorted(kinds, reverse=True)  # every piece of the thought before the answer


def test_a_reply_cut_inside_its_thought_has_no_answer(oai: openai.OpenAI, expected: tuple[str, str]) -> None:
    reply = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, **GREEDY)  # type: ignore[arg-type]
    choice = reply.choices[0]
    thought = (choice.message.model_extra or {}).get("reasoning_content")
    assert choice.finish_reason == "length" and thought and expected[0].startswith(thought)
    assert choice.message.content == ""


def test_thinking_switched_off_by_each_surface(base: str, oai: openai.OpenAI, plain_answer: str) -> None:
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        reply = oai.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, extra_body={**extra, **GREEDY}
        )
        message = reply.choices[0].message
        assert "reasoning_content" not in (message.model_extra or {}) and message.content == plain_answer
    claude = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=60)
    reply = claude.messages.create(
        model=MODEL, messages=QUESTION, max_tokens=24, thinking={"type": "disabled"}, extra_body=GREEDY
    )
    assert [(b.type, getattr(b, "text", None)) for b in reply.content] == [("text", plain_answer)]
    answer = ollama.Client(host=base).chat(
        MODEL, messages=QUESTION, think=False, options={"temperature": 0, "num_predict": 24}
    )
    assert answer.message.thinking is None and answer.message.content == plain_answer
    response = oai.responses.create(
        model=MODEL, input="Name a fruit.", max_output_tokens=24, reasoning={"effort": "none"}, temperature=0
    )
    assert [item.type for item in response.output] == ["message"] and response.output_text == plain_answer


def test_anthropic_thinking_blocks(base: str, expected: tuple[str, str]) -> None:
    claude = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=60)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    reply = claude.messages.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        thinking=thinking,
        extra_body=GREEDY,  # type: ignore[arg-type]
    )
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert (reply.content[0].thinking, reply.content[1].text) == expected  # type: ignore[union-attr]

    with claude.messages.stream(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        thinking=thinking,
        extra_body=GREEDY,  # type: ignore[arg-type]
    ) as stream:
        events = [(e.type, getattr(e, "index", None)) for e in stream if e.type.startswith("content_block")]
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in reply.content]
    assert events[0] == ("content_block_start", 0) and events[-1] == ("content_block_stop", 1)
    assert events.index(("content_block_stop", 0)) < events.index(("content_block_start", 1))

    # the reply sent back with its thinking block, as clients keep a conversation
    history = [*QUESTION, {"role": "assistant", "content": [b.model_dump() for b in reply.content]}]
    again = claude.messages.create(
        model=MODEL,
        messages=[*history, {"role": "user", "content": "Another one."}],  # type: ignore[list-item]
        max_tokens=8,
        extra_body=GREEDY,
    )
    assert again.content and again.content[0].type == "thinking"


def test_ollama_thinking(base: str, expected: tuple[str, str]) -> None:
    client = ollama.Client(host=base)
    options = {"temperature": 0, "num_predict": 24}
    answer = client.chat(MODEL, messages=QUESTION, think=True, options=options)
    assert (answer.message.thinking, answer.message.content) == expected
    thought = content = ""
    for part in client.chat(MODEL, messages=QUESTION, think=True, options=options, stream=True):
        thought += part.message.thinking or ""
        content += part.message.content or ""
    assert (thought, content) == expected
    generated = client.generate(MODEL, "Name a fruit.", think=True, options=options)
    assert (generated.thinking, generated.response) == expected


def test_responses_reasoning_item(oai: openai.OpenAI, expected: tuple[str, str]) -> None:
    response = oai.responses.create(model=MODEL, input="Name a fruit.", max_output_tokens=24, temperature=0)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.content and reasoning.content[0].text == expected[0]  # type: ignore[union-attr]
    assert response.output_text == expected[1]
    assert response.usage and response.usage.output_tokens_details.reasoning_tokens == THOUGHT_TOKENS

    stream = oai.responses.create(model=MODEL, input="Name a fruit.", max_output_tokens=24, temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    assert thought == expected[0]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == expected[1] and [item.type for item in final.output] == ["reasoning", "message"]
    added = [json.loads(e.model_dump_json()) for e in events if e.type == "response.output_item.added"]
    assert [(a["output_index"], a["item"]["type"]) for a in added] == [(0, "reasoning"), (1, "message")]


def test_slim_chat_shows_the_thought_dimmed_and_keeps_the_answer(
    thinker_gguf: Path, expected: tuple[str, str], plain_answer: str, tmp_path: Path
) -> None:
    """On a terminal the thought comes dimmed before the answer; through a pipe only the answer
    comes; /think off switches it off; the conversation keeps the answers alone."""
    import os

    import pexpect

    command = [sys.executable, "-m", "slim.runtime.cli", "chat", str(thinker_gguf)]
    command += ["--temperature", "0", "--threads", "1", "--max-tokens", "24"]
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=60, env={**os.environ, "TERM": "dumb"})
    child.expect(">>> ")
    child.sendline("Name a fruit.")
    child.expect_exact(f"\x1b[2m{expected[0]}\x1b[22m\r\n\r\n{expected[1]}".replace("\n", "\r\n").replace("\r\r", "\r"))
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)

    saved = tmp_path / "chat.json"
    lines = ["Name a fruit.", "/think off", "/reset", "Name a fruit.", f"/save {saved}"]
    run = subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{expected[1]}\n{plain_answer}\n"
    assert "(thinking off)" in run.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert messages == [*QUESTION, {"role": "assistant", "content": plain_answer}]


def test_a_thinking_budget_closes_the_thought(base: str, oai: openai.OpenAI, expected: tuple[str, str]) -> None:
    """thinking_budget (OpenAI, Qwen's name) and budget_tokens (Anthropic): after that many tokens of
    thought, </think> is written in place of the next tokens and the model answers from there."""
    thoughts = []
    for budget in (0, 3):
        reply = oai.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, extra_body={"thinking_budget": budget, **GREEDY}
        )
        message = reply.choices[0].message
        thoughts.append((message.model_extra or {}).get("reasoning_content"))
        assert message.content and not message.content.startswith("</think>")
        assert reply.usage and reply.usage.completion_tokens_details
        assert reply.usage.completion_tokens_details.reasoning_tokens == budget
    assert thoughts == [None, "A fruit"]  # "\n", "A", " fruit": three tokens of "A fruit is a sweet,"
    assert expected[0].startswith("A fruit is")
    claude = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=60)
    reply = claude.messages.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=24,
        thinking={"type": "enabled", "budget_tokens": 3},
        extra_body=GREEDY,
    )
    assert [b.type for b in reply.content] == ["thinking", "text"] and reply.content[0].thinking == "A fruit"  # type: ignore[union-attr]
