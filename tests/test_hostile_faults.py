"""Faults while writing: a convert, export or `eval --save-logits` killed with SIGKILL mid-write leaves
nothing at the destination, and a rerun succeeds and removes the temporary the killed run left; a full
disk (here a file-size limit, which fails writes as a full disk does) gives one line and no partial file.
(A pull killed mid-download is in test_pull.py: its bytes are kept, for the next pull to resume.)"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from slim.runtime.formats.gguf_file import check_gguf


def slim(*args: str, file_size_limit: int | None = None) -> subprocess.Popen[str]:
    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [sys.executable, "-m", "slim.runtime.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def kill_mid_write(process: subprocess.Popen[str], folder: Path, pattern: str, at_least: int = 1 << 20) -> None:
    """SIGKILL `process` once its temporary output under `folder` holds `at_least` bytes (a megabyte)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        written = sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())
        if written >= at_least and list(folder.glob(pattern)):
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05 if at_least else 0.001)
    raise AssertionError("the output never started")


def left_behind(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern))


def finished(process: subprocess.Popen[str]) -> None:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


def one_line(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left"), err
    return lines[0]


def test_killed_and_starved_writes_leave_nothing(smollm2_gguf: Path, tmp_path: Path) -> None:
    exported, converted = tmp_path / "exported", tmp_path / "model.gguf"
    export = ("export", str(smollm2_gguf), "-o", str(exported), "--dtype", "BF16")
    kill_mid_write(slim(*export), tmp_path, ".exported.*.partial/*")
    assert not exported.exists() and left_behind(tmp_path, ".exported.*.partial")
    finished(slim(*export))
    assert not left_behind(tmp_path, ".exported.*.partial")
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()

    convert = ("convert", str(exported), "-o", str(converted), "--type", "Q8_0", "-q")
    kill_mid_write(slim(*convert), tmp_path, ".model.gguf.*.partial")
    assert not converted.exists() and left_behind(tmp_path, ".model.gguf.*.partial")
    finished(slim(*convert))
    check_gguf(converted)
    assert not left_behind(tmp_path, ".model.gguf.*.partial")

    full = tmp_path / "full"
    full.mkdir()
    one_line(slim("convert", str(exported), "-o", str(full / "model.gguf"), "--type", "Q8_0", file_size_limit=8 << 20))
    one_line(slim("export", str(converted), "-o", str(full / "exported"), file_size_limit=8 << 20))
    assert os.listdir(full) == []


def test_killed_and_starved_logits_leave_nothing(smollm2_gguf: Path, heldout_text: str, tmp_path: Path) -> None:
    """The saved logits (tens of MB, written at the end) are killed while their temporary exists."""
    text, logits = tmp_path / "text.txt", tmp_path / "reference.npz"
    text.write_text(heldout_text[:4_000], encoding="utf-8")
    evaluate = ("eval", str(smollm2_gguf), "--text", str(text), "--reference", str(smollm2_gguf), "-c", "256", "-q")
    kill_mid_write(slim(*evaluate, "--save-logits", str(logits)), tmp_path, ".reference.npz.*.partial", at_least=0)
    assert not logits.exists() and left_behind(tmp_path, ".reference.npz.*.partial")
    finished(slim(*evaluate, "--save-logits", str(logits)))
    assert logits.is_file() and not left_behind(tmp_path, ".reference.npz.*.partial")

    full = tmp_path / "full"
    full.mkdir()
    one_line(slim(*evaluate, "--save-logits", str(full / "reference.npz"), file_size_limit=1 << 20))
    assert os.listdir(full) == []
