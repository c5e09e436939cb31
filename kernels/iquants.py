"""The non-linear 4-bit quants IQ4_NL and IQ4_XS, byte-identical to llama.cpp's quantize_iq4_nl/_xs.

Their codes index a fixed table of 16 levels, denser near zero where weights are, instead of an
evenly spaced grid: x = scale * KVALUES[q]. Both run quantize_row_iq4_nl_impl (ggml-quants.c) per
32-weight block:

  1. weights w = x^2, or importance * sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2) over the
     super-block (32 weights for IQ4_NL, 256 for IQ4_XS);
  2. max = the signed value of largest |x|; every weight takes the table level nearest to x/d for
     d = max/127 (best_index_int8); the scale is refitted by least squares, d = sum(w*q*x)/sum(w*q^2);
  3. 15 trial inverse scales (itry - 127)/max, itry = -7..7, each refitted the same way; the one with
     the largest (sum w*q*x)^2 / sum w*q^2 wins (strict >, so ties keep the earlier);
  4. IQ4_NL stores d as half and re-picks each level for 1/d (d in float32, not the half);
     IQ4_XS quantizes the 8 block scales to 6-bit codes l against D = -max_scale/32, stores D as half,
     and re-picks each level for 1/(D*l) (D in float32).

The sums run left to right in float32 and C's association is kept ((w*q)*x), as in _common.py.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    GROUP_MAX_EPS,
    QK_K,
    columns,
    f32,
    nearest_int,
    pack_nibbles,
    running_absmax,
    seq_sum,
    unpack_nibbles,
)
from .base import ChunkedQuant, half_bytes, half_values, split_fields

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=f32)
_TRIALS = 7  # ntry: trial inverse scales (itry + KVALUES[0])/max for itry = -7..7


def nearest_level(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, KVALUES, v): the index of the level nearest to v, the upper one on a tie;
    NaN picks the top level, as C's binary search does."""
    upper = np.clip(np.searchsorted(KVALUES, v, side="right"), 1, 15)  # KVALUES[upper-1] <= v < KVALUES[upper]
    lower = upper - 1
    return np.where(v - KVALUES[lower] < KVALUES[upper] - v, lower, upper)


def _fit(X: np.ndarray, W: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum(w*q*x) and sum(w*q*q) per column of the levels q nearest to inverse*x."""
    Q = KVALUES[nearest_level(X * inverse)]
    WQ = W * Q
    return seq_sum(WQ * X), seq_sum(WQ * Q)


def _block_scales(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Steps 2-3 on every 32-weight column of X with weights W at once: the (S,) block scales, 0
    for a block whose largest |x| is below 1e-15."""
    amax, max_ = running_absmax(X)
    zero = amax < GROUP_MAX_EPS
    max_ = np.where(zero, f32(1), max_)  # keeps zero columns finite; they are reset at the end
    d = -max_ / KVALUES[0]
    sumqx, sumq2 = _fit(X, W, f32(1) / d)
    positive = sumq2 > 0
    d = np.where(positive, sumqx / np.where(positive, sumq2, f32(1)), f32(0))
    best = d * sumqx
    for itry in range(-_TRIALS, _TRIALS + 1):
        sumqx, sumq2 = _fit(X, W, f32(itry + KVALUES[0]) / max_)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(take, sumqx / np.where(take, sumq2, f32(1)), d)
        best = np.where(take, d * sumqx, best)
    return np.where(zero, f32(0), d)


def _weights(blocks: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(n, block) super-blocks -> their 32-weight columns X (32, S) and the weights W of step 1."""
    X = columns(blocks, 32)
    if importance is None:
        return X, X * X
    sigma2 = seq_sum(np.square(np.ascontiguousarray(blocks.T)))  # sigma2 += x*x, from 0
    sigma2 *= f32(2) / f32(blocks.shape[1])
    return X, columns(importance, 32) * np.sqrt(np.repeat(sigma2, blocks.shape[1] // 32) + X * X)


def _inverse(values: np.ndarray) -> np.ndarray:
    """C's `v ? 1/v : 0`."""
    nonzero = values != 0
    return np.where(nonzero, f32(1) / np.where(nonzero, values, f32(1)), f32(0))


def _dequantize_levels(scale: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """(n, k) float32 scales of the 32-weight blocks and their (n, 16k) packed codes -> (n, 32k) weights."""
    n, k = scale.shape
    levels = KVALUES[unpack_nibbles(qs.reshape(n * k, 16))].reshape(n, k, 32)
    return (scale[:, :, None] * levels).reshape(n, 32 * k)


class IQ4_NL(ChunkedQuant):
    """4.5 bits per weight: blocks of 32, one half scale, codes into KVALUES.

    half d; uint8 qs[16]          x = d * KVALUES[q], q in 0..15
    qs[j] = q[j] | q[j+16] << 4 (as Q4_0). Search: quantize_iq4_nl (see the module docstring).
    """

    name, ggml_type, block_size, type_size = "IQ4_NL", 20, 32, 18

    @classmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        X, W = _weights(blocks, importance)
        d = _block_scales(X, W)
        codes = nearest_level(X * _inverse(d)).T
        return np.concatenate([half_bytes(d), pack_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, qs = split_fields(blocks, 2, 16)
        return _dequantize_levels(half_values(d), qs)


class IQ4_XS(ChunkedQuant):
    """4.25 bits per weight: super-blocks of 256 in 8 blocks of 32, each with a 6-bit scale.

    half d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128]
        x = d*(l[j] - 32) * KVALUES[q]        l[j] the 6-bit code of block j, q in 0..15
    l[j]: low 4 bits in scales_l[j // 2] (low nibble for even j), top 2 bits at bits 2j of scales_h.
    qs: block j owns qs[16j:16j+16], packed as IQ4_NL's. Search: quantize_iq4_xs (module docstring).
    """

    name, ggml_type, block_size, type_size = "IQ4_XS", 23, QK_K, 136

    @classmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        n = len(blocks)
        X, W = _weights(blocks, importance)
        scales = _block_scales(X, W).reshape(n, 8)
        _, max_scale = running_absmax(scales.T)
        d = -max_scale / f32(32)
        codes = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
        block_d = (d[:, None] * codes.astype(f32)).reshape(-1)  # dl = d * l, from the float32 d
        levels = nearest_level(X * _inverse(block_d)).T.reshape(n, QK_K)
        stored = (codes + 32).astype(np.uint16)
        scales_h = np.bitwise_or.reduce((stored >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
        scales_l = ((stored[:, 0::2] & 0xF) | (stored[:, 1::2] & 0xF) << 4).astype(np.uint8)
        qs = pack_nibbles(levels.reshape(n * 8, 32)).reshape(n, 128)
        return np.concatenate(
            [half_bytes(d), scales_h.astype("<u2").reshape(n, 1).view(np.uint8), scales_l, qs], axis=1
        )

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, scales_h, scales_l, qs = split_fields(blocks, 2, 2, 4, 128)
        high = np.ascontiguousarray(scales_h).view("<u2").astype(np.int32)
        low = np.stack([scales_l & 0xF, scales_l >> 4], axis=2).reshape(len(blocks), 8).astype(np.int32)
        codes = low | ((high >> (2 * np.arange(8))) & 3) << 4
        return _dequantize_levels(half_values(d) * (codes - 32).astype(f32), qs)
