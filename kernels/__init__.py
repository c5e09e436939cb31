"""GGUF quantization kernels: numpy reference implementations, byte-identical to llama.cpp's.

    quantize(x, "Q4_K")            float32 (rows, cols) -> uint8 (rows, bytes_per_row)
    dequantize(data, "Q4_K", shape) -> float32 (rows, cols)

Each type is one class (legacy.py: floats and 32-weight quants; kquants.py: the 256-weight K-quants)
with its block layout in its docstring. `backend="ggml"` runs llama.cpp's own C quantizer from the
libggml-base that llama-cpp-python ships; the default, "auto", uses it when importable (tests prove
both backends write identical bytes) and the numpy kernels otherwise.
"""

from __future__ import annotations

import numpy as np

from . import ggml
from .base import QuantType
from .kquants import Q4_K, Q5_K, Q6_K
from .legacy import BF16, F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

QTYPES: dict[str, type[QuantType]] = {
    cls.name: cls for cls in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
}
BY_GGML_TYPE: dict[int, type[QuantType]] = {cls.ggml_type: cls for cls in QTYPES.values()}

# Rows are quantized this many weights at a time, so memory stays near one chunk.
_CHUNK_WEIGHTS = 1 << 20


def qtype(name: str) -> type[QuantType]:
    """The type class for a name such as "Q4_K" (case-insensitive); ValueError lists the known ones."""
    cls = QTYPES.get(name.upper())
    if cls is None:
        raise ValueError(f"unknown quantization type {name!r}; choose one of {', '.join(QTYPES)}")
    return cls


def check_row_length(cls: type[QuantType], n_per_row: int) -> None:
    if n_per_row % cls.block_size:
        raise ValueError(
            f"{cls.name} packs {cls.block_size} weights per block, so a row length must be a multiple "
            f"of {cls.block_size}; got {n_per_row} (nearest that fit: "
            f"{n_per_row // cls.block_size * cls.block_size or cls.block_size}, "
            f"{(n_per_row // cls.block_size + 1) * cls.block_size})"
        )


def quantize(
    x: np.ndarray,
    qtype_name: str,
    *,
    backend: str = "auto",
) -> np.ndarray:
    """Quantize float32 rows to GGUF blocks: (rows, cols) -> uint8 (rows, bytes_per_row).

    backend: "numpy", "ggml" (llama.cpp's C quantizer) or "auto" (ggml when importable).
    """
    cls = qtype(qtype_name)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D (rows, cols) array, got shape {x.shape}")
    rows, cols = x.shape
    check_row_length(cls, cols)
    if backend not in ("auto", "numpy", "ggml"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, numpy or ggml")
    if backend == "ggml" and not ggml.available():
        raise ValueError("backend='ggml' needs llama-cpp-python installed; use backend='numpy'")
    use_c = backend == "ggml" or (backend == "auto" and ggml.available())

    out = np.empty((rows, cls.row_bytes(cols)), dtype=np.uint8)
    step = max(1, _CHUNK_WEIGHTS // max(cols, 1))
    for start in range(0, rows, step):
        chunk = np.ascontiguousarray(x[start:start + step], dtype=np.float32)
        if use_c:
            out[start:start + step] = ggml.quantize_rows(chunk, cls.ggml_type)
        else:
            blocks = chunk.reshape(-1, cls.block_size)
            out[start:start + step] = cls.quantize_blocks(blocks).reshape(len(chunk), -1)
    return out


def dequantize(data: np.ndarray, qtype_name: str, shape: tuple[int, int]) -> np.ndarray:
    """GGUF blocks back to float32 of `shape` (rows, cols)."""
    cls = qtype(qtype_name)
    rows, cols = shape
    check_row_length(cls, cols)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    expected = rows * cls.row_bytes(cols)
    if data.size != expected:
        raise ValueError(f"{cls.name} data of shape {shape} needs {expected} bytes, got {data.size}")
    blocks = data.reshape(-1, cls.type_size)
    return cls.dequantize_blocks(blocks).reshape(rows, cols).astype(np.float32, copy=False)


__all__ = ["QTYPES", "BY_GGML_TYPE", "QuantType", "qtype", "quantize", "dequantize", "check_row_length"]
