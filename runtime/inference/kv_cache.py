"""The KV cache's element types (llama-server's --cache-type-k / --cache-type-v) and its size.

A quantized cache holds more context in the same memory: q8_0 takes 34 bytes per 32 values where
f16 takes 64, q4_0 18. llama.cpp stores each head's K (and V) row as blocks of the type, so the
head dimension must be a multiple of the block size, and it reads a quantized V only inside flash
attention. Both are checked here, before llama.cpp (which asserts, taking the process down, where
this refuses with one line).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slim.runtime.formats.gguf_file import tensor_type_size

__all__ = ["KV_CACHE_TYPES", "check_cache_types", "kv_cache_bytes", "kv_head_dims"]

#: The types llama.cpp's CPU backend keeps a cache in, as llama-server names them, with their ggml
#: type ids (literals, as in check_gguf: the engine does not import gguf-py; a test holds them equal).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20}


def kv_head_dims(metadata: Mapping[str, Any]) -> tuple[int, int]:
    """The K and V dimensions of one attention head, from a GGUF's metadata."""
    arch = metadata.get("general.architecture", "")
    n_embd = int(metadata.get(f"{arch}.embedding_length", 0))
    n_head = int(metadata.get(f"{arch}.attention.head_count", 1) or 1)
    head_k = int(metadata.get(f"{arch}.attention.key_length", n_embd // n_head))
    head_v = int(metadata.get(f"{arch}.attention.value_length", n_embd // n_head))
    return head_k, head_v


def kv_cache_bytes(metadata: Mapping[str, Any], n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """The bytes of a cache of `n_ctx` cells (all sequences) for every layer of this GGUF: llama.cpp
    pads the cells to a multiple of 256 and stores K and V rows of each KV head in their types."""
    arch = metadata.get("general.architecture", "")
    n_layer = int(metadata.get(f"{arch}.block_count", 0))
    n_head = int(metadata.get(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    head_k, head_v = kv_head_dims(metadata)
    cells = -(-n_ctx // 256) * 256
    (k_block, k_bytes), (v_block, v_bytes) = (tensor_type_size(KV_CACHE_TYPES[t]) for t in (type_k, type_v))
    per_cell = n_head_kv * (head_k // k_block * k_bytes + head_v // v_block * v_bytes)
    return n_layer * cells * per_cell


def check_cache_types(
    metadata: Mapping[str, Any], cache_type_k: str, cache_type_v: str, flash_attn: bool | None
) -> None:
    """Raise ValueError (one line that says what to choose) for a cache llama.cpp cannot make; the
    arguments are inference.load's."""
    for which, name in (("K", cache_type_k), ("V", cache_type_v)):
        if name not in KV_CACHE_TYPES:
            raise ValueError(f"unknown {which} cache type {name!r}; choose one of {', '.join(KV_CACHE_TYPES)}")
    head_k, head_v = kv_head_dims(metadata)
    for which, name, dim in (("K", cache_type_k, head_k), ("V", cache_type_v, head_v)):
        block = tensor_type_size(KV_CACHE_TYPES[name])[0]
        if dim % block:
            raise ValueError(
                f"a {name} {which} cache packs {block} values per block, and this model's heads have {dim}; "
                "choose f16, bf16 or f32 for it"
            )
    if flash_attn is False and cache_type_v not in ("f32", "f16", "bf16"):
        raise ValueError(f"a {cache_type_v} V cache is read only by flash attention: turn flash attention on or auto")
