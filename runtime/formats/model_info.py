"""What `slim show` and `slim list` tell about a GGUF, read from its header without loading it."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from slim.runtime.formats.gguf_file import fields, open_gguf


@dataclass
class ModelInfo:
    path: str
    name: str | None
    architecture: str
    parameters: int
    context_length: int | None
    size_bytes: int
    bits_per_weight: float
    tensor_types: dict[str, int]
    chat_template: str | None
    license: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(path: Path) -> ModelInfo:
    reader = open_gguf(path)
    meta = fields(reader)
    keys = gguf.Keys
    arch = str(meta.get(keys.General.ARCHITECTURE, "unknown"))
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    return ModelInfo(
        path=str(path),
        name=meta.get(keys.General.NAME),
        architecture=arch,
        parameters=n_params,
        context_length=meta.get(keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
        size_bytes=path.stat().st_size,
        bits_per_weight=8 * data_bytes / n_params if n_params else 0.0,
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        chat_template=meta.get(keys.Tokenizer.CHAT_TEMPLATE),
        license=meta.get(keys.General.LICENSE),
    )


def file_type_name(reader: gguf.GGUFReader) -> str | None:
    """Q4_K_M, Q8_0, F16, ... from general.file_type, when the GGUF records it."""
    field = reader.fields.get(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return None
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return None
