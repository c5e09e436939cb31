"""slim eval against llama.cpp's own llama-perplexity, and KL divergence that orders quantizations."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import run_slim

from slim.runtime.inference.evaluate import evaluate


@pytest.fixture(scope="module")
def text_file(heldout_text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "wiki.txt"
    path.write_text(heldout_text[:12000], encoding="utf-8")
    return path


def slim_eval(*args: str) -> subprocess.CompletedProcess[str]:
    return run_slim("eval", *args)


def test_perplexity_equals_llama_perplexity(
    smollm2_gguf: Path, text_file: Path, llama_tool: Callable[[str], Path]
) -> None:
    """llama-perplexity is built once (cached under SLIM_HOME) from the sources llama-cpp-python vendors."""
    binary = llama_tool("llama-perplexity")
    run = subprocess.run(
        [str(binary), "-m", str(smollm2_gguf), "-f", str(text_file), "-c", "256", "-t", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = float(re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", run.stderr + run.stdout).group(1))
    report, _ = evaluate(smollm2_gguf, text_file.read_text(), n_ctx=256, n_threads=2)
    assert abs(report.perplexity - theirs) / theirs < 1e-3, (report.perplexity, theirs)


def test_divergence_orders_quantizations(
    smollm2_converted: Callable[[str], Path], text_file: Path, tmp_path: Path
) -> None:
    f16, q8_0, q4_0 = (smollm2_converted(type_name) for type_name in ("F16", "Q8_0", "Q4_0"))
    result = slim_eval(
        str(q8_0),
        str(q4_0),
        "--text",
        str(text_file),
        "--ctx",
        "256",
        "--reference",
        str(f16),
        "--save-logits",
        str(tmp_path / "f16.npz"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    q8, q4 = json.loads(result.stdout)
    assert 0 < q8["divergence"]["kl_mean"] < q4["divergence"]["kl_mean"]
    assert q8["divergence"]["top1_agreement"] > q4["divergence"]["top1_agreement"] > 0.5
    assert q8["perplexity"] > 1 and q8["bits_per_weight"] > q4["bits_per_weight"]

    # The saved reference gives the same numbers without loading the reference model again.
    again = slim_eval(
        str(q4_0), "--text", str(text_file), "--ctx", "256", "--reference-logits", str(tmp_path / "f16.npz"), "--json"
    )
    assert again.returncode == 0, again.stderr
    saved = json.loads(again.stdout)[0]["divergence"]
    assert saved["top1_agreement"] == pytest.approx(q4["divergence"]["top1_agreement"], abs=0.01)
    assert saved["kl_mean"] == pytest.approx(q4["divergence"]["kl_mean"], rel=0.05)  # saved as float16

    table = slim_eval(
        str(q8_0), "--text", str(text_file), "--ctx", "256", "--reference-logits", str(tmp_path / "f16.npz")
    )
    assert "KL mean" in table.stdout and "Q8_0.gguf" in table.stdout


def test_same_model_as_reference_has_zero_divergence(smollm2_gguf: Path, text_file: Path) -> None:
    report, _ = evaluate(smollm2_gguf, text_file.read_text(), n_ctx=128, reference=smollm2_gguf, n_threads=1)
    assert report.divergence is not None
    assert report.divergence.top1_agreement == 1.0 and report.divergence.kl_max < 1e-6


def test_bad_input(smollm2_gguf: Path, text_file: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases = [
        (["--text", str(short)], "shorter than one chunk"),
        (["--text", str(binary)], "not UTF-8"),
        (["--text", str(tmp_path / "missing.txt")], "cannot read"),
        (["--text", str(text_file), "--ctx", "255"], "even number"),
        (["--text", str(text_file), "--save-logits", str(tmp_path / "x.npz")], "needs --reference"),
    ]
    for args, words in cases:
        result = slim_eval(str(smollm2_gguf), *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and words in lines[-1], (args, result.stderr)
