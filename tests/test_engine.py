"""The inference engine and `slim run`, on the real SmolLM2 GGUF through real llama.cpp.

Generations are short (max_tokens of 8-24) so the whole file stays quick on two cores. The
in-process model uses one thread: on a loaded two-core machine llama.cpp's two threads spend
their time waiting for each other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import run_slim

from slim.runtime import inference
from slim.runtime.formats.gguf_file import check_gguf
from slim.runtime.inference import ContextError, SamplingParams, TextAssembler

GREEDY = SamplingParams(temperature=0, max_tokens=16)
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path) -> inference.Model:
    with inference.load(smollm2_gguf, n_ctx=1024, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def no_template_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of SmolLM2 whose tokenizer.chat_template key is renamed (same length, so every
    offset stays valid): a well-formed GGUF that has no chat template."""
    target = tmp_path_factory.mktemp("notemplate") / "no-template.gguf"
    shutil.copy(smollm2_gguf, target)
    key = b"tokenizer.chat_template"
    with open(target, "r+b") as f:
        head = f.read(8 << 20)
        at = head.find(len(key).to_bytes(8, "little") + key)
        assert at > 0
        f.seek(at + 8)
        f.write(b"x-removed.chat_template")
    return target


def slim_run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_slim("run", *args, input=stdin)


# ---- text assembly (no model) --------------------------------------------------------------


def test_utf8_split_across_pieces_is_reassembled() -> None:
    data = "héllo 日本 🐉!".encode()
    text = TextAssembler([])
    out = [text.push(data[i : i + 1]) for i in range(len(data))] + [text.finish()]
    assert "".join(out) == "héllo 日本 🐉!"
    assert "\ufffd" not in "".join(out)


def test_stop_string_prefix_is_held_back_and_never_leaks() -> None:
    text = TextAssembler(["STOP"])
    assert text.push(b"abc S") == "abc "  # "S" could start STOP
    assert text.push(b"T") == ""
    assert text.push(b"x") == "STx"  # it was not STOP after all
    assert text.push(b" ST") == " "
    assert text.push(b"OP and more") == ""
    assert text.stopped and text.finish() == ""


def test_held_text_is_released_at_the_end() -> None:
    text = TextAssembler(["\n\n"])
    assert text.push(b"one\n") == "one"
    assert text.finish() == "\n"


def test_sampling_params_are_checked() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="unknown sampling option"):
        GREEDY.with_options(temprature=1)
    assert SamplingParams(stop="x").stop == ("x",)


# ---- generation ----------------------------------------------------------------------------


def test_greedy_is_deterministic(model: inference.Model) -> None:
    first = model.chat(STORY, params=GREEDY)
    model.clear_cache()
    second = model.chat(STORY, params=GREEDY)
    third = model.chat(STORY, params=GREEDY)  # this one reuses the cached prompt
    assert first.text and first.text == second.text == third.text
    assert third.cached_tokens == third.prompt_tokens - 1 and third.prompt_eval_tokens == 1


def test_seeded_sampling_is_reproducible(model: inference.Model) -> None:
    a = model.complete("My favourite animal is", temperature=1.0, seed=7, max_tokens=12)
    b = model.complete("My favourite animal is", temperature=1.0, seed=7, max_tokens=12)
    assert a.text == b.text


def test_streamed_pieces_join_to_the_text(model: inference.Model) -> None:
    whole = model.chat(STORY, params=GREEDY)
    stream = model.chat(STORY, params=GREEDY, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text == stream.result.text
    assert stream.result.completion_tokens == whole.completion_tokens


def test_max_tokens_ends_with_length(model: inference.Model) -> None:
    result = model.chat(STORY, params=GREEDY.with_options(max_tokens=5))
    assert result.finish_reason == "length" and result.completion_tokens == 5
    timings = result.timings
    assert 0 < timings.time_to_first_token_s <= timings.total_s
    assert timings.generation_tokens_per_s > 0 and timings.prompt_eval_s > 0


def test_end_of_generation_ends_with_stop(model: inference.Model) -> None:
    result = model.chat([{"role": "user", "content": "Hi!"}], params=GREEDY.with_options(max_tokens=48))
    assert result.finish_reason == "stop" and result.completion_tokens < 48
    assert "<|im_end|>" not in result.text


def test_stop_strings_cut_the_text_and_do_not_leak(model: inference.Model) -> None:
    full = model.chat(STORY, params=GREEDY.with_options(max_tokens=24)).text
    words = full.split()
    stop = f"{words[3]} {words[4]}"  # spans several tokens
    assert stop in full
    stream = model.chat(STORY, params=GREEDY.with_options(max_tokens=24, stop=[stop, "never-there"]), stream=True)
    pieces = list(stream)
    assert stream.result.finish_reason == "stop"
    assert "".join(pieces) == stream.result.text == full[: full.index(stop)]
    assert all(stop not in piece for piece in pieces)


def test_non_ascii_round_trips_through_the_token_pieces(model: inference.Model) -> None:
    text = "Drachen über 日本の山 🐉 café"
    assembler = TextAssembler([])
    pieces = [assembler.push(model.token_bytes(t)) for t in model.tokenize(text, add_special=False)]
    assert "".join(pieces) + assembler.finish() == text

    def whole_utf8(data: bytes) -> bool:
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole_utf8(model.token_bytes(t)) for t in model.tokenize(text, add_special=False))


# ---- chat templates ------------------------------------------------------------------------


def test_chat_template_renders_chatml(model: inference.Model) -> None:
    assert model.has_chat_template and model.template_warning is None
    prompt = model.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tokens = model.tokenize(prompt)
    assert tokens.count(model.tokenize("<|im_start|>", add_special=False)[0]) == 3  # parsed as control tokens


def test_render_chat_sandbox_and_errors() -> None:
    text = inference.render_chat(inference.FALLBACK_TEMPLATE, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    refusing = "{{ raise_exception('no system messages') }}"
    with pytest.raises(inference.TemplateError, match="no system messages"):
        inference.render_chat(refusing, [{"role": "user", "content": "Hi"}])
    with pytest.raises(inference.TemplateError):  # the sandbox refuses attribute tricks
        inference.render_chat(
            "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [{"role": "user", "content": "x"}]
        )
    with pytest.raises(inference.TemplateError, match="content"):
        inference.render_chat(inference.FALLBACK_TEMPLATE, [{"role": "user"}])


def test_a_model_without_template_falls_back_with_a_warning(no_template_gguf: Path) -> None:
    with inference.load(no_template_gguf, n_ctx=512, n_threads=1) as bare:
        assert not bare.has_chat_template
        assert "no chat template" in bare.template_warning
        assert bare.render_chat([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
        result = bare.chat([{"role": "user", "content": "Hi"}], params=GREEDY.with_options(max_tokens=8))
        assert result.completion_tokens > 0 and "<|im_" not in result.text
        stream = bare.complete("Once upon a time", stream=True, params=GREEDY)
        next(stream)
    with pytest.raises(inference.EngineError, match="closed"):  # the model went away under the stream
        next(stream)
    run = slim_run(str(no_template_gguf), "Hi", "--temperature", "0", "-n", "4", "--threads", "1")
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("warning:") and "no chat template" in run.stderr


# ---- multi-turn and the KV cache ----------------------------------------------------------


def test_second_turn_evaluates_only_what_it_adds(model: inference.Model) -> None:
    model.clear_cache()
    chat = model.session(system="You are a helpful assistant.", params=GREEDY)
    first = chat.send("What is the capital of France?")
    assert first.cached_tokens == 0 and first.prompt_eval_tokens == first.prompt_tokens
    second = chat.send("And of Italy?")
    # The cache holds turn 1's prompt and reply (the last sampled token is only decoded when
    # generation goes on: it is not when max_tokens ended the reply).
    in_cache = first.prompt_tokens + first.completion_tokens - (first.finish_reason == "length")
    assert second.cached_tokens == in_cache
    assert second.prompt_eval_tokens == second.prompt_tokens - in_cache
    assert second.prompt_eval_tokens < 20 < second.prompt_tokens
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first.text and chat.last_result is second

    history = chat.messages[:-1]
    model.clear_cache()
    fresh = model.chat(history, params=GREEDY)
    assert fresh.cached_tokens == 0
    assert fresh.text == second.text


def test_context_error_names_the_numbers(model: inference.Model) -> None:
    prompt = "alpha beta gamma delta " * 100
    n_prompt = len(model.tokenize(prompt))
    with pytest.raises(ContextError) as caught:
        model.complete(prompt, max_tokens=800)
    message = str(caught.value)
    assert f"{n_prompt} tokens" in message and "800" in message and str(model.n_ctx) in message
    assert (caught.value.prompt_tokens, caught.value.max_tokens, caught.value.n_ctx) == (n_prompt, 800, 1024)
    assert isinstance(caught.value, ValueError)


def test_drop_oldest_policy(smollm2_gguf: Path) -> None:
    with inference.load(smollm2_gguf, n_ctx=256, n_threads=1) as small:
        filler = "Tell me something about the sea, the sky, the mountains and the rivers of the world. "
        strict = small.session(system="Be brief.", params=GREEDY.with_options(max_tokens=8))
        kept = []
        with pytest.raises(ContextError, match="context of 256 tokens"):
            for _ in range(8):
                strict.send(filler * 2)
                kept = list(strict.messages)
        assert strict.messages == kept  # the failed turn left no trace

        chat = small.session(system="Be brief.", context_policy="drop-oldest", params=GREEDY.with_options(max_tokens=8))
        dropped = 0
        for i in range(5):
            result = chat.send(f"{i}: " + filler * 2)
            dropped += result.dropped_messages
            assert result.prompt_tokens + 8 <= 256
        assert dropped > 0
        assert chat.messages[0] == {"role": "system", "content": "Be brief."}
        assert chat.messages[-2]["content"].startswith("4: ")
        assert len(chat.messages) < 1 + 2 * 5
        with pytest.raises(ContextError, match="even with every earlier message dropped"):
            chat.send(filler * 20)
        assert chat.messages[-2]["content"].startswith("4: ")  # a failed send drops nothing
        with pytest.raises(ValueError, match="context_policy"):
            small.session(context_policy="truncate")


# ---- interruption ---------------------------------------------------------------------------


def test_interrupt_from_the_consumer_keeps_the_session_usable(model: inference.Model) -> None:
    chat = model.session(params=GREEDY.with_options(max_tokens=24))
    stream = chat.send("Write a poem about the moon.", stream=True)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for piece in stream:
            seen.append(piece)
            if len(seen) == 3:
                raise KeyboardInterrupt
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(seen)}  # the partial reply is kept
    assert model.cached_positions(chat.slot) == len(chat.slot.tokens)

    after = chat.send("Thanks!", max_tokens=8)
    assert after.cached_tokens > 0 and after.completion_tokens > 0
    history = chat.messages[:-1]
    model.clear_cache()
    assert model.chat(history, params=GREEDY.with_options(max_tokens=8)).text == after.text


def test_abandoned_stream_is_settled_by_the_next_turn(model: inference.Model) -> None:
    chat = model.session(params=GREEDY)
    stream = chat.send("Count to ten.", stream=True)
    first = next(stream)
    second_turn = chat.send("Now count backwards.", max_tokens=4)  # the first stream is left hanging
    assert chat.messages[1] == {"role": "assistant", "content": first}
    assert 0 < second_turn.completion_tokens <= 4
    with pytest.raises(RuntimeError, match="superseded"):
        next(stream)
    assert len(chat.messages) == 4


class _InterruptingDecode:
    """Model.decode, except that one call is followed by a Ctrl-C: Python raises
    KeyboardInterrupt right after llama_decode returns, before the engine records it."""

    def __init__(self, real: Callable[[object], None], at_call: int) -> None:
        self._real, self._at, self.calls = real, at_call, 0

    def __call__(self, batch: object) -> None:
        self._real(batch)
        self.calls += 1
        if self.calls == self._at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("at_call", [1, 4])  # during the prompt, during generation
def test_interrupt_inside_llama_decode_keeps_the_cache_consistent(
    model: inference.Model, at_call: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.clear_cache()
    chat = model.session(params=GREEDY)
    chat.send("Hello there!", max_tokens=4)
    monkeypatch.setattr(model, "decode", _InterruptingDecode(model.decode, at_call))
    with pytest.raises(KeyboardInterrupt):
        chat.send("Tell me about whales.")
    monkeypatch.undo()
    slot = chat.slot
    assert model.cached_positions(slot) == len(slot.tokens)  # nothing unrecorded stays cached
    if at_call == 1:
        assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # the empty turn is undone
    else:
        assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"]
    again = chat.send("Tell me about dolphins.", max_tokens=8)
    history = chat.messages[:-1]
    model.clear_cache()
    assert model.chat(history, params=GREEDY.with_options(max_tokens=8)).text == again.text


def test_sessions_on_separate_sequences_keep_their_own_cache(smollm2_gguf: Path, model: inference.Model) -> None:
    with inference.load(smollm2_gguf, n_ctx=1024, n_threads=1, n_seq_max=2) as two:
        assert two.n_ctx == 512  # the context is shared out between the sequences
        a, b = (
            two.session(params=GREEDY.with_options(max_tokens=6)),
            two.session(params=GREEDY.with_options(max_tokens=6)),
        )
        assert a.slot.seq_id != b.slot.seq_id
        a1, b1 = a.send("Hi!"), b.send("What is 2+2?")
        a2, b2 = a.send("How are you?"), b.send("And 3+3?")
        assert a2.cached_tokens >= a1.prompt_tokens and b2.cached_tokens >= b1.prompt_tokens
    model.clear_cache()
    alone = model.session(params=GREEDY.with_options(max_tokens=6))
    assert [alone.send("Hi!").text, alone.send("How are you?").text] == [a1.text, a2.text]


# ---- slim run ------------------------------------------------------------------------------


def test_slim_run_streams_a_reply(smollm2_gguf: Path, model: inference.Model) -> None:
    run = slim_run(
        str(smollm2_gguf), "Write a long story about a dragon.", "--temperature", "0", "-n", "16", "--threads", "1"
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    model.clear_cache()
    assert run.stdout == model.chat(STORY, params=GREEDY).text + "\n"


def test_slim_run_json_stdin_raw_and_stop(smollm2_gguf: Path) -> None:
    run = slim_run(
        str(smollm2_gguf),
        "-",
        "--raw",
        "--temperature",
        "0",
        "-n",
        "12",
        "--stop",
        ",",
        "--threads",
        "1",
        "--json",
        stdin="The capital of France is Paris, and the capital of Italy is",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["model"] == str(smollm2_gguf)
    assert result["completion_tokens"] <= 12 and result["prompt_tokens"] > 5
    assert "," not in result["text"]
    assert set(result["timings"]) >= {"prompt_eval_s", "time_to_first_token_s", "generation_tokens_per_s"}


def test_slim_run_ctrl_c_exits_130(smollm2_gguf: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slim.runtime.cli",
            "run",
            str(smollm2_gguf),
            "Write a long story about a dragon.",
            "-n",
            "400",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.read(10)  # it is generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: interrupted\n"


def _one_error_line(run: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert run.returncode == code, (run.returncode, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def test_slim_run_refuses_damaged_files(smollm2_gguf: Path, tmp_path: Path) -> None:
    data = smollm2_gguf.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) // 2], "truncated"),
        "short-header.gguf": (data[:4096], "truncated"),
        "wrong-magic.gguf": (b"GGML" + data[4 : 1 << 20], "not a GGUF"),
        "random.gguf": (os.urandom(1 << 16), "not a GGUF"),
        "random-after-magic.gguf": (b"GGUF" + os.urandom(1 << 16), "GGUF"),
        "empty.gguf": (b"", "not a GGUF"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        line = _one_error_line(slim_run(str(tmp_path / name), "hi"))
        assert expected in line, line
    assert "does not exist" in _one_error_line(slim_run(str(tmp_path / "missing.gguf"), "hi"))
    assert "directory" in _one_error_line(slim_run(str(tmp_path), "hi"))
    assert "no model named 'smollm2'" in _one_error_line(slim_run("smollm2", "hi"))


def _tiny_gguf(path: Path, tokens: list[str]) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_token_list(tokens)
    writer.add_tensor("t.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_check_gguf_reads_metadata_and_catches_what_would_abort_llama_cpp(tmp_path: Path) -> None:
    good = _tiny_gguf(tmp_path / "good.gguf", ["a", "b", "c"])
    metadata = check_gguf(good)
    assert metadata["general.architecture"] == "llama" and metadata["llama.context_length"] == 64
    with pytest.raises(inference.GGUFError, match="same token twice"):  # llama.cpp: GGML_ASSERT, abort
        check_gguf(_tiny_gguf(tmp_path / "dup.gguf", ["a", "b", "a"]))
    data = good.read_bytes()
    for cut in (len(data) - 1, len(data) - 4 * 32 * 4, 40, 30, 23):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(inference.GGUFError, match="truncated"):
            check_gguf(tmp_path / "cut.gguf")


def test_slim_run_prompt_too_long(smollm2_gguf: Path) -> None:
    line = _one_error_line(slim_run(str(smollm2_gguf), "word " * 400, "--ctx", "256", "-n", "100"))
    assert "the prompt is" in line and "100" in line and "context of 256 tokens" in line


def test_slim_run_bad_options(smollm2_gguf: Path) -> None:
    assert "--raw" in _one_error_line(slim_run(str(smollm2_gguf), "hi", "--raw", "--system", "x"))
    assert "empty" in _one_error_line(slim_run(str(smollm2_gguf), "-", stdin=""))
    assert slim_run(str(smollm2_gguf), "hi", "--temperature", "-1").returncode == 2
