"""slim qat: quantization-aware training, so the 4-bit weights lose less than post-training rounding.

Each weight the --type mix quantizes is quantized once, post-training, by slim.kernels; its blocks
fix a grid per group of weights (slim.kernels.grid: y = step * q + offset, q an integer in a range).
The grid is frozen. Training keeps float weights w, and the forward pass uses them rounded onto it,

    y = step * clamp(round((w - offset) / step), low, high) + offset

with a straight-through gradient (dy/dw taken as 1), against the teacher distribution of the
unquantized model (slim.runtime.train.distill, offline: top-k of an F16 GGUF of the source). At export the
final codes go back into the same blocks, only the code bits changing, so the GGUF dequantizes to
exactly the weights the last forward pass used: there is no second rounding.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from slim import kernels
from slim.kernels import grid as grids
from slim.runtime.files import atomic_path
from slim.runtime.formats import mixes
from slim.runtime.train import student as student_lib
from slim.runtime.train.distill import (
    DistillError,
    Options,
    Summary,
    Targets,
    Validation,
    check_vocabulary,
    checkpoint_path,
    gguf_tokens,
    split_heldout,
    summarize,
    teacher_targets,
    train,
)


class _RoundToGrid(torch.autograd.Function):
    """Forward: the weights rounded onto the grid. Backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, on_grid: OnGrid) -> torch.Tensor:
        return on_grid.values(on_grid.codes(w))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class OnGrid(nn.Module):
    """A parametrization that puts a (rows, cols) weight onto a frozen quantization grid."""

    step: torch.Tensor
    offset: torch.Tensor
    divisor: torch.Tensor

    def __init__(self, grid: grids.Grid):
        super().__init__()
        self.register_buffer("step", torch.from_numpy(grid.step)[:, :, None])
        self.register_buffer("offset", torch.from_numpy(grid.offset)[:, :, None])
        # a group whose step is 0 (an all-zero block) keeps its offset whatever the code
        self.register_buffer("divisor", torch.where(self.step == 0, 1.0, self.step))
        self.group, self.low, self.high = grid.group, grid.low, grid.high

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer code of each weight (as float32), shaped (rows, groups, group)."""
        grouped = w.detach().reshape(w.shape[0], -1, self.group)
        return torch.round((grouped - self.offset) / self.divisor).clamp_(self.low, self.high)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """step * q + offset, two float32 operations exactly as the dequantizers do them."""
        return (self.step * codes + self.offset).reshape(codes.shape[0], -1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _RoundToGrid.apply(w, self)


def type_plan(model: student_lib.Decoder, mix: mixes.Mix, has_imatrix: bool = False) -> mixes.TypePlan:
    """The GGUF type of every tensor of the model's GGUF (llama-quantize's rules), planned once:
    the grids are made for these types, and convert writes the file with exactly them."""
    arch = model.arch
    shapes = arch.gguf_shapes({name: tuple(tensor.shape) for name, tensor in model.hf_state().items()})
    shapes.update((name, array.shape) for name, array in arch.extra_tensors().items())
    return mixes.plan(shapes, mix, arch.n_layer, has_imatrix=has_imatrix)


def attach_grids(
    model: student_lib.Decoder, plan: mixes.TypePlan, calibration: Any = None, search: str = "reference"
) -> dict[str, tuple[str, str, np.ndarray]]:
    """Quantize each weight the plan quantizes (post-training with the kernels' `search`,
    importance-weighted where the calibration, a slim.runtime.pipeline.calibrate.Calibration, covers
    it), freeze its grid, and make the forward pass use the weight rounded onto it. Returns HF name
    -> (GGUF name, type, initial blocks)."""
    # GGUF name -> its checkpoint weights: one, or every expert's in expert order for a stack of experts
    hf_names: dict[str, list[str]] = {}
    for name in model.hf_state():
        gguf_name = model.arch.gguf_name(name)
        if gguf_name is not None:
            hf_names.setdefault(gguf_name, []).append(name)
    attached = {}
    for gguf_name, qtype in plan.types.items():
        if qtype not in grids.TYPES:
            continue
        importance = None
        if calibration is not None and calibration.covers(gguf_name):
            importance = calibration.mean_squares(gguf_name)
        for expert, name in enumerate(hf_names[gguf_name]):
            own = importance[expert] if importance is not None and importance.ndim == 2 else importance
            attached[name] = _attach(model, name, gguf_name, qtype, own, search)
    return attached


def _attach(
    model: student_lib.Decoder, name: str, gguf_name: str, qtype: str, importance: np.ndarray | None, search: str
) -> tuple[str, str, np.ndarray]:
    """One weight of attach_grids: quantized, its grid frozen and put in its forward pass."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, attr).detach().numpy()
    blocks = kernels.quantize(weight, qtype, importance=importance, search=search)
    grid, codes = grids.grid(blocks, qtype, weight.shape)
    on_grid = OnGrid(grid)
    with torch.no_grad():
        # The quantizer's codes are not always the nearest ones on the stored grid (its searches,
        # the float16 rounding of the scales): a weight whose nearest code differs starts on the
        # quantizer's grid point, so training starts from exactly the post-training model.
        latent = getattr(module, attr)
        initial = torch.from_numpy(codes.reshape(on_grid.step.shape[0], -1, grid.group).astype(np.float32))
        differs = (on_grid.codes(latent) != initial).reshape(latent.shape)
        latent[differs] = on_grid.values(initial)[differs]
    parametrize.register_parametrization(module, attr, on_grid)
    return gguf_name, qtype, blocks


def final_blocks(model: student_lib.Decoder, attached: dict[str, tuple[str, str, np.ndarray]]) -> dict[str, np.ndarray]:
    """GGUF name -> the blocks holding the codes the last forward pass used, in llama.cpp's row order."""
    out: dict[str, np.ndarray] = {}
    for name, (gguf_name, qtype, blocks) in attached.items():
        module_name, _, attr = name.rpartition(".")
        on_grid, original = _attached_grid(model.get_submodule(module_name), attr)
        codes = on_grid.codes(original).reshape(original.shape).to(torch.int16).numpy()
        trained = model.arch.to_gguf(gguf_name, grids.with_codes(blocks, qtype, codes))
        # a stack of experts: each expert's blocks after the previous one's (attach_grids goes in expert order)
        out[gguf_name] = np.concatenate([out[gguf_name], trained]) if gguf_name in out else trained
    return out


def _attached_grid(module: nn.Module, attr: str) -> tuple[OnGrid, torch.Tensor]:
    """The OnGrid attach_grids registered on module.attr, and the latent float weight it rounds."""
    registered = module.parametrizations
    parametrizations = registered[attr] if isinstance(registered, nn.ModuleDict) else None
    if not isinstance(parametrizations, parametrize.ParametrizationList) or not isinstance(parametrizations[0], OnGrid):
        raise TypeError(f"{type(module).__name__}.{attr} has no quantization grid; attach_grids puts one there")
    return parametrizations[0], parametrizations.original


def write_gguf(
    model: student_lib.Decoder,
    source: Path,
    blocks: dict[str, np.ndarray],
    plan: mixes.TypePlan,
    output: Path,
    imatrix: Path | None = None,
) -> None:
    """The trained model as a GGUF of the plan's types: slim convert writes the file (metadata,
    tokenizer, F32 tensors from the trained weights), then every quantized tensor's data is replaced
    by the trained blocks, which have the same type and size."""
    from slim.runtime.formats.gguf_file import open_gguf
    from slim.runtime.pipeline.convert import convert

    with (
        tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp,
        atomic_path(output) as partial,
    ):
        student_lib.save(model, source, Path(tmp) / "hf")
        convert(Path(tmp) / "hf", partial, plan, imatrix=imatrix)  # imatrix: each weight's importance
        placed = {t.name: (t.data_offset, t.n_bytes, t.tensor_type.name) for t in open_gguf(partial).tensors}
        with open(partial, "r+b") as f:
            for name, data in blocks.items():
                offset, n_bytes, _ = placed[name]
                assert data.nbytes == n_bytes, (name, data.nbytes, n_bytes)
                f.seek(offset)
                f.write(np.ascontiguousarray(data).tobytes())


def qat(
    source: str | os.PathLike[str],
    mix: mixes.Mix,
    text: str,
    output: str | os.PathLike[str],
    *,
    teacher: str | os.PathLike[str] | None = None,
    imatrix: str | os.PathLike[str] | None = None,
    search: str = "thorough",
    eval_text: str | None = None,
    eval_every: int | None = None,
    patience: int = 3,
    holdout: float = 0.1,
    resume: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    teacher_progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Summary:
    """Quantization-aware training of the HF checkpoint `source` for a quantized mix; writes
    the GGUF `output`. teacher: a GGUF of the unquantized model (default: `source` converted to F16).
    imatrix: an importance matrix (slim calibrate) for the initial quantization; search: the kernels'
    scale search for it ("thorough", the best post-training start slim can make, or "reference").

    Training is validated on text it does not train on: `eval_text` if given, else the last
    `holdout` fraction of `text`'s sequences, scored every `eval_every` steps (default: a tenth of
    the steps); the state closest to the teacher there is kept, the starting one included, and
    training stops after `patience` scores without progress. options: see
    slim.runtime.train.distill.Options (alpha defaults to 1 here: the goal is closeness to the
    unquantized model, not to the training text)."""
    from slim.runtime.pipeline.convert import convert, load_imatrix, resolve_source

    started = time.perf_counter()
    settings = Options(**{"alpha": 1.0, **options})
    settings.check()
    if mix.name in mixes.FLOAT_MIXES:
        raise DistillError(f"{mix.name} is not quantized; QAT needs a quantized --type such as Q4_K_M")
    if search not in kernels.SEARCHES:
        raise DistillError(f"unknown search {search!r}; choose {' or '.join(kernels.SEARCHES)}")
    if not 0 < holdout < 1 or patience < 1 or (eval_every is not None and eval_every < 1):
        raise DistillError("the held-out fraction must lie in 0..1, patience and eval-every be at least 1")
    output = Path(output)
    if output.is_dir():
        raise DistillError(f"{output} is a directory; give the output file name, e.g. {output / 'model.gguf'}")
    if not output.parent.is_dir():
        raise DistillError(f"output directory {output.parent} does not exist; create it first")
    if resume and not checkpoint_path(output).is_file():
        raise DistillError(f"--resume: there is no checkpoint {checkpoint_path(output)} to resume from")
    source = resolve_source(source)
    calibration = load_imatrix(imatrix) if imatrix is not None else None
    if settings.threads:
        torch.set_num_threads(settings.threads)

    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.teacher.") as tmp:
        if teacher is None:
            teacher = Path(tmp) / "teacher-f16.gguf"
            convert(source, teacher, mixes.MIXES["F16"])
        teacher = Path(teacher)
        check_vocabulary(source, gguf_tokens(teacher))

        def targets_of(some_text: str, report: Callable[[int, int], None] | None) -> Targets:
            return teacher_targets(
                teacher,
                some_text,
                settings.seq_len,
                settings.top_k,
                threads=settings.threads,
                cache_dir=Path(cache_dir) if cache_dir else None,
                progress=report,
            )

        targets = targets_of(text, teacher_progress)
        if eval_text is not None:
            heldout = targets_of(eval_text, None)
        else:
            targets, heldout = split_heldout(targets, holdout)

    validation = Validation(heldout, eval_every or max(1, settings.steps // 10), patience)
    model = student_lib.load(source)
    plan = type_plan(model, mix, has_imatrix=calibration is not None)
    attached = attach_grids(model, plan, calibration, search)
    losses = train(
        model, targets, settings, checkpoint_path(output), resume=resume, progress=progress, validation=validation
    )
    write_gguf(
        model, source, final_blocks(model, attached), plan, output, Path(imatrix) if imatrix is not None else None
    )
    return summarize(output, settings, losses, started, validation=validation)
