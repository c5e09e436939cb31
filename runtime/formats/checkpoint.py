"""Hugging Face checkpoints on disk: config.json plus safetensors weights, read lazily.

safetensors is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes. Mapping the file and viewing those ranges reads only the
pages a tensor touches, so conversion memory stays near one tensor. The format is simple enough
that slim reads it directly: the safetensors package has no numpy view of bfloat16.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slim.runtime.files import atomic_open


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or in a format slim will not read."""


_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: `load()` reads it, as float32, only when called."""

    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


def already_loaded(array: np.ndarray) -> Callable[[], np.ndarray]:
    """The `load` of a tensor that is in memory already: it returns the array itself."""
    return lambda: array


def _mapped(path: Path, start: int, dtype: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        raw = np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=start, shape=shape or (1,))
        if dtype == "BF16":  # widen exactly: bfloat16 is the top half of a float32
            wide = raw.astype(np.uint32)
            wide <<= 16  # in place: a tensor-sized temporary less at the peak
            return wide.view(np.float32).reshape(shape)
        return np.asarray(raw, dtype=np.float32).reshape(shape)

    return load


class Checkpoint:
    """A local HF model directory: its config and an index of its tensors (no weights read)."""

    def __init__(self, directory: Path, *, allow_pickle: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(
                f"{self.directory} is not a directory; pass a Hugging Face model folder or a hub repo id"
            )
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.directory} has no config.json; is it a Hugging Face model folder?")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        self.tensors: dict[str, TensorRef] = {}
        files = sorted(self.directory.glob("*.safetensors"))
        if files:
            for path in files:
                for ref in _read_header(path):
                    self.tensors[ref.name] = ref
            self._check_index()
        elif list(self.directory.glob("*.bin")) or list(self.directory.glob("*.pt")):
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.directory} holds only pickled *.bin weights, which can run arbitrary code when "
                    "loaded; convert them to safetensors, or pass --allow-pickle if you trust the source"
                )
            self._pickled = sorted(self.directory.glob("*.bin")) + sorted(self.directory.glob("*.pt"))
            self._load_pickled()
        else:
            raise CheckpointError(f"{self.directory} has no *.safetensors weights")

    @property
    def dtypes(self) -> set[str]:
        return {ref.dtype for ref in self.tensors.values()}

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def _check_index(self) -> None:
        """Sharded checkpoints list every tensor in model.safetensors.index.json: all must be present."""
        index = self.directory / "model.safetensors.index.json"
        if not index.is_file():
            return
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        missing = sorted(set(weight_map) - set(self.tensors))
        if missing:
            shards = sorted({weight_map[name] for name in missing})
            raise CheckpointError(
                f"{len(missing)} tensors listed in the index are missing; is {', '.join(shards)} downloaded?"
            )

    def _load_pickled(self) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError("reading pickled *.bin weights needs torch: pip install 'slim-llm[train]'") from None
        for path in self._pickled:
            for name, tensor in torch.load(path, map_location="cpu", weights_only=False).items():
                array = tensor.float().numpy()
                self.tensors[name] = TensorRef(name, "F32", tuple(array.shape), already_loaded(array))


# The safetensors library's own cap on the JSON header; real headers are a few hundred kilobytes.
MAX_HEADER_BYTES = 100_000_000


def _read_header(path: Path) -> list[TensorRef]:
    """The tensors of one safetensors file, each checked as the format requires: a known dtype, a shape whose
    byte size matches its range (computed without int64 wrap-around), ranges inside the file that do not overlap."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is truncated (only {size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path.name} claims a {header_len}-byte header (the limit is {MAX_HEADER_BYTES}); "
                "it is damaged or not a safetensors file"
            )
        if header_len > size - 8:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file; download it again")
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_no_duplicate_keys)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, _DuplicateKey):
            raise CheckpointError(f"{path.name} has a corrupt safetensors header; download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header (not a JSON object); download it again")
    data_start = 8 + header_len
    refs = []
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, entry)
        if data_start + end > size:
            raise CheckpointError(
                f"{path.name} is truncated: tensor {name} ends past the end of the file; download it again"
            )
        expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path.name}: tensor {name} has {end - begin} bytes for shape {shape}")
        ranges.append((begin, end, name))
        refs.append(TensorRef(name, dtype, shape, _mapped(path, data_start + begin, dtype, shape)))
    ranges.sort()
    for (_, end, name), (begin, _, other) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path.name} is damaged: tensors {name} and {other} overlap; download it again")
    return refs


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


def _entry(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or a CheckpointError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header (entry {name}); download it again")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{path.name}: tensor {name} has dtype {dtype!r}, which slim does not read")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(n) for n in shape)):
        raise CheckpointError(f"{path.name}: tensor {name} has an invalid shape {shape!r}; download it again")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise CheckpointError(f"{path.name}: tensor {name} has invalid data_offsets {offsets!r}; download it again")
    if math.prod(max(n, 1) for n in shape) * 8 >= 1 << 63:  # numpy cannot even describe it, empty or not
        raise CheckpointError(f"{path.name}: tensor {name} has an impossible shape {shape}; download it again")
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{path.name}: tensor {name} has data_offsets {offsets} out of order; download it again")
    return dtype, tuple(shape), begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, np.ndarray]], shapes: dict[str, tuple[tuple[int, ...], str]]
) -> None:
    """Stream tensors into one safetensors file: the header first (from `shapes`), then each tensor
    as it is produced, so only one is in memory. `shapes` maps name -> (shape, dtype name), in order."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, array in tensors:
            shape, dtype = shapes[name]
            assert tuple(array.shape) == tuple(shape), (name, array.shape, shape)
            f.write(_encode(array, dtype).tobytes())


def _encode(array: np.ndarray, dtype: str) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "F32":
        return array
    if dtype == "F16":
        return array.astype(np.float16)
    bits = array.view(np.uint32)  # BF16: round to nearest even on the dropped 16 bits
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
