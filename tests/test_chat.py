"""slim chat, driven as a person would: through a pseudo-terminal, and through a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

SLIM = [sys.executable, "-m", "slim.runtime.cli"]


def test_terminal_session(smollm2_gguf: Path, tmp_path: Path) -> None:
    """Two turns where the second needs the first, Ctrl-C during a reply, /save, then /bye."""
    child = pexpect.spawn(
        SLIM[0],
        SLIM[1:] + ["chat", str(smollm2_gguf), "--temperature", "0", "--threads", "1"],
        encoding="utf-8",
        timeout=60,
        env={**os.environ, "TERM": "dumb"},
    )
    child.expect("/help for commands")
    child.expect(">>> ")
    child.sendline("My name is Zanzibar. Please remember my name.")
    child.expect(">>> ")
    child.sendline("What is my name?")
    child.expect(">>> ")
    assert "Zanzibar" in child.before.split("What is my name?", 1)[1]
    child.sendline("Write a very long story about a dragon who learns to bake bread, in twenty chapters.")
    child.expect_exact("twenty chapters.\r\n")  # the echo of the line typed
    child.expect(r"\w+ \w+ \w+ \w+")  # the reply is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'chat.json'}")
    child.expect("saved 6 messages")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "chat.json").read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["user", "assistant"] * 3  # the stopped reply is kept, as far as it got
    assert saved["messages"][5]["content"]


def run_pipe(model: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        SLIM + ["chat", str(model), "--temperature", "0", "--threads", "1", *extra],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pipe_answers_each_line(smollm2_gguf: Path, tmp_path: Path) -> None:
    conversation = tmp_path / "c.json"
    result = run_pipe(
        smollm2_gguf,
        ["What is the capital of France?", f"/save {conversation}", "/bye"],
        "--max-tokens",
        "24",
        "--system",
        "You are a helpful AI assistant.",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and ">>>" not in result.stdout
    messages = json.loads(conversation.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "You are a helpful AI assistant."} and len(messages) == 3

    # /load brings the conversation back: the follow-up can refer to it.
    follow = run_pipe(
        smollm2_gguf, [f"/load {conversation}", "Which country is that city the capital of?"], "--max-tokens", "24"
    )
    assert follow.returncode == 0 and "France" in follow.stdout
    assert "loaded 3 messages" in follow.stderr


def test_commands_and_bad_input(smollm2_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.json").write_text("{not json")
    result = run_pipe(
        smollm2_gguf,
        [
            "/help",
            "/frobnicate",
            f"/load {tmp_path / 'junk.json'}",
            "/save",
            "/system You are a pirate.",
            "/system",
            "/reset",
        ],
    )
    assert result.returncode == 0 and result.stdout.count("/reset") == 1  # /help printed once
    for note in (
        "unknown command /frobnicate",
        "is not a conversation saved by /save",
        "/save needs a file name",
        "system message set",
        "You are a pirate.",
        "conversation cleared",
    ):
        assert note in result.stderr, note


def test_overflow_policies(smollm2_gguf: Path) -> None:
    long_line = "Tell me about the history of bread. " * 20
    dropped = run_pipe(smollm2_gguf, [long_line, long_line, long_line], "--ctx", "256", "--max-tokens", "16")
    assert dropped.returncode == 0 and "oldest messages to fit the 256-token context" in dropped.stderr
    stopped = run_pipe(
        smollm2_gguf, [long_line, long_line, long_line], "--ctx", "256", "--max-tokens", "16", "--on-overflow", "stop"
    )
    assert stopped.returncode == 0 and "context" in stopped.stderr and "/reset" in stopped.stderr


def test_missing_model(tmp_path: Path) -> None:
    result = run_pipe(tmp_path / "nope.gguf", ["hi"])
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "does not exist" in result.stderr
