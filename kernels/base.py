"""What every GGUF tensor type shares: its block geometry, and how rows become blocks."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import numpy as np

from ._common import by_chunks


class QuantType(ABC):
    """One GGUF tensor type: a block of `block_size` weights is stored in `type_size` bytes.

    Subclasses define two classmethods on 2-D arrays of whole blocks:
      quantize_blocks(blocks (n, block_size) float32) -> (n, type_size) uint8
      dequantize_blocks(blocks (n, type_size) uint8) -> (n, block_size) float32
    `slim.kernels.quantize` calls `quantize_rows` on whole rows, which by default cuts them into
    blocks. The types whose C quantizer uses an importance matrix override it, because the weights
    they minimise can depend on the whole row (the legacy quants scale them by its mean square).
    """

    name: str
    ggml_type: int
    block_size: int
    type_size: int
    searches: tuple[str, ...] = ("reference",)  # "thorough" where a type has a wider search
    c_only: bool = False  # encoded by llama.cpp's C quantizer only (the lattice i-quants)

    @classmethod
    @abstractmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n, block_size) float32 -> (n, type_size) uint8."""

    @classmethod
    @abstractmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n, type_size) uint8 -> (n, block_size) float32."""

    @classmethod
    def row_bytes(cls, n_per_row: int) -> int:
        return n_per_row // cls.block_size * cls.type_size

    @classmethod
    def quantize_rows(
        cls, rows: np.ndarray, importance: np.ndarray | None = None, search: str = "reference"
    ) -> np.ndarray:
        """(nrows, n_per_row) float32 -> (nrows, row_bytes) uint8.

        importance: llama.cpp's imatrix for the row's columns (float32, n_per_row), or None.
        search: "reference", or "thorough" for a type that lists it in `searches` (others run their
        reference search). This default serves the floats and Q8_0, whose C quantizers ignore the
        imatrix, so it ignores both.
        """
        return cls.quantize_blocks(rows.reshape(-1, cls.block_size)).reshape(len(rows), -1)


class ChunkedQuant(QuantType):
    """A type whose quantizer encodes block by block, given each block's slice of the imatrix: its
    `_quantize_chunk(blocks, importance=None, thorough=False)` encodes a cache-sized run of
    (n, block_size) blocks, given their (n, block_size) importance or None; thorough=True is asked
    only of a type that lists "thorough" in `searches`."""

    @classmethod
    @abstractmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        """(n, block_size) float32 blocks -> (n, type_size) uint8."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def quantize_rows(
        cls, rows: np.ndarray, importance: np.ndarray | None = None, search: str = "reference"
    ) -> np.ndarray:
        quantize_chunk = cls._quantize_chunk
        if search == "thorough" and "thorough" in cls.searches:
            quantize_chunk = functools.partial(quantize_chunk, thorough=True)
        blocks = rows.reshape(-1, cls.block_size)
        per_weight = None if importance is None else np.broadcast_to(importance, rows.shape).reshape(blocks.shape)
        return by_chunks(blocks, cls.type_size, quantize_chunk, per_weight).reshape(len(rows), -1)


def split_fields(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    """Cut (n, type_size) uint8 blocks into consecutive byte fields of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(blocks[:, start : start + size])
        start += size
    assert start == blocks.shape[1], (start, blocks.shape)
    return out


def half_bytes(values: np.ndarray) -> np.ndarray:
    """float32 (n,) or (n, 1) -> (n, 2) uint8: IEEE half, round-to-nearest-even, little-endian."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def half_values(field: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian halves -> (n, 1) float32."""
    return np.ascontiguousarray(field).view(np.float16).astype(np.float32)
