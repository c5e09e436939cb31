"""Reading GGUF files safely: checked before llama.cpp or numpy is handed anything.

llama.cpp trusts the file it loads; a truncated or forged GGUF can crash the process. `check_gguf`
checks the magic, the version, every metadata entry and tensor info, that each tensor's data lies
inside the file, and that no vocabulary token repeats (llama.cpp aborts on one), and turns any
failure into one GGUFError with a message a user can act on. `open_gguf` adds gguf-py's full reader
for the commands that need tensor data.

`check_gguf` runs before `slim run`'s first token, so this module imports neither gguf-py nor numpy
nor slim.kernels at its top (about 0.2 s of start-up between them): the GGUF value types and tensor
block sizes the scanner needs are literals here, and tests/test_startup.py holds them equal to gguf-py's.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf
    import numpy as np


class GGUFError(ValueError):
    """The file is missing, not a GGUF, or damaged."""


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A checked file, opened with gguf-py's reader (tensor data memory-mapped)."""
    import gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises assorted errors on damaged headers
        raise GGUFError(f"{path} is damaged: {exc.__class__.__name__}: {exc}") from None


# gguf.GGUFValueType: the struct format of each scalar type, and the two compound types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4

# gguf.GGML_QUANT_SIZES by type id: (weights per block, bytes per block).
_TENSOR_TYPE_SIZES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 40),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
    40: (64, 36),
    41: (128, 18),
}


def check_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that `path` is a GGUF llama.cpp can be handed safely; return its scalar and string
    metadata (arrays are skipped). Raises GGUFError with one actionable line otherwise.

    Walks the header once: tens of milliseconds for a 50K-token vocabulary where gguf-py's reader
    takes seconds, which matters for `slim run`'s start-up."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path} does not exist")
    if not path.is_file():
        raise GGUFError(f"{path} is not a file")
    size = path.stat().st_size
    if size < 24:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        raise GGUFError(f"{path} is truncated: {size} bytes is shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        try:
            return _scan_header(data, size)
        except (_Truncated, struct.error, OverflowError):
            raise GGUFError(f"{path} is damaged or truncated: its header runs past the end of the file") from None
        except _Damaged as exc:
            raise GGUFError(f"{path} {exc}") from None


class _Truncated(Exception):
    pass


class _Damaged(Exception):
    """Its message reads after the file name: "is damaged: ..." or "is truncated: ..."."""


def _scan_header(data: mmap.mmap, size: int) -> dict[str, Any]:
    u32, u64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
    pos = 4

    def take(n: int) -> int:
        nonlocal pos
        start = pos
        pos += n
        if pos > size:
            raise _Truncated
        return start

    def string() -> str:
        (n,) = u64(data, take(8))
        start = take(n)
        return bytes(data[start:pos]).decode("utf-8", errors="replace")

    (version,) = u32(data, take(4))
    if version not in (2, 3):
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            raise _Damaged("is a big-endian GGUF, which llama.cpp cannot read on this machine")
        raise _Damaged(f"is damaged or unsupported: GGUF version {version} (llama.cpp reads versions 2 and 3)")
    (n_tensors,) = u64(data, take(8))
    (n_kv,) = u64(data, take(8))
    if n_kv * 12 > size or n_tensors * 28 > size:
        raise _Truncated
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = u32(data, take(4))
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            metadata[key] = struct.unpack_from(fmt, data, take(struct.calcsize(fmt)))[0]
        elif vtype == _STRING:
            metadata[key] = string()
        elif vtype == _ARRAY:
            (etype,) = u32(data, take(4))
            (count,) = u64(data, take(8))
            if etype in _SCALARS:
                take(count * struct.calcsize(_SCALARS[etype]))
            elif etype == _STRING:
                if count * 8 > size - pos:
                    raise _Truncated
                if key == "tokenizer.ggml.tokens":  # llama.cpp aborts on a duplicate token
                    seen = set()
                    for _ in range(count):
                        (n,) = u64(data, pos)
                        seen.add(data[pos + 8 : pos + 8 + n])
                        pos += 8 + n
                    if len(seen) != count and pos <= size:
                        raise _Damaged("is damaged: tokenizer.ggml.tokens lists the same token twice")
                else:
                    for _ in range(count):  # the hot loop: one length read per string
                        (n,) = u64(data, pos)
                        pos += 8 + n
                if pos > size:
                    raise _Truncated
            else:
                raise _Damaged(f"is damaged: metadata {key!r} is an array of unsupported type {etype}")
        else:
            raise _Damaged(f"is damaged: metadata {key!r} has unknown value type {vtype}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Damaged(f"is damaged: general.alignment {alignment!r} is not a power of two")
    tensors = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = u32(data, take(4))
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Damaged(f"is damaged: tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", data, take(8 * n_dims))
        (ttype,) = u32(data, take(4))
        (offset,) = u64(data, take(8))
        if ttype not in _TENSOR_TYPE_SIZES:
            raise _Damaged(f"is damaged: tensor {name!r} has unknown type {ttype}")
        block, type_size = _TENSOR_TYPE_SIZES[ttype]
        if dims[0] % block:
            raise _Damaged(f"is damaged: tensor {name!r} rows of {dims[0]} are not a multiple of its block of {block}")
        n = 1
        for d in dims:
            n *= d
        if offset % alignment:
            raise _Damaged(f"is damaged: tensor {name!r} is not aligned to {alignment} bytes")
        tensors.append((name, offset, n // block * type_size))
    data_start = (pos + alignment - 1) // alignment * alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > size:
            raise _Damaged(f"is truncated: tensor {name} ends past the end of the file")
    return metadata


def fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata key as a plain Python value (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def tensor_array(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (ggml's ne reversed)."""
    import gguf
    import numpy as np

    from slim import kernels

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    name = tensor.tensor_type.name
    if name in kernels.QTYPES:
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return kernels.dequantize(np.asarray(tensor.data).reshape(-1).view(np.uint8), name, (rows, shape[-1])).reshape(
            shape
        )
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32).reshape(shape)
