"""A short run of benchmarks/fuzz_files.py (its full run is 100,000 inputs per reader): forged GGUF and
safetensors files get a result or the reader's own one-line error, never another exception or a hang."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers import benchmark_module

EXAMPLES = 300


@pytest.mark.parametrize("target", ["gguf", "safetensors"])
def test_fuzzed_files_get_a_result_or_one_line(target: str, tmp_path: Path) -> None:
    fuzz = getattr(benchmark_module("fuzz_files"), f"fuzz_{target}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tally = fuzz(EXAMPLES, tmp_path)
    assert tally.accepted + tally.refused == EXAMPLES and tally.refused > 0
