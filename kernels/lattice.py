"""The lattice i-quants IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M: groups of 8 (or 4)
weights take the nearest point of a fixed lattice ("grid") of sign-free patterns, plus sign bits.

slim quantizes them through llama.cpp's own C quantizer (slim.kernels.ggml; there is no numpy
encoder), and decodes them with gguf-py's numpy port of ggml's dequantizers, which
tests/test_kernels_lattice.py checks against ggml's C dequantizer bit for bit. The 1- and 2-bit
ones (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) and IQ3_XXS need an importance matrix, as llama.cpp
refuses them without one.

Block layouts (256 weights, little-endian, fields in this order; `half` is IEEE float16):

  IQ2_XXS  66 bytes: half d; uint16 qs[32]                  2.0625 bits per weight
  IQ2_XS   74 bytes: half d; uint16 qs[32]; uint8 scales[8]
  IQ2_S    82 bytes: half d; uint8 qs[64]; uint8 qh[8]; uint8 scales[8]
  IQ3_XXS  98 bytes: half d; uint8 qs[96]                   (grid indices, then packed signs + scales)
  IQ3_S   110 bytes: half d; uint8 qs[64]; uint8 qh[8]; uint8 signs[32]; uint8 scales[4]
  IQ1_S    50 bytes: half d; uint8 qs[32]; uint16 qh[8]
  IQ1_M    56 bytes: uint8 qs[32]; uint8 qh[16]; uint8 scales[8]   (the half d is spread over scales' top bits)
"""

from __future__ import annotations

import numpy as np
from gguf import quants as gguf_quants

from ._common import QK_K
from .base import QuantType


class _Lattice(QuantType):
    """A lattice i-quant: encoded by llama.cpp's C quantizer only, decoded by gguf-py."""

    block_size = QK_K
    c_only = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise ValueError(f"{cls.name} is quantized by llama.cpp's C code only; use backend 'auto' or 'ggml'")

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        decoder = getattr(gguf_quants, cls.name)
        decoder.init_grid()  # the lattice table, built once from gguf-py's hex constants
        return decoder.dequantize_blocks(np.ascontiguousarray(blocks)).astype(np.float32, copy=False)


class IQ2_XXS(_Lattice):
    name, ggml_type, type_size = "IQ2_XXS", 16, 66


class IQ2_XS(_Lattice):
    name, ggml_type, type_size = "IQ2_XS", 17, 74


class IQ2_S(_Lattice):
    name, ggml_type, type_size = "IQ2_S", 22, 82


class IQ3_XXS(_Lattice):
    name, ggml_type, type_size = "IQ3_XXS", 18, 98


class IQ3_S(_Lattice):
    name, ggml_type, type_size = "IQ3_S", 21, 110


class IQ1_S(_Lattice):
    name, ggml_type, type_size = "IQ1_S", 19, 50


class IQ1_M(_Lattice):
    name, ggml_type, type_size = "IQ1_M", 29, 56
