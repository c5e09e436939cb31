"""slim prune: remove what a model barely uses, from one Hugging Face checkpoint into another.

Unstructured pruning (magnitude, Wanda) zeroes single weights: each output row loses its lowest
scoring fraction, or all but N of every M input columns. The matrices keep their shapes, so a
dense GGUF is no smaller; it is a quality study and a starting point for sparse formats.
Wanda scores |W_ij| * ||X_j||_2 with X_j the j-th input column's activations over a calibration
text; the sums of x_j^2 are exactly what `slim calibrate` (llama.cpp's imatrix) records.

Structured pruning removes whole blocks, FFN neurons and attention heads: the result is a smaller
model of the same architecture, which transformers and llama.cpp load and which runs faster.
- Blocks: the calibration pass records the mean cosine similarity between the hidden states
  entering and leaving every block; the run of K consecutive blocks whose removal moves the hidden
  state least (angular distance) goes, or the K blocks that each change it least (block influence).
- Width: neuron j of a gated FFN reaches the output only through column j of down_proj, so its
  importance is E[a_j^2] * ||W_down[:, j]||^2 (a_j: ffn_down's input); a KV group's importance sums
  the same quantity over o_proj's columns of its query heads. Every block keeps the same count.

`prune_checkpoint` is the one function the rest builds on: HF directory in, HF directory out.
`prune_model` is the whole of `slim prune` around it: source resolution, calibration, healing,
conversion to GGUF and evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from slim import models
from slim.kernels import QTYPES
from slim.models.base import IGNORED
from slim.runtime.files import atomic_folder, move_into_place
from slim.runtime.formats import mixes
from slim.runtime.formats.checkpoint import Checkpoint, TensorRef, write_safetensors
from slim.runtime.pipeline import Progress
from slim.runtime.pipeline.calibrate import Calibration

UNSTRUCTURED = ("magnitude", "wanda")
METHODS = UNSTRUCTURED + ("layers", "width", "experts")
LAYER_SCORES = ("angular", "influence")
# Kept FFN widths are a multiple of this when the original is, so 32-weight quant blocks still fit.
WIDTH_STEP = 32
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class PruneError(ValueError):
    """Pruning that cannot go ahead; the message says what to change."""


def block_matrices(arch: models.DecoderArchitecture) -> tuple[str, ...]:
    """The matrices inside a block, by their Hugging Face suffix (the family's, fused ones included,
    and every expert's; not a mixture's routers): what unstructured pruning touches."""
    own = tuple(
        hf
        for hf, gguf_name in arch.layer_tensors.items()
        if hf.endswith(".weight") and "norm" not in gguf_name and not gguf_name.startswith("ffn_gate_inp")
    )
    experts = tuple(f"{arch.experts_module}.{e}.{hf}" for e in range(arch.n_expert) for hf in arch.expert_tensors)
    return own + experts


@dataclass
class Plan:
    """What to remove. Unstructured: a scoring method and a sparsity or N:M pattern. Structured:
    the blocks to drop and, per kept block (original index), the FFN neurons and KV groups to keep."""

    method: str
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None
    column_norms: dict[str, np.ndarray] = field(default_factory=dict)  # Wanda: GGUF name -> ||X_j||_2
    removed_blocks: list[int] = field(default_factory=list)
    block_scores: dict[int, float] = field(default_factory=dict)  # what chose them (lower: less needed)
    ffn_kept: dict[int, np.ndarray] = field(default_factory=dict)
    kv_kept: dict[int, np.ndarray] = field(default_factory=dict)
    experts_kept: dict[int, np.ndarray] = field(default_factory=dict)  # per block, the experts that stay
    expert_scores: dict[int, np.ndarray] = field(default_factory=dict)  # each expert's share of the routing

    def describe(self, arch: models.DecoderArchitecture) -> str:
        if self.method in UNSTRUCTURED:
            amount = (
                f"{self.sparsity:.0%} of each row" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
            )
            return (
                f"{self.method}: zero {amount} in the {len(block_matrices(arch))} matrices of each of "
                f"{arch.n_layer} blocks"
            )
        if self.method == "layers":
            blocks = ", ".join(
                f"{i} ({self.block_scores[i]:.4f})" if i in self.block_scores else str(i) for i in self.removed_blocks
            )
            return f"layers: remove blocks {blocks}; {arch.n_layer} -> {arch.n_layer - len(self.removed_blocks)} blocks"
        if self.method == "experts":
            kept = len(next(iter(self.experts_kept.values())))
            fewer_used = f", {arch.n_expert_used} -> {kept} used per token" if kept < arch.n_expert_used else ""
            removed = []
            for block, kept_ in self.experts_kept.items():
                dropped = np.setdiff1d(np.arange(arch.n_expert), kept_)
                share = self.expert_scores[block][dropped].sum()
                removed.append(f"block {block}: {', '.join(map(str, dropped))} ({share:.1%} of its routing)")
            return f"experts: {arch.n_expert} -> {kept} per block{fewer_used}; removed {'; '.join(removed)}"
        parts = []
        if self.ffn_kept:
            parts.append(f"FFN {arch.ffn} -> {len(next(iter(self.ffn_kept.values())))} neurons")
        if self.kv_kept:
            groups = len(next(iter(self.kv_kept.values())))
            per_group = arch.n_head // arch.n_head_kv
            parts.append(
                f"attention heads {arch.n_head} -> {groups * per_group} (KV groups {arch.n_head_kv} -> {groups})"
            )
        return "width: " + ", ".join(parts) + " in every block"


@dataclass
class PruneSummary:
    output: str
    method: str
    removed: str
    parameters_before: int
    parameters_after: int
    zeroed: int  # zero weights in the block matrices after unstructured pruning
    block_weights: int  # weights in the block matrices
    size_bytes: int


# ---- choosing what to remove ------------------------------------------------------------------


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive input columns."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise PruneError(f"--pattern must look like N:M, e.g. 2:4, not {text!r}") from None
    if not 1 <= n < m:
        raise PruneError(f"--pattern {text}: N must be at least 1 and smaller than M (it keeps N of every M weights)")
    return n, m


def check_amounts(
    arch: models.DecoderArchitecture,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    remove: int | None = None,
    ffn: float = 1.0,
    heads: float = 1.0,
    keep: int | None = None,
) -> None:
    """Refuse amounts the model cannot take, before any calibration is spent on them."""
    if method in UNSTRUCTURED:
        if (sparsity is None) == (pattern is None):
            raise PruneError(f"--method {method} needs --sparsity S or --pattern N:M (one of them)")
        if sparsity is not None and not 0 <= sparsity < 1:
            raise PruneError(f"--sparsity must be in [0, 1) (the fraction of each row to zero), got {sparsity}")
        row_lengths = {arch.hidden, arch.expert_ffn or arch.ffn, arch.n_head * arch.head_dim}
        if pattern is not None and any(length % pattern[1] for length in row_lengths):
            raise PruneError(
                f"--pattern {pattern[0]}:{pattern[1]}: M={pattern[1]} does not divide every row length "
                f"of this model ({', '.join(map(str, sorted(row_lengths)))})"
            )
    elif method == "layers":
        if remove is None or not 1 <= remove < arch.n_layer:
            raise PruneError(
                f"--remove must be between 1 and {arch.n_layer - 1} (the model has {arch.n_layer} blocks), got {remove}"
            )
    elif method == "width":
        for label, fraction in (("--ffn", ffn), ("--heads", heads)):
            if not 0 < fraction <= 1:
                raise PruneError(f"{label} is the fraction to keep, in (0, 1]; got {fraction}")
        if ffn == 1 and heads == 1:
            raise PruneError("--method width needs --ffn F or --heads H below 1 (the fraction to keep)")
        if ffn < 1 and arch.n_expert:
            raise PruneError(
                "--ffn narrows a dense FFN; a mixture of experts' FFN is its experts: use --method experts --keep N"
            )
        if heads < 1:  # the family must take fewer heads (llama.cpp's phi3 and olmo2 need heads x head_dim = hidden)
            fewer = Plan("width", kv_kept={0: np.arange(_kept_groups(arch, heads))})
            try:
                type(arch)(pruned_config(arch.config, arch, fewer))
            except models.ArchitectureError as exc:
                raise PruneError(f"--heads {heads} cannot be pruned from this {arch.family}: {exc}") from None
    elif method == "experts":
        if not arch.n_expert:
            raise PruneError(f"--method experts removes experts of a mixture of experts; this {arch.family} is dense")
        if keep is None or not 1 <= keep < arch.n_expert:
            raise PruneError(
                f"--keep must be between 1 and {arch.n_expert - 1} (the model has {arch.n_expert} experts per block), "
                f"got {keep}"
            )
    else:
        raise PruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def kept_experts(arch: models.DecoderArchitecture, keep: int | None, keep_fraction: float | None) -> int | None:
    """--keep N, or --keep-fraction F of the experts (rounded, at least 1)."""
    if keep_fraction is None:
        return keep
    if not 0 < keep_fraction < 1:
        raise PruneError(f"--keep-fraction is the fraction of experts to keep, in (0, 1); got {keep_fraction}")
    return max(1, round(keep_fraction * arch.n_expert))


def plan_experts(arch: models.DecoderArchitecture, calibration: Calibration, keep: int) -> Plan:
    """Keep, in every block, the `keep` experts that got the most routing weight on the calibration
    text (the sum over tokens of the router's renormalised probability for each chosen expert), or,
    from a saved importance matrix that has no weights, the most routing choices."""
    check_amounts(arch, "experts", keep=keep)
    kept, scores = {}, {}
    for block in range(arch.n_layer):
        counts = calibration.expert_counts.get(f"blk.{block}.ffn_gate_exps.weight")
        mass = calibration.expert_mass.get(block)
        score = mass if mass is not None else counts
        if score is None or len(score) != arch.n_expert or score.sum() <= 0:
            raise PruneError(
                f"the calibration has no routing statistics for block {block}; was it made from this model?"
            )
        score = np.asarray(score, dtype=np.float64)
        scores[block] = score / score.sum()
        kept[block] = _top(score, keep)
    return Plan("experts", experts_kept=kept, expert_scores=scores)


def plan_unstructured(
    arch: models.DecoderArchitecture,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    calibration: Calibration | None = None,
) -> Plan:
    """Zero single weights; Wanda takes ||X_j||_2 = sqrt(sum of x_j^2) from the calibration."""
    check_amounts(arch, method, sparsity=sparsity, pattern=pattern)
    norms = {}
    if method == "wanda":
        if calibration is None:
            raise PruneError("--method wanda needs calibration: --text FILE or --imatrix FILE")
        for i in range(arch.n_layer):
            for suffix in block_matrices(arch):
                name = arch.used_gguf_name(f"model.layers.{i}.{suffix}")
                norms[name] = np.sqrt(_sums(calibration, name))
    return Plan(method, sparsity=sparsity, pattern=pattern, column_norms=norms)


def plan_layers(
    arch: models.DecoderArchitecture, calibration: Calibration, remove: int, score: str = "angular"
) -> Plan:
    check_amounts(arch, "layers", remove=remove)
    cosine = calibration.hidden_cosine
    if cosine is None:
        raise PruneError(
            "--method layers needs the hidden states of a calibration pass: give --text FILE "
            "(a saved --imatrix holds only column statistics)"
        )
    if cosine.shape != (arch.n_layer + 1, arch.n_layer + 1):
        raise PruneError(
            f"the calibration has hidden states for {cosine.shape[0] - 1} blocks, the model {arch.n_layer}"
        )
    removed, scores = choose_blocks(cosine, remove, score)
    return Plan("layers", removed_blocks=removed, block_scores=scores)


def choose_blocks(cosine: np.ndarray, remove: int, score: str = "angular") -> tuple[list[int], dict[int, float]]:
    """The blocks to remove, from C[a, b] = mean cos(h_a, h_b) (h_0 enters block 0, h_i leaves block i-1).

    angular: the start i minimising arccos(C[i, i+K]) / pi, i.e. the run of K consecutive blocks
    whose output is closest to their input; each removed block is labelled with that distance.
    influence: the K blocks with the smallest 1 - C[i, i+1], each judged alone.
    """
    n_layer = cosine.shape[0] - 1
    if score == "angular":
        distance = [
            float(np.arccos(np.clip(cosine[i, i + remove], -1.0, 1.0)) / np.pi) for i in range(n_layer - remove + 1)
        ]
        start = int(np.argmin(distance))
        return list(range(start, start + remove)), {i: distance[start] for i in range(start, start + remove)}
    if score == "influence":
        influence = 1.0 - np.diagonal(cosine, offset=1)
        chosen = sorted(int(i) for i in np.argsort(influence, kind="stable")[:remove])
        return chosen, {i: float(influence[i]) for i in chosen}
    raise PruneError(f"unknown layer score {score!r}; choose one of {', '.join(LAYER_SCORES)}")


def plan_width(
    checkpoint: Checkpoint,
    arch: models.DecoderArchitecture,
    calibration: Calibration,
    ffn: float = 1.0,
    heads: float = 1.0,
) -> Plan:
    """Keep the top `ffn` fraction of FFN neurons and `heads` fraction of KV groups in every block."""
    check_amounts(arch, "width", ffn=ffn, heads=heads)
    n_ffn = round(ffn * arch.ffn)
    if arch.ffn % WIDTH_STEP == 0:
        n_ffn = max(WIDTH_STEP, n_ffn // WIDTH_STEP * WIDTH_STEP)
    n_groups = _kept_groups(arch, heads)
    per_group = arch.n_head // arch.n_head_kv
    plan = Plan("width")
    for i in range(arch.n_layer):
        if n_ffn < arch.ffn:
            down = arch.used_gguf_name(f"model.layers.{i}.mlp.down_proj.weight")
            energy = _sums(calibration, down) * _column_energy(checkpoint, f"model.layers.{i}.mlp.down_proj.weight")
            plan.ffn_kept[i] = _top(energy, n_ffn)
        if n_groups < arch.n_head_kv:
            out = arch.used_gguf_name(f"model.layers.{i}.self_attn.o_proj.weight")
            energy = _sums(calibration, out) * _column_energy(checkpoint, f"model.layers.{i}.self_attn.o_proj.weight")
            plan.kv_kept[i] = _top(energy.reshape(arch.n_head_kv, per_group * arch.head_dim).sum(axis=1), n_groups)
    return plan


def _kept_groups(arch: models.DecoderArchitecture, heads: float) -> int:
    return max(1, round(heads * arch.n_head_kv))


def _sums(calibration: Calibration, name: str) -> np.ndarray:
    """A weight's sums of squared inputs: (columns,), or (experts, columns) for a stack of experts."""
    if not calibration.covers(name):
        raise PruneError(f"the calibration has no statistics for {name}; was it made from this model?")
    sums = calibration.expert_sums[name] if name in calibration.expert_sums else calibration.sums[name]
    return np.asarray(sums, dtype=np.float64)


def _column_energy(checkpoint: Checkpoint, name: str) -> np.ndarray:
    weight = checkpoint.tensors[name].load()
    return np.einsum("ij,ij->j", weight, weight, dtype=np.float64)


def _top(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, in their original order."""
    return np.sort(np.argsort(-scores, kind="stable")[:count])


# ---- zeroing single weights -------------------------------------------------------------------


def sparsify(
    weight: np.ndarray, scores: np.ndarray, *, sparsity: float | None = None, pattern: tuple[int, int] | None = None
) -> np.ndarray:
    """A copy of `weight` with the lowest-scoring weights of each row set to zero: the lowest
    floor(sparsity * cols) of the row, or all but the top N of every M consecutive columns."""
    rows, cols = weight.shape
    drop = np.zeros(weight.shape, dtype=bool)
    if pattern is not None:
        n, m = pattern
        groups = scores.reshape(rows, cols // m, m)
        lowest = np.argsort(groups, axis=-1, kind="stable")[..., : m - n]
        np.put_along_axis(drop.reshape(rows, cols // m, m), lowest, True, axis=-1)
    else:
        k = int(sparsity * cols)
        if k:
            lowest = np.argpartition(scores, k - 1, axis=1)[:, :k]
            np.put_along_axis(drop, lowest, True, axis=1)
    return np.where(drop, np.float32(0), weight)


# ---- writing the pruned checkpoint ------------------------------------------------------------


def prune_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    plan: Plan,
    *,
    progress: Callable[[int], None] | None = None,
    replace: bool = False,
) -> PruneSummary:
    """Prune the HF checkpoint in `source` into a new HF folder `output` (config, weights, tokenizer).

    Tensors are read, pruned and written one at a time; the folder is assembled under a temporary
    name and renamed into place (replacing a folder there when `replace`). progress(1) is called
    per tensor written.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not replace)):
        raise PruneError(f"{output} already exists; add --force to replace it")
    if not output.parent.is_dir():
        raise PruneError(f"output's parent folder {output.parent} does not exist; create it first")
    checkpoint = Checkpoint(Path(source))
    arch = models.for_hf_config(checkpoint.config)
    pruned = pruned_tensors(checkpoint, arch, plan)
    shapes = {name: (shape, dtype) for name, (shape, dtype, _) in pruned.items()}
    zeroed = block_weights = 0
    matrices = block_matrices(arch)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        nonlocal zeroed, block_weights
        for name, (_, _, load) in pruned.items():
            array = load()
            if name.endswith(matrices):
                zeroed += int(array.size - np.count_nonzero(array))
                block_weights += array.size
            yield name, array
            if progress:
                progress(1)

    with atomic_folder(output, replace=replace) as partial:
        for item in checkpoint.directory.iterdir():
            if item.is_file() and not _is_weights(item.name) and item.name != "config.json":
                shutil.copy2(item, partial / item.name)
        (partial / "config.json").write_text(json.dumps(pruned_config(checkpoint.config, arch, plan), indent=2) + "\n")
        write_safetensors(partial / "model.safetensors", tensors(), shapes)
    return PruneSummary(
        output=str(output),
        method=plan.method,
        removed=plan.describe(arch),
        parameters_before=parameter_count(checkpoint),
        parameters_after=sum(_numel(shape) for shape, _ in shapes.values()),
        zeroed=zeroed,
        block_weights=block_weights,
        size_bytes=(output / "model.safetensors").stat().st_size,
    )


def pruned_tensors(
    checkpoint: Checkpoint, arch: models.DecoderArchitecture, plan: Plan
) -> dict[str, tuple[tuple[int, ...], str, Callable[[], np.ndarray]]]:
    """New name -> (shape, safetensors dtype, loader of the pruned tensor), blocks renumbered."""
    kept_blocks = [i for i in range(arch.n_layer) if i not in plan.removed_blocks]
    result = {}
    for ref in checkpoint:
        if IGNORED.search(ref.name):
            continue
        match = _LAYER.match(ref.name)
        if match is None:
            result[ref.name] = (ref.shape, _dtype(ref), ref.load)
            continue
        block, suffix = int(match.group(1)), match.group(2)
        if block in plan.removed_blocks:
            continue
        slot = arch.expert_slot(ref.name)
        if slot is not None and block in plan.experts_kept:  # a kept expert takes its new index
            kept = list(plan.experts_kept[block])
            if slot[1] in kept:
                old = f"{arch.experts_module}.{slot[1]}."
                new = f"{arch.experts_module}.{kept.index(slot[1])}."
                result[f"model.layers.{block}.{suffix.replace(old, new, 1)}"] = (ref.shape, _dtype(ref), ref.load)
            continue
        rows, cols = _kept_indices(arch, plan, block, suffix)
        shape = list(ref.shape)
        if rows is not None:
            shape[0] = len(rows)
        if cols is not None:
            shape[1] = len(cols)
        name = f"model.layers.{kept_blocks.index(block)}.{suffix}"
        result[name] = (tuple(shape), _dtype(ref), _loader(arch, plan, ref, rows, cols))
    return result


def _kept_indices(
    arch: models.DecoderArchitecture, plan: Plan, block: int, suffix: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Which rows and columns of a block tensor stay (None: all)."""
    neurons = plan.ffn_kept.get(block)
    groups = plan.kv_kept.get(block)
    experts = plan.experts_kept.get(block)
    if experts is not None and arch.layer_tensors.get(suffix) == "ffn_gate_inp.weight":  # the router's rows
        return experts, None
    part = suffix.rsplit(".", 1)[0]
    if neurons is not None and part in ("mlp.gate_proj", "mlp.up_proj"):
        return neurons, None
    if neurons is not None and part == "mlp.gate_up_proj":  # the gate's rows, then up's
        return np.concatenate((neurons, neurons + arch.ffn)), None
    if neurons is not None and part == "mlp.down_proj":
        return None, neurons
    if groups is not None and part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        per_group = 1 if part in ("self_attn.k_proj", "self_attn.v_proj") else arch.n_head // arch.n_head_kv
        width = per_group * arch.head_dim
        index = (groups[:, None] * width + np.arange(width)).reshape(-1)
        return (None, index) if part == "self_attn.o_proj" else (index, None)
    return None, None


def _loader(
    arch: models.DecoderArchitecture, plan: Plan, ref: TensorRef, rows: np.ndarray | None, cols: np.ndarray | None
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        array = ref.load()
        if rows is not None:
            array = array[rows]
        if cols is not None:
            array = array[:, cols]
        if plan.method in UNSTRUCTURED and ref.name.endswith(block_matrices(arch)):
            scores = np.abs(array)
            if plan.method == "wanda":
                norms = plan.column_norms[arch.used_gguf_name(ref.name)]
                slot = arch.expert_slot(ref.name)
                if slot is not None:  # each expert's own inputs
                    norms = norms[slot[1]]
                scores *= norms[None, :].astype(np.float32)
            array = sparsify(array, scores, sparsity=plan.sparsity, pattern=plan.pattern)
        return array

    return load


def pruned_config(config: dict[str, Any], arch: models.DecoderArchitecture, plan: Plan) -> dict[str, Any]:
    """config.json of the pruned model, so that transformers builds the smaller shapes."""
    config = dict(config)
    kept_blocks = [i for i in range(arch.n_layer) if i not in plan.removed_blocks]
    config["num_hidden_layers"] = len(kept_blocks)
    for key in arch.per_layer_config:
        if isinstance(config.get(key), list):
            config[key] = [config[key][i] for i in kept_blocks]
    if plan.ffn_kept:
        config["intermediate_size"] = len(next(iter(plan.ffn_kept.values())))
    if plan.experts_kept:
        kept = len(next(iter(plan.experts_kept.values())))
        for key in arch.expert_count_keys if isinstance(arch, models.MixtureOfExperts) else ():
            if key in config:
                config[key] = kept
        config["num_experts_per_tok"] = min(arch.n_expert_used, kept)
    if plan.kv_kept:
        groups = len(next(iter(plan.kv_kept.values())))
        config["num_attention_heads"] = groups * (arch.n_head // arch.n_head_kv)
        config["num_key_value_heads"] = groups
        config["head_dim"] = arch.head_dim  # no longer hidden_size // num_attention_heads
    return config


def expected_size(checkpoint: Checkpoint, plan: Plan, mix: mixes.Mix | None) -> tuple[int, int]:
    """(parameters, bytes) of the pruned model: as a GGUF of the mix (tensor data only), or as
    safetensors when mix is None."""
    arch = models.for_hf_config(checkpoint.config)
    pruned = pruned_tensors(checkpoint, arch, plan)
    n_params = sum(_numel(shape) for shape, _, _ in pruned.values())
    if mix is None:
        return n_params, sum(_numel(shape) * (4 if dtype == "F32" else 2) for shape, dtype, _ in pruned.values())
    smaller = models.for_hf_config(pruned_config(checkpoint.config, arch, plan))
    shapes = smaller.gguf_shapes({name: shape for name, (shape, _, _) in pruned.items()})
    types = mixes.plan(shapes, mix, smaller.n_layer).types
    return n_params, sum(
        _numel(shapes[name][:-1]) * QTYPES[qtype].row_bytes(shapes[name][-1]) for name, qtype in types.items()
    )


def parameter_count(checkpoint: Checkpoint) -> int:
    return sum(_numel(ref.shape) for ref in checkpoint if not IGNORED.search(ref.name))


def _dtype(ref: TensorRef) -> str:
    return ref.dtype if ref.dtype in ("F32", "F16", "BF16") else "F32"


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt")) or name == "model.safetensors.index.json"


# ---- the whole pipeline: calibrate, choose, prune, heal, convert, evaluate ---------------------


@dataclass
class PruneOptions:
    """What `prune_model` removes and what it does around it. text: the calibration (and healing)
    text; imatrix: a saved calibration instead of text; mix: the GGUF type of a .gguf output
    (default Q4_K_M); held_out: a text to report the pruned model's perplexity on; heal: steps of
    self-distillation towards the unpruned model."""

    method: str
    sparsity: float | None = None
    pattern: str | None = None  # "N:M"
    remove: int | None = None
    score: str = "angular"
    ffn: float = 1.0
    heads: float = 1.0
    keep: int | None = None  # experts per block
    keep_fraction: float | None = None
    text: str | None = None
    imatrix: str | os.PathLike[str] | None = None
    ctx: int = 512
    chunks: int | None = None
    mix: mixes.Mix | None = None
    held_out: str | None = None
    heal: int | None = None
    dry_run: bool = False
    threads: int | None = None

    def check(self, to_gguf: bool) -> None:
        """Refuse options that the method would silently ignore, before any work starts."""
        if self.heal is not None:
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise PruneError("--heal trains the model and needs torch: pip install 'slim-llm[train]'")
            if self.text is None:
                raise PruneError("--heal trains on a text: give --text FILE")
        method, text, imatrix = self.method, self.text, self.imatrix
        if self.mix is not None and not to_gguf:
            raise PruneError("--type applies to a GGUF output: name the output file *.gguf")
        if text is not None and imatrix:
            raise PruneError("give --text or --imatrix, not both")
        if method == "magnitude" and imatrix:
            raise PruneError("--method magnitude uses no calibration; drop --imatrix (or use --method wanda)")
        if method == "magnitude" and text is not None and self.heal is None:
            raise PruneError("--method magnitude uses no calibration; drop --text (or use --method wanda, or --heal)")
        if method != "magnitude" and text is None and not imatrix:
            raise PruneError(f"--method {method} needs a calibration text: --text FILE (or --imatrix FILE)")
        if method == "layers" and imatrix:
            raise PruneError(
                "--method layers needs the hidden states of a calibration pass: give --text, not --imatrix"
            )
        if method not in UNSTRUCTURED and (self.sparsity is not None or self.pattern):
            raise PruneError(f"--sparsity and --pattern belong to magnitude and wanda, not --method {method}")
        if method != "layers" and self.remove is not None:
            raise PruneError(f"--remove belongs to --method layers, not {method}")
        if method == "layers" and self.remove is None:
            raise PruneError("--method layers needs --remove K (how many blocks)")
        wants_keep = self.keep is not None or self.keep_fraction is not None
        if method != "experts" and wants_keep:
            raise PruneError(f"--keep and --keep-fraction belong to --method experts, not {method}")
        if method == "experts" and (self.keep is None) == (self.keep_fraction is None):
            raise PruneError(
                "--method experts needs --keep N or --keep-fraction F (one of them): the experts per block"
            )


@dataclass
class PruneReport:
    """What `prune_model` did; fields that do not apply to the run are None."""

    source: str
    output: str | None  # None for a dry run without an output
    method: str
    removed: str
    parameters_before: int
    parameters_after: int
    source_bytes: int
    unpruned_bytes: int  # the unpruned weights written the same way (same --type): what pruning is measured against
    expected_bytes: int | None = None  # the pruned weights (tensor data) as written, or as a dry run would write them
    dry_run: bool = False
    zeroed: int | None = None  # unstructured pruning: zero weights in the block matrices
    block_weights: int | None = None
    healed: dict[str, float] | None = None  # steps, loss_first, loss_last
    type: str | None = None  # the GGUF's mix
    output_bytes: int | None = None
    perplexity: float | None = None
    perplexity_error: float | None = None
    perplexity_of: str | None = None
    perplexity_before: float | None = None  # of the unpruned model, written the same way

    def as_dict(self) -> dict[str, Any]:
        """The JSON report: only the fields that apply to this run (dry_run only when it was one)."""
        return {key: value for key, value in asdict(self).items() if value is not None and value is not False}


DEFAULT_GGUF_MIX = "Q4_K_M"


def prune_model(
    source: str,
    output: str | os.PathLike[str] | None,
    options: PruneOptions,
    *,
    progress: Progress | None = None,
    replace_output: bool = False,
) -> PruneReport:
    """Prune `source` (an HF folder, a hub repo id, or a GGUF: a path, store or catalog name) into
    `output`: an HF folder, or a GGUF of options.mix when the name ends in .gguf (a dry run may have
    no output: it sizes a GGUF). Calibrates on options.text when the method needs it, heals and
    evaluates when asked. progress(stage, done, total) reports calibrating, pruning, teacher,
    healing, converting and perplexity. replace_output: an existing output folder is replaced."""
    if output is None and not options.dry_run:
        raise PruneError("give the output: -o FOLDER for a checkpoint or -o FILE.gguf")
    out = Path(output) if output is not None else None
    to_gguf = out is None or out.name.endswith(".gguf")
    options.check(to_gguf)
    if to_gguf and options.mix is None:
        options = replace(options, mix=mixes.MIXES[DEFAULT_GGUF_MIX])
    if out is not None and not out.parent.is_dir():
        raise PruneError(f"output's parent folder {out.parent} does not exist; create it first")
    if not to_gguf and out is not None and out.exists() and not options.dry_run:
        if not out.is_dir() or (any(out.iterdir()) and not replace_output):
            raise PruneError(f"{out} already exists; add --force to replace it")
    with tempfile.TemporaryDirectory(dir=out.parent if out else None, prefix=".slim-prune-") as tmp:
        return _prune_model(source, out, Path(tmp), options, progress or _no_progress, replace_output)


_T = TypeVar("_T")


def _required(value: _T | None, what: str) -> _T:
    """`value`, which PruneOptions.check and the steps before guarantee; a PruneError if it is missing."""
    if value is None:
        raise PruneError(f"{what} is missing")
    return value


def _no_progress(stage: str, done: int, total: int | None, *, loss: float | None = None) -> None:
    pass


def _prune_model(
    source: str, output: Path | None, work: Path, options: PruneOptions, progress: Progress, replace_output: bool
) -> PruneReport:
    from slim.runtime.pipeline.convert import convert

    hf_source, source_gguf, source_bytes = _hf_source(source, work)
    checkpoint = Checkpoint(hf_source)
    arch = models.for_hf_config(checkpoint.config)
    if arch.config.get("architectures") != checkpoint.config.get("architectures"):  # e.g. Gemma 3's text part
        raise PruneError(
            f"{source} is a {', '.join(checkpoint.config.get('architectures') or [])}, whose language model slim "
            "prunes only on its own: convert it (--type F32) and `slim export` the GGUF, then prune that folder"
        )
    method, text, mix, threads = options.method, options.text, options.mix, options.threads
    pattern = parse_pattern(options.pattern) if options.pattern else None
    keep = kept_experts(arch, options.keep, options.keep_fraction) if method == "experts" else None
    check_amounts(
        arch,
        method,
        sparsity=options.sparsity,
        pattern=pattern,
        remove=options.remove,
        ffn=options.ffn,
        heads=options.heads,
        keep=keep,
    )

    calibration = Calibration.load(options.imatrix) if options.imatrix else None
    if calibration is not None:
        gguf_names = {ref.name: arch.gguf_name(ref.name) for ref in checkpoint}
        columns = {name: ref.shape[-1] for ref in checkpoint if (name := gguf_names[ref.name]) and ref.shape}
        calibration.check_fits(columns, str(source))
    if source_gguf is None and (
        options.heal is not None or (text is not None and not options.imatrix and method != "magnitude")
    ):
        source_gguf = work / "source-f16.gguf"  # llama.cpp runs the calibration and the healing teacher
        convert(hf_source, source_gguf, mixes.MIXES["F16"])
    if calibration is None and text is not None and method != "magnitude":
        from slim.runtime.pipeline.calibrate import calibrate

        calibration = calibrate(
            _required(source_gguf, "the source GGUF that llama.cpp calibrates on"),
            text,
            ctx=options.ctx,
            chunks=options.chunks,
            threads=threads,
            hidden_states=method == "layers",
            routing=method == "experts",
            progress=_stage(progress, "calibrating"),
        )

    if method in UNSTRUCTURED:
        plan = plan_unstructured(arch, method, sparsity=options.sparsity, pattern=pattern, calibration=calibration)
    elif method == "layers":
        calibration = _required(calibration, "--method layers' calibration (--text FILE)")
        plan = plan_layers(arch, calibration, _required(options.remove, "--remove K"), options.score)
    elif method == "experts":
        calibration = _required(calibration, "--method experts' calibration (--text FILE or --imatrix FILE)")
        plan = plan_experts(arch, calibration, _required(keep, "--keep N"))
    else:
        calibration = _required(calibration, "--method width's calibration (--text FILE or --imatrix FILE)")
        plan = plan_width(checkpoint, arch, calibration, options.ffn, options.heads)

    n_after, size_after = expected_size(checkpoint, plan, mix)
    report = PruneReport(
        source=source,
        output=str(output) if output is not None else None,
        method=method,
        removed=plan.describe(arch),
        parameters_before=parameter_count(checkpoint),
        parameters_after=n_after,
        source_bytes=source_bytes,
        unpruned_bytes=expected_size(checkpoint, Plan(method="layers"), mix)[1],
        expected_bytes=size_after,
        type=mix.name if mix is not None else None,
    )
    if options.dry_run:
        report.dry_run = True
        return report
    out = _required(output, "the output (-o)")

    hf_out = work / "pruned-hf" if mix is not None or options.heal is not None else out
    written = 0

    def tensor_written(count: int) -> None:
        nonlocal written
        written += count
        progress("pruning", written, None)

    summary = prune_checkpoint(hf_source, hf_out, plan, progress=tensor_written, replace=replace_output)
    if method in UNSTRUCTURED:
        report.zeroed, report.block_weights = summary.zeroed, summary.block_weights
    if options.heal is not None:
        from slim.runtime.train.distill import distill

        healed = work / "healed-hf"  # its training checkpoint (healed-hf.ckpt) stays in the work folder

        def healing_step(step: int, total: int, loss: float) -> None:
            progress("healing", step, total, loss=loss)

        healing = distill(
            _required(source_gguf, "the source GGUF the healing teacher runs on"),
            hf_out,
            _required(text, "--heal's training text (--text FILE)"),
            healed,
            steps=options.heal,
            threads=threads,
            progress=healing_step,
            teacher_progress=_stage(progress, "teacher"),
        )
        report.healed = {"steps": healing.steps, "loss_first": healing.first_loss, "loss_last": healing.last_loss}
        hf_out = healed
        if mix is None:
            if replace_output and out.is_dir():
                shutil.rmtree(out)
            move_into_place(healed, out)
            hf_out = out
    evaluated = None
    if mix is not None:
        converted = 0

        def bytes_written(count: int) -> None:
            nonlocal converted
            converted += count
            progress("converting", converted, None)

        convert(hf_out, out, mix, threads=threads, progress=bytes_written)
        evaluated = out
    report.output_bytes = out.stat().st_size if mix is not None else summary.size_bytes
    if options.held_out is not None:
        from slim.runtime.inference.evaluate import evaluate

        if evaluated is None:
            evaluated = work / "pruned-f16.gguf"
            convert(hf_out, evaluated, mixes.MIXES["F16"])
        result, _ = evaluate(
            evaluated, options.held_out, n_ctx=options.ctx, n_threads=threads, progress=_stage(progress, "perplexity")
        )
        report.perplexity, report.perplexity_error = result.perplexity, result.perplexity_error
        report.perplexity_of = evaluated.name if evaluated == out else "the pruned model as F16"
        unpruned = work / "unpruned.gguf"  # the same type as the pruned model's measurement
        convert(hf_source, unpruned, mix if evaluated == out and mix is not None else mixes.MIXES["F16"])
        before, _ = evaluate(
            unpruned, options.held_out, n_ctx=options.ctx, n_threads=threads, progress=_stage(progress, "perplexity")
        )
        report.perplexity_before = before.perplexity
    return report


def _hf_source(source: str, work: Path) -> tuple[Path, Path | None, int]:
    """(HF folder, GGUF of the same model or None, bytes of the source's weights): an HF folder or
    hub repo id as it is, a GGUF (path, store or catalog name) exported to F32 in `work`."""
    from slim.runtime import store
    from slim.runtime.pipeline.convert import resolve_source
    from slim.runtime.pipeline.export import export
    from slim.runtime.store.hub import is_repo_id

    path = Path(source).expanduser()
    if path.is_dir() or (not path.exists() and is_repo_id(source)):
        directory = resolve_source(source)
        return directory, None, sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    gguf_path = store.resolve(source)
    export(gguf_path, work / "source-hf", "F32")
    return work / "source-hf", gguf_path, gguf_path.stat().st_size


def _stage(progress: Progress, stage: str) -> Callable[[int, int], None]:
    """A (done, total) callback of calibrate, evaluate and the teacher pass, reporting as `stage`."""
    return lambda done, total: progress(stage, done, total)
