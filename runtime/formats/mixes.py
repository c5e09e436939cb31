"""Which GGUF type each tensor gets, for each `--type`: llama.cpp's rules, restated.

Float types follow convert_hf_to_gguf.py (norms and 1-D tensors stay F32). Quantized types follow
llama-quantize (src/llama-quant.cpp, llama_tensor_get_type) run on a lossless GGUF: the mix picks a
base type and bumps a few sensitive tensors (output, attn_v, ffn_down) to more bits, then a tensor
whose row length does not fit the chosen block size falls back to a 32-weight type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gguf import LlamaFileType

from slim.kernels import QTYPES


@dataclass(frozen=True)
class Mix:
    name: str
    ftype: LlamaFileType  # llama.cpp's LLAMA_FTYPE, written as general.file_type
    base: str  # the GGML type most weights get


MIXES: dict[str, Mix] = {
    mix.name: mix
    for mix in (
        Mix("F32", LlamaFileType.ALL_F32, "F32"),
        Mix("F16", LlamaFileType.MOSTLY_F16, "F16"),
        Mix("BF16", LlamaFileType.MOSTLY_BF16, "BF16"),
        Mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
        Mix("Q4_0", LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
        Mix("Q4_1", LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
        Mix("Q5_0", LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
        Mix("Q5_1", LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
        Mix("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, "Q4_K"),
        Mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, "Q4_K"),
        Mix("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, "Q5_K"),
        Mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, "Q5_K"),
        Mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
    )
}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize reads them
FLOAT_MIXES = ("F32", "F16", "BF16")

# A tensor that does not fit a 256-weight block falls back to this 32-weight type.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def mix(name: str) -> Mix:
    """The mix for a --type name (case-insensitive): the one place a name is parsed, at the edge
    (the CLI, a benchmark's arguments); everything below takes the Mix. ValueError lists the choices."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in MIXES:
        raise ValueError(f"unknown --type {name!r}; choose one of {', '.join(type_names())}")
    return MIXES[key]


def type_names() -> list[str]:
    return list(MIXES) + list(ALIASES)


def stays_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms, biases and every 1-D tensor are kept in F32 by both of llama.cpp's tools."""
    return len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quantize's pick of layers that get more bits: the first and last eighth, and every
    third layer between them."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


@dataclass(frozen=True)
class TypePlan:
    """A mix resolved for one model: the GGUF type name of every tensor, in llama.cpp's tensor order.
    Made once and handed on, so every step that needs the types (QAT's grids, convert) uses the same."""

    mix: Mix
    types: dict[str, str]


def plan(shapes: Mapping[str, tuple[int, ...]], chosen: Mix, n_layer: int, has_imatrix: bool = False) -> TypePlan:
    """The GGUF type of each tensor (GGUF name -> numpy shape) under the mix, as llama-quantize picks it.
    has_imatrix: quantizing with an importance matrix, which changes one rule (Q4_0/Q5_0)."""
    names = llama_order(list(shapes))
    tied = "output.weight" not in shapes
    n_attn_v = sum(name.endswith("attn_v.weight") for name in names)
    i_attn_v = i_ffn_down = 0
    types: dict[str, str] = {}
    for name in names:
        shape = shapes[name]
        if stays_f32(name, shape):
            types[name] = "F32"
            continue
        if chosen.name in FLOAT_MIXES:
            types[name] = chosen.base
            continue
        qtype = chosen.base
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            # the output projection is the most sensitive tensor: Q6_K, or Q8_0 when 256 does not fit
            if shape[-1] % QTYPES[qtype].block_size:
                qtype = "Q8_0"
            elif qtype != "Q8_0":
                qtype = "Q6_K"
        elif name.endswith("attn_v.weight"):
            if chosen.name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attn_v, n_attn_v):
                qtype = "Q6_K"
            elif chosen.name == "Q4_K_S" and i_attn_v < 4:
                qtype = "Q5_K"
            i_attn_v += 1
        elif name.endswith("ffn_down.weight"):
            if chosen.name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_ffn_down, n_layer):
                qtype = "Q6_K"
            elif chosen.name == "Q4_K_S" and i_ffn_down < n_layer // 8:
                qtype = "Q5_K"
            elif chosen.name in ("Q4_0", "Q5_0") and has_imatrix and i_ffn_down < n_layer // 8:
                # llama-quantize guards the first ffn_down layers, which an imatrix can make go wild
                qtype = "Q4_1" if chosen.name == "Q4_0" else "Q5_1"
            i_ffn_down += 1
        types[name] = fit_row_length(qtype, shape[-1])
    return TypePlan(chosen, types)


def fit_row_length(qtype: str, n_per_row: int) -> str:
    """llama-quantize's fallback for a row length the block size does not divide."""
    if n_per_row % QTYPES[qtype].block_size == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if n_per_row % QTYPES[qtype].block_size == 0 else "F16"


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's tensor order (llama_model_loader's weight_name_comparer): non-layer tensors
    first, then by layer number, by name within a layer. llama-quantize writes in this order and
    counts attn_v/ffn_down layers in it."""

    def key(name: str) -> tuple[int, str]:
        match = _LAYER.match(name)
        return (int(match.group(1)) if match else -1, name)

    return sorted(names, key=key)
