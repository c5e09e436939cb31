"""The model store and the commands that read it: slim list, show, rm; corrupt files are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import run_slim


@pytest.fixture()
def home(tmp_path: Path, smollm2_gguf: Path) -> Path:
    """A fresh SLIM_HOME whose asset cache already holds the default model (sha256 is rechecked)."""
    (tmp_path / "assets").mkdir()
    os.link(smollm2_gguf, tmp_path / "assets" / smollm2_gguf.name)
    return tmp_path


def slim(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_slim(*args, env={"SLIM_HOME": str(home)})


def test_show_describes_the_default_model(home: Path) -> None:
    result = slim(home, "show", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama" and info["context_length"] == 8192
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert 134e6 < info["parameters"] < 135e6 and info["license"] == "apache-2.0"
    assert "<|im_start|>" in info["chat_template"]
    text = slim(home, "show", "smollm2-135m").stdout
    assert "architecture    Llama (llama)" in text and "210 Q4_1" in text


def test_list_and_rm(home: Path, tmp_path: Path) -> None:
    listing = json.loads(slim(home, "list", "--json").stdout)
    assert listing["models"] == [] and listing["catalog"][0]["name"] == "smollm2-135m"
    assert slim(home, "show", "smollm2-135m").returncode == 0  # first use registers it
    listing = json.loads(slim(home, "list", "--json").stdout)
    assert [m["name"] for m in listing["models"]] == ["smollm2-135m"] and listing["catalog"] == []
    assert "smollm2-135m" in slim(home, "list").stdout
    removed = slim(home, "rm", "smollm2-135m")
    assert removed.returncode == 0 and json.loads(slim(home, "list", "--json").stdout)["models"] == []


def test_unknown_name(home: Path) -> None:
    for command in (["show", "no-such-model"], ["rm", "no-such-model"]):
        result = slim(home, *command)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "no-such-model" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "magic", "random"])
def test_corrupt_gguf_is_refused(home: Path, smollm2_gguf: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        with open(smollm2_gguf, "rb") as f:
            bad.write_bytes(f.read(5_000_000))
    elif damage == "magic":
        shutil.copy(smollm2_gguf, bad)
        with open(bad, "r+b") as f:
            f.write(b"GGML")
    else:
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    result = slim(home, "show", str(bad))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
