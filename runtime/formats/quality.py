"""What a quantized file lost, measured, carried inside the GGUF itself.

A file slim measured (`slim convert --target-size/--max-kld`, `slim eval --write-metadata`) holds
these keys, so `slim show`, `slim list` and the server's /v1/models can say how good it is without
running it again. Other GGUF readers ignore keys they do not know.

    slim.quality.kl_mean, slim.quality.kl_p99   KL(reference || this file) per token, nats
    slim.quality.perplexity                      this file's perplexity on the text
    slim.quality.reference_perplexity            the reference's, on the same tokens
    slim.quality.reference                       what the reference was ("F16 of the source")
    slim.quality.text, slim.quality.text_sha256  the text's name and the sha256 of its UTF-8 bytes
    slim.quality.ctx, slim.quality.tokens        chunk length and tokens scored (llama-perplexity's way)
    slim.quality.predicted_kl                    a measured plan's prediction before it was written
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from slim.runtime.files import atomic_path

PREFIX = "slim.quality."


@dataclass(frozen=True)
class Quality:
    kl_mean: float
    kl_p99: float
    perplexity: float
    reference_perplexity: float
    reference: str
    text: str
    text_sha256: str
    ctx: int
    tokens: int
    predicted_kl: float | None = None

    def metadata(self) -> dict[str, Any]:
        """The GGUF keys and values (None left out)."""
        return {PREFIX + key: value for key, value in asdict(self).items() if value is not None}

    def line(self) -> str:
        """One line for people: the numbers that decide whether the file is good enough."""
        return (
            f"KL {self.kl_mean:.4f} mean, {self.kl_p99:.4f} p99 vs {self.reference}; "
            f"PPL {self.perplexity:.3f} (reference {self.reference_perplexity:.3f}) "
            f"on {self.text}, {self.tokens} tokens at ctx {self.ctx}"
        )


def from_metadata(metadata: dict[str, Any]) -> Quality | None:
    """The measured quality a GGUF's metadata holds, or None when it holds none (or only part)."""
    values = {}
    for field in fields(Quality):
        key = PREFIX + field.name
        if key in metadata:
            values[field.name] = metadata[key]
        elif field.default is not None:  # a required key is missing: not slim's record
            return None
    try:
        return Quality(**values)
    except TypeError:
        return None


def read_quality(path: str | os.PathLike[str]) -> Quality | None:
    """The quality a GGUF records, read from its header alone; None without one, or for a file that
    is missing or damaged (whoever opens it next says what is wrong with it)."""
    try:
        stat = Path(path).stat()
        return _cached_quality(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=256)
def _cached_quality(path: str, mtime_ns: int, size: int) -> Quality | None:
    """read_quality's header read, once per version of a file (the server lists models often)."""
    from slim.runtime.formats.gguf_file import read_header

    return from_metadata(read_header(path).metadata)


def write_quality(source: str | os.PathLike[str], target: str | os.PathLike[str], quality: Quality) -> None:
    """Copy the GGUF `source` to `target` with the quality keys set (replacing any it had). The tensor
    data is copied as it is; target may be source (it is written beside it and renamed into place)."""
    import gguf
    import numpy as np

    from slim.runtime.formats.gguf_file import add_metadata_value, open_gguf

    reader = open_gguf(source)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    with atomic_path(Path(target)) as partial:
        writer = gguf.GGUFWriter(partial, arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name.startswith(("GGUF.", PREFIX)) or field.name == gguf.Keys.General.ARCHITECTURE:
                continue  # the header's own fields, and the keys written anew below
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(field.contents())
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        for key, value in quality.metadata().items():
            add_metadata_value(writer, key, value)
        for tensor in reader.tensors:
            writer.add_tensor_info(
                tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(np.asarray(tensor.data))
        writer.close()
