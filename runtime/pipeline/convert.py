"""slim convert: a Hugging Face checkpoint to one quantized GGUF, in one linear pass.

    read lazily (mmap) -> map names -> transform (Q/K permutation) -> quantize -> write

Tensor infos are known from the safetensors headers before any weight is read, so the GGUF
header is written first and each tensor's blocks are appended as soon as they are quantized.
A few tensors are in flight at once (one per worker thread); memory stays near that, not the
model. The file is written under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from slim import kernels, models
from slim.kernels import QTYPES
from slim.runtime.files import atomic_path
from slim.runtime.formats import mixes
from slim.runtime.formats.checkpoint import Checkpoint, CheckpointError, TensorRef, already_loaded
from slim.runtime.formats.gguf_file import add_metadata_value

if TYPE_CHECKING:
    from slim.runtime.pipeline.calibrate import Calibration


class ConvertError(ValueError):
    """A conversion that cannot go ahead; the message says what to do."""


@dataclass
class ConvertSummary:
    output: str
    type: str
    architecture: str
    parameters: int
    size_bytes: int
    bits_per_weight: float
    tensor_types: dict[str, int]
    seconds: float
    imatrix: str | None = None  # the importance matrix the weights were quantized with
    search: str = "reference"
    family: str = ""  # the model family, as slim.models names it ("Qwen3")

    def line(self) -> str:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        extras = "".join(
            [
                f", importance from {Path(self.imatrix).name}" if self.imatrix else "",
                f", {self.search} search" if self.search != "reference" else "",
            ]
        )
        return (
            f"wrote {self.output}: {self.family or self.architecture} {self.parameters / 1e6:.1f}M parameters, "
            f"{self.size_bytes / 1e6:.1f} MB, {self.bits_per_weight:.2f} bits/weight ({counts}{extras}) "
            f"in {self.seconds:.1f} s"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class PlannedTensor:
    """One tensor of the GGUF to write: its name, shape and type, and how to read its float32 values."""

    gguf_name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: str
    load: Callable[[], np.ndarray]
    importance: np.ndarray | None = None  # per input column (per expert and column), from the importance matrix

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        return rows * QTYPES[self.qtype].row_bytes(self.shape[-1])


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    quantization: mixes.Mix | mixes.TypePlan,
    *,
    backend: str = "auto",
    threads: int | None = None,
    allow_pickle: bool = False,
    imatrix: str | os.PathLike[str] | None = None,
    search: str = "reference",
    tensor_overrides: mixes.Overrides | None = None,
    progress: Callable[[int], object] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ConvertSummary:
    """Convert a local HF directory or a hub repo id to a GGUF.

    quantization: a mix (mixes.mix parses a --type name), planned here for this checkpoint as
    llama-quantize plans it, or a TypePlan made for this checkpoint already (slim qat plans before
    training, so the file gets exactly the types it trained for).
    imatrix: an importance matrix file (slim calibrate, llama-imatrix); the weights it covers are
    quantized as llama-quantize --imatrix quantizes them. search: "reference" (llama.cpp's
    scale search, byte-identical) or "thorough" (a wider search; standard blocks, lower error).
    tensor_overrides: llama-quantize's per-tensor flags (mixes.overrides parses them) for a mix.
    progress(n_bytes) is called as each tensor is written; on_plan(total_bytes) once before.
    """
    from slim.runtime.formats.tokenizer import TokenizerError, read_hf_tokenizer, write_to_gguf

    started = time.perf_counter()
    if not isinstance(quantization, (mixes.Mix, mixes.TypePlan)):
        raise TypeError(
            f"convert takes a mixes.Mix or mixes.TypePlan, not {quantization!r}; "
            "parse a --type name with mixes.mix(name)"
        )
    chosen = quantization if isinstance(quantization, mixes.Mix) else quantization.mix
    if search not in kernels.SEARCHES:
        raise ConvertError(f"unknown search {search!r}; choose {' or '.join(kernels.SEARCHES)}")
    if search == "thorough" and backend == "ggml":
        raise ConvertError("--search thorough runs slim's numpy kernels; drop --backend ggml")
    calibration = load_imatrix(imatrix) if imatrix is not None else None
    output = Path(output)
    if output.is_dir():
        raise ConvertError(f"{output} is a directory; give the output file name, e.g. {output / 'model.gguf'}")
    if not output.parent.is_dir():
        raise ConvertError(f"output directory {output.parent} does not exist; create it first")

    directory = resolve_source(source)
    checkpoint = Checkpoint(directory, allow_pickle=allow_pickle)
    arch = models.for_hf_config(checkpoint.config)
    try:
        tokenizer = read_hf_tokenizer(directory)
    except TokenizerError as exc:
        raise ConvertError(str(exc)) from None
    if tensor_overrides is not None and isinstance(quantization, mixes.TypePlan):
        raise ConvertError("per-tensor overrides apply to a --type mix, not to a TypePlan made already")
    planned = _plan(checkpoint, arch, quantization, calibration, tensor_overrides)

    with atomic_path(output) as partial:
        writer = gguf.GGUFWriter(partial, arch.gguf_arch)
        writer.add_name(checkpoint.config.get("_name_or_path") or directory.name)
        writer.add_type(gguf.GGUFType.MODEL)
        for key, value in arch.metadata().items():
            add_metadata_value(writer, key, value)
        writer.add_file_type(chosen.ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_to_gguf(tokenizer, writer, vocab_size=arch.vocab_size)
        for item in planned:
            writer.add_tensor_info(
                item.gguf_name,
                item.shape if chosen.name in mixes.FLOAT_MIXES else mixes.ggml_shape(item.shape),
                np.dtype(np.float32),
                item.nbytes,
                raw_dtype=gguf.GGMLQuantizationType[item.qtype],
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if on_plan:
            on_plan(sum(item.nbytes for item in planned))
        for _item, data in _quantized_in_order(planned, backend, search, threads or os.cpu_count() or 1):
            writer.write_tensor_data(data)
            if progress:
                progress(data.nbytes)
        writer.close()

    n_params = sum(item.n_elements for item in planned)
    counts: dict[str, int] = {}
    for item in planned:
        counts[item.qtype] = counts.get(item.qtype, 0) + 1
    size = output.stat().st_size
    return ConvertSummary(
        output=str(output),
        type=chosen.name,
        architecture=arch.gguf_arch,
        parameters=n_params,
        size_bytes=size,
        bits_per_weight=8 * sum(i.nbytes for i in planned) / n_params,
        tensor_types=counts,
        seconds=time.perf_counter() - started,
        imatrix=str(imatrix) if imatrix is not None else None,
        search=search,
        family=arch.family,
    )


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local directory as is; a hub repo id (owner/name) is fetched from the hub."""
    from slim.runtime.store.hub import download_checkpoint, is_repo_id

    path = Path(source)
    if path.exists():
        return path
    if not is_repo_id(str(source)):
        raise CheckpointError(f"{source} does not exist; pass a local model folder or a hub repo id like owner/name")
    return download_checkpoint(str(source))


def load_imatrix(path: str | os.PathLike[str]) -> Calibration:
    """An importance matrix file, with convert's error for a missing one."""
    from slim.runtime.pipeline.calibrate import Calibration

    if not Path(path).is_file():
        raise ConvertError(f"importance matrix {path} does not exist; make one with `slim calibrate`")
    return Calibration.load(path)


def planned_tensors(
    source: str | os.PathLike[str],
    quantization: mixes.Mix | mixes.TypePlan,
    calibration: Calibration | None = None,
    *,
    allow_pickle: bool = False,
) -> tuple[models.DecoderArchitecture, list[PlannedTensor]]:
    """The tensors convert would write for this source, typed and with their importance, none read
    yet: what slim's measured plans (pipeline/target.py) price and probe."""
    checkpoint = Checkpoint(resolve_source(source), allow_pickle=allow_pickle)
    arch = models.for_hf_config(checkpoint.config)
    return arch, _plan(checkpoint, arch, quantization, calibration)


def _plan(
    checkpoint: Checkpoint,
    arch: models.DecoderArchitecture,
    quantization: mixes.Mix | mixes.TypePlan,
    calibration: Calibration | None = None,
    tensor_overrides: mixes.Overrides | None = None,
) -> list[PlannedTensor]:
    """Every tensor the GGUF holds, with its type, in llama.cpp's order."""
    found: dict[str, PlannedTensor] = {}
    experts: dict[str, dict[int, TensorRef]] = {}
    for ref in checkpoint:
        slot = arch.expert_slot(ref.name)
        if slot is not None:
            experts.setdefault(slot[0], {})[slot[1]] = ref
            continue
        name = arch.gguf_name(ref.name)
        if name is not None:
            found[name] = PlannedTensor(name, ref.shape, "", _transformed(arch, name, ref))
    for name, refs in experts.items():
        found[name] = _stacked_experts(arch, name, refs)
    for name, array in arch.extra_tensors().items():
        found[name] = PlannedTensor(name, array.shape, "", already_loaded(array))
    _check_complete(arch, found)
    if isinstance(quantization, mixes.TypePlan):
        plan = quantization
        if plan.types.keys() != found.keys():
            raise ConvertError(
                f"the type plan was made for other tensors than this checkpoint's "
                f"({len(plan.types)} planned, {len(found)} found); plan it for this checkpoint"
            )
    else:
        plan = mixes.plan(
            {name: item.shape for name, item in found.items()},
            quantization,
            arch.n_layer,
            has_imatrix=calibration is not None,
            tensor_overrides=tensor_overrides,
        )
    for name, qtype in plan.types.items():
        found[name].qtype = qtype
    if calibration is not None:
        _attach_importance(found, calibration)
    return [found[name] for name in mixes.llama_order(list(found))]


def _attach_importance(found: dict[str, PlannedTensor], calibration: Calibration) -> None:
    """Give each weight the imatrix entry of the same name, as llama-quantize does (a stack of experts
    one row per expert). An entry whose length is not the weight's row length means the matrix was
    made for another model."""
    matched = 0
    for name, item in found.items():
        if not calibration.covers(name):
            continue
        importance = calibration.mean_squares(name)
        experts = item.shape[0] if len(item.shape) == 3 else None
        if importance.shape[-1] != item.shape[-1] or (importance.ndim == 2) != (experts is not None):
            raise ConvertError(
                f"the importance matrix has {calibration.columns(name)} columns for {name}, "
                f"which has {item.shape[-1]}: it was made for a different model"
            )
        if experts is not None and importance.shape[0] != experts:
            raise ConvertError(
                f"the importance matrix has {importance.shape[0]} experts for {name}, which has {experts}: "
                "it was made for a different model"
            )
        item.importance = importance
        matched += 1
    if not matched:
        raise ConvertError(
            "the importance matrix names none of this model's weights: it was made for a different model"
        )


def _transformed(arch: models.DecoderArchitecture, name: str, ref: TensorRef) -> Callable[[], np.ndarray]:
    return lambda: arch.to_gguf(name, ref.load())


def _stacked_experts(arch: models.DecoderArchitecture, name: str, refs: dict[int, TensorRef]) -> PlannedTensor:
    """One layer's matrix of every expert as llama.cpp's 3-D tensor (experts, rows, columns), read
    only when it is quantized: memory holds one layer's experts of one matrix, not the model's."""
    missing = [e for e in range(arch.n_expert) if e not in refs]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks expert {missing[0]} of {name} ({len(refs)} of {arch.n_expert} experts found); "
            "is the download complete?"
        )
    shapes = {refs[e].shape for e in range(arch.n_expert)}
    if len(shapes) != 1:
        raise CheckpointError(f"the experts of {name} differ in shape ({', '.join(map(str, sorted(shapes)))})")
    ordered = [refs[e] for e in range(arch.n_expert)]

    def load() -> np.ndarray:
        stack = np.empty((len(ordered), *ordered[0].shape), dtype=np.float32)
        for e, ref in enumerate(ordered):
            stack[e] = ref.load()
        return stack

    return PlannedTensor(name, (len(ordered), *ordered[0].shape), "", load)


def _check_complete(arch: models.DecoderArchitecture, found: dict[str, PlannedTensor]) -> None:
    missing = [name for name in arch.required_tensors() if name not in found]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors {arch.gguf_arch} needs, e.g. {missing[0]}; "
            "is the download complete?"
        )
    embd = found["token_embd.weight"].shape
    if embd[0] != arch.vocab_size:
        raise CheckpointError(f"token embedding has {embd[0]} rows but config.json says vocab_size {arch.vocab_size}")


def quantize_tensor(item: PlannedTensor, backend: str = "auto", search: str = "reference") -> np.ndarray:
    """The tensor's GGUF bytes in its planned type (flat uint8), with its importance where it has one."""
    array = np.asarray(item.load(), dtype=np.float32)
    if item.qtype == "F32" or array.ndim == 1:
        return np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint8)
    if item.importance is not None and item.importance.ndim == 2:  # experts, each with its own importance
        return np.concatenate(
            [
                kernels.quantize(expert, item.qtype, backend=backend, importance=weights, search=search).reshape(-1)
                for expert, weights in zip(array, item.importance, strict=True)
            ]
        )
    rows = array.reshape(-1, array.shape[-1])
    return kernels.quantize(rows, item.qtype, backend=backend, importance=item.importance, search=search).reshape(-1)


def _quantized_in_order(planned: list[PlannedTensor], backend: str, search: str, threads: int):
    """Yield (item, bytes) in order while up to `threads` tensors are quantized ahead."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[tuple[PlannedTensor, Future[np.ndarray]]] = []
        queue = iter(planned)
        for item in queue:
            pending.append((item, pool.submit(quantize_tensor, item, backend, search)))
            if len(pending) > threads:
                head, future = pending.pop(0)
                yield head, future.result()
        for head, future in pending:
            yield head, future.result()
