"""The KV cache's types (--cache-type-k / --cache-type-v, --flash-attn): llama.cpp keeps the cache in
them, in exactly the bytes the memory estimate counts; the server's pool loads and estimates with
them; caches llama.cpp cannot make are refused with one line before it asserts."""

from __future__ import annotations

from pathlib import Path

import gguf
import httpx
import openai
import pytest
from helpers import run_slim

from slim.runtime import inference, serve
from slim.runtime.formats.gguf_file import check_gguf
from slim.runtime.inference import KV_CACHE_TYPES, check_cache_types, kv_cache_bytes


def test_type_ids_are_ggmls() -> None:
    assert KV_CACHE_TYPES == {name: int(gguf.GGMLQuantizationType[name.upper()]) for name in KV_CACHE_TYPES}


def test_the_cache_holds_the_bytes_the_estimate_counts(smollm2_gguf: Path) -> None:
    """llama.cpp's saved state of a sequence: the same header, then each cell in the cache's types."""
    states, per_cell, replies = {}, {}, {}
    for cache in ("f16", "q8_0", "q4_0"):
        with inference.load(
            smollm2_gguf, n_ctx=256, n_threads=1, cache_type_k=cache, cache_type_v=cache, flash_attn=True
        ) as model:
            replies[cache] = model.complete("Once upon a time", temperature=0, max_tokens=8).text
            held = len(model.slots[0].tokens)
            states[cache] = model.state_bytes(model.slots[0])
            per_cell[cache] = kv_cache_bytes(model.metadata, 256, cache, cache) // 256
    header = states["f16"] - held * per_cell["f16"]
    assert 0 < header < 4096
    assert states == {cache: header + held * per_cell[cache] for cache in states}
    assert per_cell["q8_0"] * 64 == per_cell["f16"] * 34 and per_cell["q4_0"] * 64 == per_cell["f16"] * 18
    assert all(replies.values())


def test_a_cache_llama_cpp_cannot_make_is_refused_in_one_line(smollm2_gguf: Path) -> None:
    metadata = check_gguf(smollm2_gguf)
    with pytest.raises(ValueError, match="read only by flash attention"):
        check_cache_types(metadata, "f16", "q8_0", flash_attn=False)
    with pytest.raises(ValueError, match="packs 32 values per block, and this model's heads have 48"):
        check_cache_types({**metadata, "llama.attention.key_length": 48}, "q4_0", "f16", flash_attn=None)
    result = run_slim("run", str(smollm2_gguf), "Hi", "--cache-type-v", "q4_0", "--flash-attn", "off")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: a q4_0 V cache is read only by flash attention: turn flash attention on or auto"
    ]
    result = run_slim("serve", str(smollm2_gguf), "--cache-type-v", "q8_0", "--flash-attn", "off")
    assert result.returncode == 2 and "read only by flash attention" in result.stderr
    assert run_slim("run", str(smollm2_gguf), "Hi", "--cache-type-k", "q3_k").returncode == 2  # not a choice


def test_the_server_loads_and_estimates_with_its_cache_types(smollm2_gguf: Path) -> None:
    memory = {}
    for cache in ("f16", "q8_0"):
        pool = serve.ModelPool(
            [serve.ModelSpec(["smollm2-135m"], smollm2_gguf)],
            parallel=2,
            ctx=512,
            n_threads=1,
            cache_type_k=cache,
            cache_type_v=cache,
        )
        server = serve.Server(pool)
        host, port = server.start("127.0.0.1", 0)
        try:
            client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
            )
            assert reply.choices[0].message.content
            (running,) = httpx.get(f"http://{host}:{port}/api/ps").json()["models"]
            memory[cache] = running["size"]
        finally:
            server.shutdown()
    metadata = check_gguf(smollm2_gguf)
    saved = kv_cache_bytes(metadata, 2 * 512, "f16", "f16") - kv_cache_bytes(metadata, 2 * 512, "q8_0", "q8_0")
    assert memory["f16"] - memory["q8_0"] == saved > 0
