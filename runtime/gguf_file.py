"""Reading GGUF files safely: checked before llama.cpp or numpy is handed anything.

llama.cpp trusts the file it loads; a truncated or forged GGUF can crash the process. `open_gguf`
checks the magic, the version, and that every tensor's data lies inside the file, and turns any
failure into one GGUFError with a message a user can act on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from slim import kernels


class GGUFError(ValueError):
    """The file is missing, not a GGUF, or damaged."""


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises assorted errors on damaged headers
        raise GGUFError(f"{path} is damaged or truncated: {exc.__class__.__name__}: {exc}") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    return reader


def fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata key as a plain Python value (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def tensor_array(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (ggml's ne reversed)."""
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    name = tensor.tensor_type.name
    if name in kernels.QTYPES:
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return kernels.dequantize(np.asarray(tensor.data).reshape(-1).view(np.uint8), name, (rows, shape[-1])).reshape(shape)
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32).reshape(shape)
