"""Reading GGUF files safely: checked before llama.cpp or numpy is handed anything.

llama.cpp trusts the file it loads; a truncated or forged GGUF can crash the process, and a file its
own reader accepts can still abort it (SIGABRT, taking a server with every loaded model along) in
the vocabulary or hyperparameter loader. `check_gguf` checks the magic, the version, every metadata
entry and tensor info as llama.cpp's reader does (tensor names, packed aligned offsets, shapes within
int64, each tensor's data inside the file), and what llama.cpp asserts on after it: the vocabulary
read as C strings without a repeat, its array types, and the layer and expert counts. Any failure
becomes one GGUFError with a message a user can act on. `open_gguf` adds gguf-py's full reader
for the commands that need tensor data.

`check_gguf` runs before `slim run`'s first token, so this module imports neither gguf-py nor numpy
nor slim.kernels at its top (about 0.2 s of start-up between them): the GGUF value types and tensor
block sizes the scanner needs are literals here, and tests/test_startup.py holds them equal to gguf-py's.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it: ggml's shape (ne, fastest first), type id, data bytes."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # scalars and strings; arrays are skipped
    tensors: list[TensorInfo]


def tensor_type_size(ggml_type: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml tensor type, without importing gguf-py."""
    return _TENSOR_TYPE_SIZES[ggml_type]


def check_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that `path` is a GGUF llama.cpp can be handed safely; return its scalar and string
    metadata (arrays are skipped). Raises GGUFError with one actionable line otherwise.

    Walks the header once: tens of milliseconds for a 50K-token vocabulary where gguf-py's reader
    takes seconds, which matters for `slim run`'s start-up."""
    return read_header(path).metadata


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """check_gguf's checks, returning the metadata and the tensor infos: what `slim show` and
    `slim list` need, without gguf-py materialising every vocabulary string."""
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


# Limits llama.cpp holds a file to (ggml.h GGML_MAX_NAME, llama-hparams.h LLAMA_MAX_LAYERS / LLAMA_MAX_EXPERTS),
# and slim's own cap on a metadata array: the largest real vocabularies and merge lists hold under a million entries,
# and a forged count of 10^8 would otherwise keep the scan (and llama.cpp's allocation) busy for minutes.
_MAX_TENSOR_NAME = 63
_MAX_LAYERS = 512
_MAX_EXPERTS = 1024
_MAX_ARRAY = 1 << 24
_INT64_MAX = (1 << 63) - 1
_INTEGER_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_ROPE_SCALING_TYPES = {"none", "linear", "yarn", "longrope"}
# The array types llama.cpp's vocabulary loader requires (it refuses others, but slim says so in words).
_VOCABULARY_TYPES = {
    "tokenizer.ggml.tokens": ({_STRING}, "strings"),
    "tokenizer.ggml.merges": ({_STRING}, "strings"),
    "tokenizer.ggml.scores": ({5, 6}, "float32 or int32 numbers"),
    "tokenizer.ggml.token_type": ({5}, "int32 numbers"),
}


def _scan_header(data: mmap.mmap, size: int) -> GGUFHeader:
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
    array_types: dict[str, int] = {}
    array_maxima: dict[str, int] = {}  # small integer arrays: per-layer hyperparameters
    for _ in range(n_kv):
        key = string()
        if not key:
            raise _Damaged("is damaged: a metadata key is empty")
        if key in metadata or key in array_types:
            raise _Damaged(f"is damaged: metadata {key!r} appears twice")
        (vtype,) = u32(data, take(4))
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            metadata[key] = struct.unpack_from(fmt, data, take(struct.calcsize(fmt)))[0]
        elif vtype == _STRING:
            metadata[key] = string()
        elif vtype == _ARRAY:
            (etype,) = u32(data, take(4))
            (count,) = u64(data, take(8))
            array_types[key] = etype
            if key in _VOCABULARY_TYPES and etype not in _VOCABULARY_TYPES[key][0]:
                what = _VOCABULARY_TYPES[key][1]
                raise _Damaged(f"is damaged: {key} should hold {what} but holds value type {etype}")
            if count > _MAX_ARRAY:
                raise _Damaged(
                    f"is damaged: metadata {key!r} claims {count} entries (slim accepts at most {_MAX_ARRAY})"
                )
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                start = take(count * struct.calcsize(fmt))
                if etype in _INTEGER_TYPES and 0 < count <= _MAX_LAYERS:
                    array_maxima[key] = max(struct.unpack_from(f"<{count}{fmt[1]}", data, start))
            elif etype == _STRING:
                if count * 8 > size - pos:
                    raise _Truncated
                if key == "tokenizer.ggml.tokens":
                    pos = _check_tokens(data, pos, count, size)
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
    _check_hyperparameters(metadata, array_maxima)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Damaged(f"is damaged: general.alignment {alignment!r} is not a power of two")
    names: set[str] = set()
    expected_offset = 0
    extents = []
    infos: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = string()
        if len(name.encode()) > _MAX_TENSOR_NAME:
            raise _Damaged(f"is damaged: a tensor name is {len(name.encode())} bytes (llama.cpp allows 63)")
        if name in names:
            raise _Damaged(f"is damaged: two tensors are named {name!r}")
        names.add(name)
        (n_dims,) = u32(data, take(4))
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Damaged(f"is damaged: tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", data, take(8 * n_dims))
        (ttype,) = u32(data, take(4))
        (offset,) = u64(data, take(8))
        if ttype not in _TENSOR_TYPE_SIZES:
            raise _Damaged(f"is damaged: tensor {name!r} has unknown type {ttype}")
        block, type_size = _TENSOR_TYPE_SIZES[ttype]
        n = 1
        for d in dims:
            n *= d
        if max(dims) > _INT64_MAX or n > _INT64_MAX:
            raise _Damaged(f"is damaged: tensor {name!r} has an impossible shape {list(dims)}")
        if dims[0] % block:
            raise _Damaged(f"is damaged: tensor {name!r} rows of {dims[0]} are not a multiple of its block of {block}")
        if offset % alignment:
            raise _Damaged(f"is damaged: tensor {name!r} is not aligned to {alignment} bytes")
        if offset != expected_offset:  # llama.cpp requires the tensors packed in order, each padded to the alignment
            raise _Damaged(f"is damaged: tensor {name!r} starts at offset {offset}, not {expected_offset}")
        nbytes = n // block * type_size
        expected_offset = offset + (nbytes + alignment - 1) // alignment * alignment
        extents.append((name, offset + nbytes))
        infos.append(TensorInfo(name, tuple(dims), ttype, nbytes))
    data_start = (pos + alignment - 1) // alignment * alignment
    for name, end in extents:
        if data_start + end > size:
            raise _Damaged(f"is truncated: tensor {name} ends past the end of the file")
    return GGUFHeader(metadata, infos)


def _check_tokens(data: mmap.mmap, pos: int, count: int, size: int) -> int:
    """Walk the vocabulary as llama.cpp reads it (a C string: cut at the first NUL byte, an empty one renamed
    "[EMPTY_i]"), refusing a token that repeats once read that way: llama.cpp aborts on it. Returns the end."""
    u64 = struct.Struct("<Q").unpack_from
    tokens = []
    for _ in range(count):  # the hot loop of `slim run`'s start-up: as few steps per token as can be
        (n,) = u64(data, pos)
        tokens.append(data[pos + 8 : pos + 8 + n])
        pos += 8 + n
    if pos > size:
        raise _Truncated
    if b"\0" in b"".join(tokens) or b"" in tokens:  # rare: read them as llama.cpp does
        tokens = [token.split(b"\0", 1)[0] or b"[EMPTY_%d]" % index for index, token in enumerate(tokens)]
    if len(set(tokens)) != count:
        seen: set[bytes] = set()
        for index, token in enumerate(tokens):
            if token in seen:
                shown = token.decode("utf-8", errors="replace")
                raise _Damaged(
                    f"is damaged: tokenizer.ggml.tokens lists the same token twice ({shown!r} at index {index}, "
                    "as llama.cpp reads it)"
                )
            seen.add(token)
    return pos


def _check_hyperparameters(metadata: dict[str, Any], array_maxima: dict[str, int]) -> None:
    """The hyperparameter ranges llama.cpp asserts on while loading (llama-model.cpp load_hparams): a value
    outside them aborts the whole process instead of failing the load."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        return

    def number(name: str) -> int | None:
        key = f"{arch}.{name}"
        value = array_maxima.get(key, metadata.get(key))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    layers = number("block_count")
    if layers is not None and not 1 <= layers <= _MAX_LAYERS:
        raise _Damaged(f"is damaged: {arch}.block_count is {layers} (llama.cpp accepts 1 to {_MAX_LAYERS} layers)")
    nextn = number("nextn_predict_layers")
    if nextn is not None and layers is not None and not 0 <= nextn <= layers:
        raise _Damaged(f"is damaged: {arch}.nextn_predict_layers {nextn} is more than its {layers} layers")
    experts = number("expert_count") or 0
    used = number("expert_used_count") or 0
    groups = number("expert_group_count") or 0
    groups_used = number("expert_group_used_count") or 0
    if not 0 <= experts <= _MAX_EXPERTS:
        raise _Damaged(f"is damaged: {arch}.expert_count is {experts} (llama.cpp accepts at most {_MAX_EXPERTS})")
    if experts == 0 and (used or groups):
        raise _Damaged(f"is damaged: it routes to {used} experts in {groups} groups but has no experts")
    if experts and not 0 < used <= experts:
        raise _Damaged(f"is damaged: {arch}.expert_used_count is {used} for {experts} experts")
    if experts and not 0 <= groups < experts:
        raise _Damaged(f"is damaged: {arch}.expert_group_count is {groups} for {experts} experts")
    if groups > 1 and (experts % groups or not 0 < groups_used < groups):
        raise _Damaged(f"is damaged: {experts} experts in {groups} groups, {groups_used} of them used, do not fit")
    for name in ("context_length", "embedding_length", "head_count", "head_count_kv"):
        value = number(name if name.endswith("length") else f"attention.{name}")
        if value is not None and not 0 <= value < 1 << 31:
            raise _Damaged(f"is damaged: {arch}.{name} is {value}")
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise _Damaged(f"is damaged: {arch}.rope.scaling.type {scaling!r} is none of {sorted(_ROPE_SCALING_TYPES)}")


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


def add_metadata_value(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    """One architecture metadata value, written with the GGUF type llama.cpp reads it as."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        writer.add_string(key, str(value))
