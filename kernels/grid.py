"""The grid a quantized tensor's weights sit on, and blocks rewritten with new codes on that grid.

Every quantized GGUF type slim writes dequantizes each weight as

    y = step * q + offset        q an integer code in [low, high]

with one (step, offset) per group of weights, fixed by the block's scale fields:

  type   group  code range      step                 offset
  Q8_0   32     -128..127       d                    0
  Q4_0   32     -8..7           d                    0            (stored q - 8)
  Q5_0   32     -16..15         d                    0            (stored q - 16)
  Q4_1   32     0..15           d                    m
  Q5_1   32     0..31           d                    m
  Q4_K   32     0..15           d*sc[j]              -dmin*m[j]
  Q5_K   32     0..31           d*sc[j]              -dmin*m[j]
  Q6_K   16     -32..31         d*scales[j]          0            (stored q - 32)

step and offset are computed in float32 exactly as the dequantizers do, so step * q + offset equals
`slim.kernels.dequantize` bit for bit. Quantization-aware training (slim.runtime.train.qat) freezes the
grid, trains which code each weight takes, and `with_codes` writes the final codes back into the
same blocks: only the code bits change, so the file dequantizes to exactly the trained weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import check_row_length, qtype
from ._common import (
    f32,
    pack_fifth_bits,
    pack_k_fifth_bits,
    pack_k_nibbles,
    pack_nibbles,
    pack_q6_k_codes,
    unpack_fifth_bits,
    unpack_k_fifth_bits,
    unpack_k_nibbles,
    unpack_nibbles,
    unpack_q6_k_codes,
    unpack_scale_min,
)
from .base import half_values, split_fields


@dataclass(frozen=True)
class Grid:
    """Per group of `group` consecutive weights in a row: y = step * q + offset, low <= q <= high."""

    step: np.ndarray  # (rows, cols // group) float32
    offset: np.ndarray  # (rows, cols // group) float32
    group: int
    low: int
    high: int

    def values(self, codes: np.ndarray) -> np.ndarray:
        """The weights that integer codes (rows, cols) stand for, as the dequantizer computes them."""
        rows, groups = self.step.shape
        q = codes.reshape(rows, groups, self.group).astype(f32)
        return (self.step[:, :, None] * q + self.offset[:, :, None]).reshape(rows, groups * self.group)


def grid(data: np.ndarray, qtype_name: str, shape: tuple[int, int]) -> tuple[Grid, np.ndarray]:
    """Quantized rows (rows, row bytes) of `shape` -> their grid and their int16 codes (rows, cols)."""
    cls = qtype(qtype_name)
    if cls.name not in _TYPES:
        raise ValueError(f"{cls.name} has no integer grid; choose one of {', '.join(_TYPES)}")
    rows, cols = shape
    check_row_length(cls, cols)
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
    layout = _TYPES[cls.name]
    step, offset, codes = layout.unpack(blocks)
    return (
        Grid(step.reshape(rows, -1), offset.reshape(rows, -1), layout.group, layout.low, layout.high),
        codes.reshape(rows, cols),
    )


def with_codes(data: np.ndarray, qtype_name: str, codes: np.ndarray) -> np.ndarray:
    """The same quantized rows with every weight's code replaced by `codes` (rows, cols); the scale
    fields are kept byte for byte. Codes must lie in the grid's range."""
    cls = qtype(qtype_name)
    layout = _TYPES[cls.name]
    codes = np.asarray(codes)
    if codes.min() < layout.low or codes.max() > layout.high:
        raise ValueError(f"{cls.name} codes must lie in {layout.low}..{layout.high}")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.type_size)
    stored = (codes.astype(np.int16) - layout.low).astype(np.uint8)  # the unsigned value the bits hold
    out = layout.pack(blocks, stored.reshape(len(blocks), cls.block_size))
    return out.reshape(np.shape(data))


# ----------------------------------------------------------------------------- the layouts


@dataclass(frozen=True)
class _Layout:
    group: int
    low: int
    high: int
    unpack: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
    # blocks -> (step (n, groups), offset (n, groups), codes (n, block_size) int16)
    pack: Callable[[np.ndarray, np.ndarray], np.ndarray]
    # (blocks, codes - low as uint8 (n, block_size)) -> the blocks with those codes


def _zeros(n: int, groups: int) -> np.ndarray:
    return np.zeros((n, groups), dtype=f32)


def _unpack_q8_0(blocks: np.ndarray):
    d, qs = split_fields(blocks, 2, 32)
    return half_values(d), _zeros(len(blocks), 1), np.ascontiguousarray(qs).view(np.int8).astype(np.int16)


def _pack_q8_0(blocks: np.ndarray, stored: np.ndarray) -> np.ndarray:
    out = blocks.copy()
    out[:, 2:] = stored - np.uint8(128)  # stored is q + 128: this wraps to the int8 byte of q
    return out


def _unpack_symmetric(bias: int, fifth: bool):
    def unpack(blocks: np.ndarray):
        if fifth:
            d, qh, qs = split_fields(blocks, 2, 4, 16)
            q = unpack_nibbles(qs) | unpack_fifth_bits(qh) << 4
        else:
            d, qs = split_fields(blocks, 2, 16)
            q = unpack_nibbles(qs)
        return half_values(d), _zeros(len(blocks), 1), q.astype(np.int16) - bias

    return unpack


def _unpack_affine(fifth: bool):
    def unpack(blocks: np.ndarray):
        if fifth:
            d, m, qh, qs = split_fields(blocks, 2, 2, 4, 16)
            q = unpack_nibbles(qs) | unpack_fifth_bits(qh) << 4
        else:
            d, m, qs = split_fields(blocks, 2, 2, 16)
            q = unpack_nibbles(qs)
        return half_values(d), half_values(m), q.astype(np.int16)

    return unpack


def _pack_legacy(head: int, fifth: bool):
    """Keep the first `head` bytes (d, and m for the _1 types); rewrite qh and qs."""

    def pack(blocks: np.ndarray, stored: np.ndarray) -> np.ndarray:
        fields = [blocks[:, :head]] + ([pack_fifth_bits(stored)] if fifth else []) + [pack_nibbles(stored)]
        return np.concatenate(fields, axis=1)

    return pack


def _unpack_scale_min_k(fifth: bool):
    def unpack(blocks: np.ndarray):
        if fifth:
            d, dmin, scales, qh, qs = split_fields(blocks, 2, 2, 12, 32, 128)
            q = unpack_k_nibbles(qs) | unpack_k_fifth_bits(qh) << 4
        else:
            d, dmin, scales, qs = split_fields(blocks, 2, 2, 12, 128)
            q = unpack_k_nibbles(qs)
        sc, m = unpack_scale_min(scales)
        step = half_values(d) * sc.astype(f32)
        offset = -(half_values(dmin) * m.astype(f32))
        return step, offset, q.reshape(len(blocks), -1).astype(np.int16)

    return unpack


def _pack_scale_min_k(fifth: bool):
    def pack(blocks: np.ndarray, stored: np.ndarray) -> np.ndarray:
        q = stored.reshape(len(blocks), 8, 32)
        fields = [blocks[:, :16]]
        if fifth:
            fields.append(pack_k_fifth_bits(q))
        fields.append(pack_k_nibbles(q))
        return np.concatenate(fields, axis=1)

    return pack


def _unpack_q6_k(blocks: np.ndarray):
    ql, qh, scales, d = split_fields(blocks, 128, 64, 16, 2)
    step = half_values(d) * np.ascontiguousarray(scales).view(np.int8).astype(f32)
    return step, _zeros(len(blocks), 16), unpack_q6_k_codes(ql, qh).astype(np.int16) - 32


def _pack_q6_k(blocks: np.ndarray, stored: np.ndarray) -> np.ndarray:
    ql, qh = pack_q6_k_codes(stored)
    return np.concatenate([ql, qh, blocks[:, 192:]], axis=1)


_TYPES: dict[str, _Layout] = {
    "Q8_0": _Layout(32, -128, 127, _unpack_q8_0, _pack_q8_0),
    "Q4_0": _Layout(32, -8, 7, _unpack_symmetric(8, fifth=False), _pack_legacy(2, fifth=False)),
    "Q5_0": _Layout(32, -16, 15, _unpack_symmetric(16, fifth=True), _pack_legacy(2, fifth=True)),
    "Q4_1": _Layout(32, 0, 15, _unpack_affine(fifth=False), _pack_legacy(4, fifth=False)),
    "Q5_1": _Layout(32, 0, 31, _unpack_affine(fifth=True), _pack_legacy(4, fifth=True)),
    "Q4_K": _Layout(32, 0, 15, _unpack_scale_min_k(fifth=False), _pack_scale_min_k(fifth=False)),
    "Q5_K": _Layout(32, 0, 31, _unpack_scale_min_k(fifth=True), _pack_scale_min_k(fifth=True)),
    "Q6_K": _Layout(16, -32, 31, _unpack_q6_k, _pack_q6_k),
}
TYPES = tuple(_TYPES)
