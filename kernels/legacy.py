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

Given an imatrix (quantize_row_q4_0_impl & co.), the four quants weight each x by
importance * sqrt(sigma2 + x^2), sigma2 being the mean square of the WHOLE row, and search: Q4_0/Q5_0
with make_qx_quants (19 trial scales of the signed extreme, least-squares scale), Q4_1/Q5_1 with
make_qkx3_quants (37 trial scales, least-squares scale and min). The codes of the search are stored
as they are: unlike the K-quants, nothing is re-coded against the half-precision d.

search="thorough" (_symmetric_thoroughly, _affine_thoroughly) judges every candidate d (and m) by the
weighted error of the stored block, with the codes nearest to each weight for the half values, and
keeps the reference block wherever that is at least as good. Its weights are the imatrix ones above,
or without an imatrix 1: the reference then scales to the block's extremes and minimises nothing.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from gguf import quants as gguf_quants

from ._common import (
    THOROUGH_GRID,
    alternate,
    by_chunks,
    columns,
    f32,
    make_qkx2_quants,
    make_qx_quants,
    pack_fifth_bits,
    pack_nibbles,
    seq_sum,
)
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


class _GgufQuant(Protocol):
    """What slim uses of a gguf-py quant class (gguf.quants.Q8_0 & co.)."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray: ...

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray: ...


class _FromGguf(QuantType):
    """A type whose numpy quantizer and dequantizer come from gguf-py."""

    _impl: type[_GgufQuant]

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


class _Weighted(_FromGguf):
    """A legacy quant whose C quantizer uses the imatrix, and which has a thorough search.

    `quantize_weighted(blocks, weights)` encodes (n, 32) blocks given the (n, 32) weights C minimises,
    which need the whole row; `search_thoroughly(blocks, weights)` returns the fields `_pack` takes.
    """

    searches = ("reference", "thorough")

    @classmethod
    @abstractmethod
    def quantize_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(n, 32) blocks -> (n, type_size) uint8, minimising the error weighted by `weights` as C does."""

    @classmethod
    @abstractmethod
    def search_thoroughly(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        """search="thorough": the fields (d, m if any, codes) `_pack` takes."""

    # Packs a type's fields, (d, codes) or (d, m, codes), into (n, type_size) uint8 blocks.
    _pack: Callable[..., np.ndarray]

    @classmethod
    def quantize_rows(
        cls, rows: np.ndarray, importance: np.ndarray | None = None, search: str = "reference"
    ) -> np.ndarray:
        if importance is None and search == "reference":
            return super().quantize_rows(rows)
        # With an imatrix, the weights C minimises; without, the reference minimises nothing (it
        # scales to the block's extremes), so the thorough search minimises the plain squared error.
        weights = np.ones_like(rows) if importance is None else _row_weights(rows, importance)
        encode = functools.partial(cls._encode, imatrix=importance is not None, thorough=search == "thorough")
        blocks = rows.reshape(-1, cls.block_size)
        return by_chunks(blocks, cls.type_size, encode, weights.reshape(blocks.shape)).reshape(len(rows), -1)

    @classmethod
    def _encode(cls, blocks: np.ndarray, weights: np.ndarray, imatrix: bool, thorough: bool) -> np.ndarray:
        data = cls.quantize_weighted(blocks, weights) if imatrix else cls.quantize_blocks(blocks)
        if thorough:  # keep the reference block wherever it is at least as good
            found = cls._pack(*cls.search_thoroughly(blocks, weights))
            better = cls._weighted_error(blocks, weights, found) < cls._weighted_error(blocks, weights, data)
            data = np.where(better[:, None], found, data)
        return data

    @classmethod
    def _weighted_error(cls, blocks: np.ndarray, weights: np.ndarray, data: np.ndarray) -> np.ndarray:
        """(n,) float64 sum of w*(x - decoded)^2 per block, decoded as llama.cpp decodes it."""
        decoded = cls.dequantize_blocks(data).astype(np.float64)
        return (weights.astype(np.float64) * (blocks - decoded) ** 2).sum(axis=1)


class Q4_0(_Weighted):
    """d = max/-8 from the signed value of largest magnitude; q = min(15, trunc(x/d + 8.5)).
    With an imatrix: make_qx_quants(nmax 8) on the weighted error."""

    name, ggml_type, block_size, type_size, _impl = "Q4_0", 2, 32, 18, gguf_quants.Q4_0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._pack(*_symmetric(blocks, levels=16))

    @classmethod
    def quantize_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return cls._pack(*_weighted_symmetric(blocks, weights, nmax=8))

    @classmethod
    def search_thoroughly(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _symmetric_thoroughly(blocks, weights, nmax=8)

    @staticmethod
    def _pack(d: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.concatenate([half_bytes(d), pack_nibbles(q)], axis=1)


class Q4_1(_Weighted):
    """d = (max-min)/15, m = min; q = min(15, trunc((x-min)/d + 0.5)).
    With an imatrix: make_qkx3_quants(nmax 15) on the weighted error."""

    name, ggml_type, block_size, type_size, _impl = "Q4_1", 3, 32, 20, gguf_quants.Q4_1

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._pack(*_affine(blocks, levels=16))

    @classmethod
    def quantize_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return cls._pack(*_weighted_affine(blocks, weights, nmax=15))

    @classmethod
    def search_thoroughly(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        return _affine_thoroughly(blocks, weights, nmax=15)

    @staticmethod
    def _pack(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.concatenate([half_bytes(d), half_bytes(m), pack_nibbles(q)], axis=1)


class Q5_0(_Weighted):
    """d = max/-16 from the signed value of largest magnitude; q = min(31, trunc(x/d + 16.5)).
    With an imatrix: make_qx_quants(nmax 16) on the weighted error."""

    name, ggml_type, block_size, type_size, _impl = "Q5_0", 6, 32, 22, gguf_quants.Q5_0

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._pack(*_symmetric(blocks, levels=32))

    @classmethod
    def quantize_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return cls._pack(*_weighted_symmetric(blocks, weights, nmax=16))

    @classmethod
    def search_thoroughly(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _symmetric_thoroughly(blocks, weights, nmax=16)

    @staticmethod
    def _pack(d: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.concatenate([half_bytes(d), pack_fifth_bits(q), pack_nibbles(q)], axis=1)


class Q5_1(_Weighted):
    """d = (max-min)/31, m = min; q = min(31, trunc((x-min)/d + 0.5)).
    With an imatrix: make_qkx3_quants(nmax 31) on the weighted error."""

    name, ggml_type, block_size, type_size, _impl = "Q5_1", 7, 32, 24, gguf_quants.Q5_1

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._pack(*_affine(blocks, levels=32))

    @classmethod
    def quantize_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return cls._pack(*_weighted_affine(blocks, weights, nmax=31))

    @classmethod
    def search_thoroughly(cls, blocks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        return _affine_thoroughly(blocks, weights, nmax=31)

    @staticmethod
    def _pack(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.concatenate([half_bytes(d), half_bytes(m), pack_fifth_bits(q), pack_nibbles(q)], axis=1)


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


def _row_weights(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """importance * sqrt(sigma2 + x^2) per weight, sigma2 = the row's mean square (summed left to right)."""
    sum_x2 = seq_sum(np.square(np.ascontiguousarray(rows.T)))
    sigma2 = sum_x2 / f32(rows.shape[1])
    return importance * np.sqrt(sigma2[:, None] + rows * rows)


def _weighted_symmetric(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0 with an imatrix: d and the codes 0..2*nmax-1 of make_qx_quants."""
    d, L = make_qx_quants(columns(blocks, 32), nmax, columns(weights, 32))
    return d, L.T.astype(np.uint8)


def _weighted_affine(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1 with an imatrix: d, m and the codes 0..nmax of make_qkx3_quants."""
    d, neg_min, L = make_qkx2_quants(columns(blocks, 32), columns(weights, 32), nmax, rmin=-0.9, rdelta=0.05, nstep=36)
    return d, -neg_min, L.T.astype(np.uint8)


def _symmetric_thoroughly(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """search="thorough" for Q4_0/Q5_0: the d (n,) and codes (n, 32) of least weighted error with d
    stored as half, x ~ d*(q - nmax). Every candidate d is judged with the codes nearest to each weight
    for its half value: 42 trial d that put the block's largest-magnitude value at level
    -(nmax-1 .. nmax+1) or +(nmax-2 .. nmax) in steps of 0.1, then d nudged and least-squares refits
    given the codes (_common.alternate)."""
    extreme = _symmetric(blocks, levels=2 * nmax)[0].reshape(-1) * f32(-nmax)  # signed, largest |x|
    steps = np.arange(-10, 11) / 10

    def pick(d: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray]]:
        stored = d.astype(np.float16).astype(f32)[:, None]
        q = np.rint(blocks / np.where(stored != 0, stored, f32(1))) + f32(nmax)
        q = np.where(stored != 0, np.clip(q, 0, 2 * nmax - 1), f32(nmax))
        diff = stored * (q - f32(nmax)) - blocks
        return (weights * diff * diff).sum(axis=1), (q,)

    def refit(codes: tuple[np.ndarray], d: np.ndarray) -> tuple[np.ndarray]:
        a = codes[0] - f32(nmax)
        numerator = (weights * a * blocks).sum(axis=1, dtype=np.float64)
        denominator = (weights * a * a).sum(axis=1, dtype=np.float64)
        new_d = (numerator / denominator).astype(f32)
        return (np.where((denominator > 0) & np.isfinite(new_d), new_d, d),)

    trials = [(extreme / f32(-(nmax + t)),) for t in steps] + [(extreme / f32(nmax - 1 + t),) for t in steps]
    (d,), (q,) = alternate(pick, refit, start=_best_trial(pick, trials))
    return d, q.astype(np.uint8)


def _affine_thoroughly(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """search="thorough" for Q4_1/Q5_1: the d, m (n,) and codes (n, 32) of least weighted error with
    d and m stored as half, x ~ d*q + m. Starts from the better of the reference's (max-min)/nmax, min
    and a weighted fit on the thorough searches' finer trial grid; then d nudged and least-squares refits of (d, m),
    each judged with the codes nearest to each weight for the half values (_common.alternate)."""

    def pick(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray]]:
        stored_d = d.astype(np.float16).astype(f32)[:, None]
        stored_m = m.astype(np.float16).astype(f32)[:, None]
        q = np.rint((blocks - stored_m) / np.where(stored_d != 0, stored_d, f32(1)))
        q = np.where(stored_d != 0, np.clip(q, 0, nmax), f32(0))
        diff = stored_d * q + stored_m - blocks
        return (weights * diff * diff).sum(axis=1), (q,)

    def refit(codes: tuple[np.ndarray], d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = codes[0]
        sw, swq, swqq = (v.sum(axis=1, dtype=np.float64) for v in (weights, weights * q, weights * q * q))
        swx, swqx = (v.sum(axis=1, dtype=np.float64) for v in (weights * blocks, weights * q * blocks))
        det = sw * swqq - swq * swq
        new_d = ((sw * swqx - swq * swx) / det).astype(f32)
        new_m = ((swqq * swx - swq * swqx) / det).astype(f32)
        ok = (det > 0) & np.isfinite(new_d) & np.isfinite(new_m)
        return np.where(ok, new_d, d), np.where(ok, new_m, m)

    plain_d, plain_m, _ = _affine(blocks, levels=nmax + 1)
    scale, offset, _ = make_qkx2_quants(columns(blocks, 32), columns(weights, 32), nmax, **THOROUGH_GRID)
    fitted = (scale, -offset)
    start = _best_trial(pick, [(plain_d.reshape(-1), plain_m.reshape(-1)), fitted])
    (d, m), (q,) = alternate(pick, refit, start=start)
    return d, m, q.astype(np.uint8)


def _best_trial(
    pick: Callable[..., tuple[np.ndarray, tuple[np.ndarray, ...]]], trials: Sequence[tuple[np.ndarray, ...]]
) -> tuple[np.ndarray, ...]:
    """Per block, the trial (a tuple of (n,) block scales) whose pick(*trial) error is least."""
    best, best_err = trials[0], pick(*trials[0])[0]
    for trial in trials[1:]:
        err = pick(*trial)[0]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = tuple(np.where(better, new, old) for new, old in zip(trial, best, strict=True))
    return best
