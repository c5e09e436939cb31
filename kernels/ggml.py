"""The C fast path: ggml's own quantizer in the libggml-base that llama-cpp-python installs.

It is the same code slim's numpy kernels are tested against, called through ctypes on rows of
float32. `available()` is False when llama-cpp-python is not importable; callers then fall back
to numpy.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np


class _TypeTraits(ctypes.Structure):
    """ggml's struct ggml_type_traits (ggml.h), for its to_float: the C dequantizer of a type."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def library() -> ctypes.CDLL | None:
    """llama-cpp-python's libggml-base (its quantizer, and ggml's op names for slim calibrate), or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib_dir = Path(spec.origin).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    return library() is not None


def row_size(ggml_type: int, n_per_row: int) -> int:
    lib = library()
    assert lib is not None, "libggml-base is not available"
    return int(lib.ggml_row_size(ggml_type, n_per_row))


def quantize_rows(rows: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> np.ndarray:
    """(nrows, n_per_row) float32 -> (nrows, row bytes) uint8 via ggml_quantize_chunk.

    importance: the imatrix for the row's columns (float32, n_per_row), as llama-quantize passes it;
    the types whose C quantizer has no imatrix path ignore it. ggml_quantize_chunk releases the GIL
    under ctypes, so callers may run it from threads.
    """
    lib = library()
    assert lib is not None, "libggml-base is not available"
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        assert importance.shape == (n_per_row,), (importance.shape, n_per_row)
    imatrix = None if importance is None else importance.ctypes.data
    out = np.empty((nrows, lib.ggml_row_size(ggml_type, n_per_row)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(ggml_type, rows.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, imatrix)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def requires_imatrix(ggml_type: int) -> bool:
    """llama.cpp refuses to quantize this type without an importance matrix (its C code asserts one)."""
    lib = library()
    assert lib is not None, "libggml-base is not available"
    return bool(lib.ggml_quantize_requires_imatrix(ggml_type))


def dequantize_rows(data: np.ndarray, ggml_type: int, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """(rows, row bytes) uint8 -> float32 `shape` via ggml's own dequantizer (the type's to_float):
    the oracle for slim's numpy dequantizers. type_name guards against a libggml whose type numbers differ."""
    lib = library()
    assert lib is not None, "libggml-base is not available"
    traits = lib.ggml_get_type_traits(ggml_type).contents
    assert traits.type_name.decode().upper() == type_name, (traits.type_name, type_name)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty(shape, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data, out.size)
    return out
