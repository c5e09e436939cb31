"""GGUF quantization kernels: numpy reference implementations, byte-identical to llama.cpp's.

    quantize(x, "Q4_K")            float32 (rows, cols) -> uint8 (rows, bytes_per_row)
    quantize(x, "Q4_K", importance=imatrix)   llama-quantize --imatrix's bytes
    quantize(x, "Q4_K", search="thorough")    standard blocks, lower weighted error, slower
    dequantize(data, "Q4_K", shape) -> float32 (rows, cols)

Each type is one class (legacy.py: floats and 32-weight quants; kquants.py: the 256-weight K-quants
Q2_K..Q6_K; iquants.py: the non-linear IQ4_NL, IQ4_XS; ternary.py: TQ1_0, TQ2_0; lattice.py: the
lattice i-quants IQ3_XXS..IQ1_M, which only llama.cpp's C code encodes) with its block layout in its
docstring; the C arithmetic and bit packing they share is in _common.py.
`backend="ggml"` runs llama.cpp's own C quantizer from the libggml-base that llama-cpp-python ships;
the default, "auto", uses it when importable (tests prove both backends write identical bytes) and the
numpy kernels otherwise.
"""

from __future__ import annotations

import numpy as np

from . import ggml
from .base import QuantType
from .iquants import IQ4_NL, IQ4_XS
from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .lattice import IQ1_M, IQ1_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS
from .legacy import BF16, F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .ternary import TQ1_0, TQ2_0

QTYPES: dict[str, type[QuantType]] = {
    cls.name: cls
    for cls in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
    + (IQ4_NL, IQ4_XS, TQ1_0, TQ2_0)
    + (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M)
}
BY_GGML_TYPE: dict[int, type[QuantType]] = {cls.ggml_type: cls for cls in QTYPES.values()}
SEARCHES = ("reference", "thorough")

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
    importance: np.ndarray | None = None,
    search: str = "reference",
    backend: str = "auto",
) -> np.ndarray:
    """Quantize float32 rows to GGUF blocks: (rows, cols) -> uint8 (rows, bytes_per_row).

    importance: llama.cpp's importance matrix for this tensor (float32, one value per column: the
    mean square of the activations each column multiplies, as llama-imatrix collects it), or None.
    With it, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS and the lattice i-quants minimise the
    importance-weighted error, as llama-quantize --imatrix does; the other types ignore it, as
    llama.cpp does. IQ2_XXS, IQ2_XS and IQ1_S refuse to run without it, as llama.cpp does.
    search: "reference" (llama.cpp's search, byte for byte) or "thorough": for Q4_0..Q5_1 and Q4_K..Q6_K,
    a wider search judged by the error of the stored block (weighted as the reference's search
    weights it; the legacy quants without an imatrix use the plain squared error), never worse than
    the reference on any block and several times slower; the blocks are standard ones. The other
    types run their reference quantizer.
    backend: "numpy", "ggml" (llama.cpp's C quantizer) or "auto" (ggml when importable). The thorough
    search is numpy's own: "auto" then runs numpy, and "ggml" refuses it. The lattice i-quants
    (IQ3_XXS..IQ1_M) have no numpy encoder: they always run llama.cpp's, and "numpy" refuses them.
    """
    cls = qtype(qtype_name)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D (rows, cols) array, got shape {x.shape}")
    rows, cols = x.shape
    check_row_length(cls, cols)
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance must hold one value per column ({cols}), got shape {importance.shape}")
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose {' or '.join(SEARCHES)}")
    if backend not in ("auto", "numpy", "ggml"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, numpy or ggml")
    if backend == "ggml" and not ggml.available():
        raise ValueError("backend='ggml' needs llama-cpp-python installed; use backend='numpy'")
    if backend == "ggml" and search != "reference":
        raise ValueError(
            f"backend='ggml' runs llama.cpp's reference search only; search={search!r} needs backend='numpy' or 'auto'"
        )
    if cls.c_only:
        if backend == "numpy" or not ggml.available():
            raise ValueError(
                f"{cls.name} is quantized by llama.cpp's C code only, which needs llama-cpp-python installed; "
                "use backend 'auto' or 'ggml'"
            )
        if importance is None and ggml.requires_imatrix(cls.ggml_type):
            raise ValueError(
                f"{cls.name} needs an importance matrix, as llama.cpp does: run `slim calibrate` first "
                "and pass its file with --imatrix"
            )
    use_c = cls.c_only or (search == "reference" and (backend == "ggml" or (backend == "auto" and ggml.available())))

    out = np.empty((rows, cls.row_bytes(cols)), dtype=np.uint8)
    step = max(1, _CHUNK_WEIGHTS // max(cols, 1))
    for start in range(0, rows, step):
        chunk = np.ascontiguousarray(x[start : start + step], dtype=np.float32)
        if use_c:
            out[start : start + step] = ggml.quantize_rows(chunk, cls.ggml_type, importance)
        else:
            out[start : start + step] = cls.quantize_rows(chunk, importance, search)
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


__all__ = [
    "QTYPES",
    "BY_GGML_TYPE",
    "SEARCHES",
    "QuantType",
    "qtype",
    "quantize",
    "dequantize",
    "check_row_length",
]
