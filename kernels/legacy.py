"""The float types and the 32-weight "legacy" quants: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

The `gguf` package (gguf-py 0.19.0) quantizes BF16 and Q8_0 byte-identically to ggml's reference C
(tests/test_kernels.py proves it against libggml), so those two delegate to it, and every type here
uses its dequantizer. Its Q4_0/Q4_1/Q5_0/Q5_1 quantizers differ from C on blocks holding -0.0 (C
picks the FIRST extreme value and starts its signed max at +0.0; numpy's min/max/argmax do not), and
pruning makes such blocks, so slim quantizes those four itself. The block layouts, for the reader:

  Q8_0  half d; int8 qs[32]                         x = d * q
  Q4_0  half d; uint8 qs[16]                        x = d * (q - 8)      q in 0..15
  Q4_1  half d; half m; uint8 qs[16]                x = d * q + m        q in 0..15
  Q5_0  half d; uint8 qh[4]; uint8 qs[16]           x = d * (q - 16)     q in 0..31
  Q5_1  half d; half m; uint8 qh[4]; uint8 qs[16]   x = d * q + m        q in 0..31

qs holds weight j in the low nibble of byte j and weight j+16 in its high nibble; qh holds the fifth
bit of weight j at bit j (little-endian uint32).
"""

from __future__ import annotations

import numpy as np
from gguf import quants as gguf_quants

from .base import QuantType, half_bytes


class F32(QuantType):
    name, ggml_type, block_size, type_size = "F32", 0, 1, 4

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float32)


class F16(QuantType):
    """IEEE half, round to nearest even (what ggml's F16C conversion does)."""

    name, ggml_type, block_size, type_size = "F16", 1, 1, 2

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.astype(np.float16).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


class _FromGguf(QuantType):
    """A type whose numpy quantizer and dequantizer come from gguf-py."""

    _impl: type

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._impl.quantize_blocks(np.ascontiguousarray(blocks, dtype=np.float32))

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._impl.dequantize_blocks(np.ascontiguousarray(blocks)).astype(np.float32, copy=False)


class BF16(_FromGguf):
    """The top 16 bits of a float32, rounded to nearest even; NaNs stay quiet NaNs."""

    name, ggml_type, block_size, type_size, _impl = "BF16", 30, 1, 2, gguf_quants.BF16


class Q8_0(_FromGguf):
    """d = amax/127, q = roundf(x/d): C roundf, halves away from zero."""

    name, ggml_type, block_size, type_size, _impl = "Q8_0", 8, 32, 34, gguf_quants.Q8_0


class Q4_0(_FromGguf):
    """d = max/-8 from the signed value of largest magnitude; q = min(15, trunc(x/d + 8.5))."""

    name, ggml_type, block_size, type_size, _impl = "Q4_0", 2, 32, 18, gguf_quants.Q4_0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, q = _symmetric(blocks, levels=16)
        return np.concatenate([half_bytes(d), _pack_nibbles(q)], axis=1)


class Q4_1(_FromGguf):
    """d = (max-min)/15, m = min; q = min(15, trunc((x-min)/d + 0.5))."""

    name, ggml_type, block_size, type_size, _impl = "Q4_1", 3, 32, 20, gguf_quants.Q4_1

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, m, q = _affine(blocks, levels=16)
        return np.concatenate([half_bytes(d), half_bytes(m), _pack_nibbles(q)], axis=1)


class Q5_0(_FromGguf):
    """d = max/-16 from the signed value of largest magnitude; q = min(31, trunc(x/d + 16.5))."""

    name, ggml_type, block_size, type_size, _impl = "Q5_0", 6, 32, 22, gguf_quants.Q5_0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, q = _symmetric(blocks, levels=32)
        return np.concatenate([half_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], axis=1)


class Q5_1(_FromGguf):
    """d = (max-min)/31, m = min; q = min(31, trunc((x-min)/d + 0.5))."""

    name, ggml_type, block_size, type_size, _impl = "Q5_1", 7, 32, 24, gguf_quants.Q5_1

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, m, q = _affine(blocks, levels=32)
        return np.concatenate([half_bytes(d), half_bytes(m), _pack_fifth_bits(q), _pack_nibbles(q)], axis=1)


def _first_where(blocks: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """(n, 1): the first value of each block where `hit` holds (C's strict-comparison scans)."""
    return np.take_along_axis(blocks, hit.argmax(axis=1, keepdims=True), axis=1)


def _symmetric(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: the first value of largest magnitude sets d = max / -(levels/2); +0.0 when all
    are zero, as C starts its scan at +0.0. q = trunc(x*id + levels/2 + 0.5) with id from the
    float32 d, clamped to levels-1."""
    x = np.asarray(blocks, dtype=np.float32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    signed_max = np.where(amax == 0, np.float32(0), _first_where(x, np.abs(x) == amax))
    d = signed_max / np.float32(-levels // 2)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(x * inv + np.float32(levels // 2 + 0.5)).astype(np.int32)
    return d, np.minimum(q, levels - 1).astype(np.uint8)


def _affine(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: m = the block's first minimum, d = (max - min)/(levels-1);
    q = trunc((x - min)*id + 0.5), clamped to levels-1."""
    x = np.asarray(blocks, dtype=np.float32)
    low = _first_where(x, x == x.min(axis=1, keepdims=True))
    high = _first_where(x, x == x.max(axis=1, keepdims=True))
    d = (high - low) / np.float32(levels - 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((x - low) * inv + np.float32(0.5)).astype(np.int32)
    return d, low, np.clip(q, 0, levels - 1).astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Weight j in the low nibble of byte j, weight j+16 in its high nibble."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of weight j at bit j of a little-endian uint32."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")
