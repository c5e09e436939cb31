"""What `slim show` and `slim list` tell about a GGUF, read from its header without loading it.

The header is walked by gguf_file.read_header, which skips over the vocabulary arrays: gguf-py's
reader would decode every token and merge first (seconds for a 128K vocabulary)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from slim import models
from slim.runtime.formats.gguf_file import GGUFHeader, read_header
from slim.runtime.formats.quality import from_metadata


@dataclass
class ModelInfo:
    path: str
    name: str | None
    architecture: str
    file_type: str | None
    parameters: int
    context_length: int | None
    size_bytes: int
    bits_per_weight: float
    tensor_types: dict[str, int]
    chat_template: str | None
    license: str | None
    family: str | None  # slim.models' name for the architecture; None for one slim does not convert
    facts: dict[str, str]  # family-specific: rope scaling, sliding window, head size, ...
    quality: dict[str, Any] | None = None  # the measured quality the file records (formats.quality)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(path: Path) -> ModelInfo:
    header = read_header(path)
    meta = header.metadata
    keys = gguf.Keys
    arch = str(meta.get(keys.General.ARCHITECTURE, "unknown"))
    n_params = sum(t.n_elements for t in header.tensors)
    try:
        family = models.for_gguf_arch(arch, meta)
    except models.ArchitectureError:
        family = None
    facts = family.gguf_facts(meta, {t.name for t in header.tensors}) if family else {}
    data_bytes = sum(t.n_bytes for t in header.tensors)
    return ModelInfo(
        path=str(path),
        name=meta.get(keys.General.NAME),
        architecture=arch,
        file_type=file_type(header),
        parameters=n_params,
        context_length=meta.get(keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
        size_bytes=path.stat().st_size,
        bits_per_weight=8 * data_bytes / n_params if n_params else 0.0,
        tensor_types=dict(Counter(_type_name(t.type_id) for t in header.tensors).most_common()),
        chat_template=meta.get(keys.Tokenizer.CHAT_TEMPLATE),
        license=meta.get(keys.General.LICENSE),
        family=facts.pop("family", None),
        facts=facts,
        quality=asdict(quality) if (quality := from_metadata(meta)) else None,
    )


def file_type(header: GGUFHeader) -> str | None:
    """Q4_K_M, Q8_0, F16, ... from general.file_type; for a GGUF that does not record it, the
    type most of its weights have (by bytes); None for a GGUF without tensors."""
    recorded = header.metadata.get(gguf.Keys.General.FILE_TYPE)
    if isinstance(recorded, int):
        try:
            return gguf.LlamaFileType(recorded).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    by_bytes: Counter[str] = Counter()
    for tensor in header.tensors:
        by_bytes[_type_name(tensor.type_id)] += tensor.n_bytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def file_type_name(path: str | os.PathLike[str]) -> str | None:
    """file_type of the GGUF at `path` (checked as check_gguf checks it)."""
    return file_type(read_header(path))


def _type_name(type_id: int) -> str:
    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return str(type_id)
