"""The ternary types TQ1_0 and TQ2_0 (for BitNet-style models), byte-identical to llama.cpp's.

Every weight becomes -1, 0 or +1 times one half scale per 256 weights, d = max|x|: the trit is
lroundf(x/d) (C's round half away from zero, computed as x * (1/d)), stored as 0, 1, 2. llama.cpp
ignores an importance matrix for both. TQ2_0 spends 2 bits per trit; TQ1_0 packs 5 trits into a byte
as a base-3 number scaled to 0..255 (ceil(q*256/243)), so a trit is read back as ((byte*3^n mod 256)*3) >> 8.
"""

from __future__ import annotations

import numpy as np

from ._common import QK_K, by_chunks, f32, pack_2bit_codes, unpack_2bit_codes
from .base import QuantType, half_bytes, half_values, split_fields

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)  # the first trit is the most significant


def _trits(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) -> d (n,) float16 and the (n, 256) trits 0..2 of lroundf(x * (1/d)) + 1."""
    amax = np.zeros(len(blocks), dtype=f32)
    for column in np.abs(blocks).T:  # amax = MAX(amax, fabsf(v)): a NaN is forgotten at the next weight
        amax = np.where(amax > column, amax, column)
    nonzero = amax != 0
    inverse = np.where(nonzero, f32(1) / np.where(nonzero, amax, f32(1)), f32(0))
    scaled = blocks * inverse[:, None]
    magnitude = np.abs(scaled)
    rounded = np.floor(magnitude)
    rounded += magnitude - rounded >= f32(0.5)  # halves away from zero; the difference is exact
    return amax.astype(np.float16), (np.copysign(rounded, scaled) + f32(1)).astype(np.int32)


def _pack_base3(trits: np.ndarray) -> np.ndarray:
    """(m, k) trits, first the most significant -> (m,) bytes ceil(value * 256 / 243), with k <= 5
    (fewer trits are shifted up to 5 digits, as C does for qh)."""
    value = (trits * _POW3[: trits.shape[1]]).sum(axis=1) & 0xFF
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _unpack_base3(packed: np.ndarray, k: int) -> np.ndarray:
    """(m,) bytes -> (m, k) trits: trit n = (((byte * 3^n) mod 256) * 3) >> 8."""
    shifted = (packed[:, None].astype(np.int32) * (3 ** np.arange(k))) & 0xFF
    return (shifted * 3) >> 8


class TQ1_0(QuantType):
    """1.6875 bits per weight: 5 trits per byte.

    uint8 qs[48]; uint8 qh[4]; half d              x = d * (t - 1), t in 0..2
    qs[m], m < 32: the trits of weights m + 32n, n = 0..4 (weights 0..159), n = 0 most significant;
    qs[32 + m], m < 16: weights 160 + m + 16n, n = 0..4 (160..239);
    qh[j], j < 4: weights 240 + j + 4n, n = 0..3, as four trits shifted up one base-3 digit.
    """

    name, ggml_type, block_size, type_size = "TQ1_0", 34, QK_K, 54

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray) -> np.ndarray:
        n = len(blocks)
        d, t = _trits(blocks)
        first = t[:, :160].reshape(n, 5, 32).transpose(0, 2, 1).reshape(-1, 5)
        second = t[:, 160:240].reshape(n, 5, 16).transpose(0, 2, 1).reshape(-1, 5)
        last = t[:, 240:].reshape(n, 4, 4).transpose(0, 2, 1).reshape(-1, 4)
        qs = np.concatenate([_pack_base3(first).reshape(n, 32), _pack_base3(second).reshape(n, 16)], axis=1)
        return np.concatenate([qs, _pack_base3(last).reshape(n, 4), half_bytes(d)], axis=1)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        qs, qh, d = split_fields(blocks, 48, 4, 2)
        n = len(blocks)
        first = _unpack_base3(qs[:, :32].reshape(-1), 5).reshape(n, 32, 5).transpose(0, 2, 1).reshape(n, 160)
        second = _unpack_base3(qs[:, 32:].reshape(-1), 5).reshape(n, 16, 5).transpose(0, 2, 1).reshape(n, 80)
        last = _unpack_base3(np.ascontiguousarray(qh).reshape(-1), 4).reshape(n, 4, 4).transpose(0, 2, 1)
        trits = np.concatenate([first, second, last.reshape(n, 16)], axis=1)
        return (trits - 1).astype(f32) * half_values(d)


class TQ2_0(QuantType):
    """2.0625 bits per weight: 4 trits per byte.

    uint8 qs[64]; half d                           x = d * (t - 1), t in 0..2
    qs as Q2_K's: weight 128h + 32k + l in bits 2k, 2k+1 of qs[32h + l].
    """

    name, ggml_type, block_size, type_size = "TQ2_0", 35, QK_K, 66

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray) -> np.ndarray:
        d, t = _trits(blocks)
        return np.concatenate([pack_2bit_codes(t), half_bytes(d)], axis=1)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        qs, d = split_fields(blocks, 64, 2)
        return (unpack_2bit_codes(qs).astype(np.int8) - np.int8(1)).astype(f32) * half_values(d)
