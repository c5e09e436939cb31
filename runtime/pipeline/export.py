"""slim export: a GGUF back to a Hugging Face checkpoint (config.json, model.safetensors, tokenizer).

Weights are dequantized tensor by tensor and streamed into one safetensors file; the Q/K RoPE
permutation is undone. The folder is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf

from slim import models
from slim.runtime.files import atomic_folder
from slim.runtime.formats.checkpoint import write_safetensors
from slim.runtime.formats.gguf_file import fields, open_gguf, tensor_array

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class ExportError(ValueError):
    """An export that cannot go ahead; the message says what to do."""


@dataclass
class ExportSummary:
    output: str
    architecture: str
    parameters: int
    dtype: str
    seconds: float
    size_bytes: int  # of the written weights (model.safetensors)

    def line(self) -> str:
        return (
            f"wrote {self.output}: {self.architecture}, {self.parameters / 1e6:.1f}M parameters "
            f"as {self.dtype} ({self.size_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def export(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: str = "F32",
    *,
    replace: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write the GGUF `source` as an HF checkpoint folder `output`. replace: an existing folder there
    is replaced (only once the new one is complete); progress(done, total) counts tensors."""
    from slim.runtime.formats.tokenizer import TokenizerError, write_hf_tokenizer

    started = time.perf_counter()
    dtype = dtype.upper()
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} is a file; give a folder name for the checkpoint")
    if output.is_dir() and any(output.iterdir()) and not replace:
        raise ExportError(f"{output} exists and is not empty; add --force to replace it")
    if not output.parent.is_dir():
        raise ExportError(f"output's parent folder {output.parent} does not exist; create it first")

    reader = open_gguf(source)
    meta = fields(reader)
    arch_cls = models.for_gguf_arch(str(meta.get(gguf.Keys.General.ARCHITECTURE)), meta)
    names = [t.name for t in reader.tensors]
    # Model-wide tensors with no checkpoint name are what the converter derived from config.json
    # (RoPE factors): the config is rebuilt from them, alongside the metadata.
    derived = {
        t.name: tensor_array(t)
        for t in reader.tensors
        if not t.name.startswith("blk.") and t.name not in arch_cls.global_tensors.values()
    }
    config = arch_cls.config_from_gguf({**meta, **derived}, has_output="output.weight" in names)
    config["torch_dtype"] = DTYPES[dtype]
    arch = arch_cls(config)

    exported = [t for t in reader.tensors if t.name not in derived]
    shapes = {
        hf_name: (shape, dtype)
        for t in exported
        for hf_name, shape in arch.hf_layout(t.name, tuple(int(n) for n in reversed(t.shape.tolist())))
    }
    n_params = sum(int(t.n_elements) for t in exported)

    def tensors() -> Iterator[tuple[str, Any]]:
        for done, tensor in enumerate(exported, 1):
            yield from arch.hf_tensors(tensor.name, tensor_array(tensor))
            if progress is not None:
                progress(done, len(exported))

    with atomic_folder(output, replace=replace) as partial:
        try:
            write_hf_tokenizer(reader, partial)
        except TokenizerError as exc:
            raise ExportError(str(exc)) from None
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_safetensors(partial / "model.safetensors", tensors(), shapes)
        size_bytes = (partial / "model.safetensors").stat().st_size
    return ExportSummary(str(output), arch.gguf_arch, n_params, dtype, time.perf_counter() - started, size_bytes)
