"""slim convert --target-size / --max-kld: every tensor's type chosen by measurement, within a budget.

llama-quantize's mixes bump the same tensors in every model. Here the model itself is asked:

1. Reference. The source is written once as F16 (a temporary GGUF) and run over the probe text;
   its next-token distributions are the reference.
2. Probes. For each tensor the plan may quantize, its F16 bytes in that file are replaced in place
   by its values after a round trip through a probe type (Q3_K, or Q4_0 where 256 does not divide
   the rows), the loaded model runs the probe text again (llama.cpp computes from the memory-mapped
   file, so nothing is reloaded), and the bytes are put back. The KL divergence from the reference
   is what that tensor alone costs at the probe type: ΔKL_t.
3. Errors. For every candidate type, the importance-weighted squared error of the round trip on a
   sample of the tensor's rows: e_t(q). The importance is the imatrix's, as the kernels weight it.
4. Model. To second order the KL divergence is a quadratic form in the weight error, and for the
   noise-like error of quantization it grows with the weighted error energy, so
   ΔKL_t(q) = ΔKL_t(probe) · e_t(q) / e_t(probe). Errors of many tensors compound, so the sum S of
   those predictions is mapped to the model's KL by a power law K = a·S^b measured with two joint
   probes (every tensor at once at Q3_K, then at Q4_K, scored on JOINT_CHUNKS windows).
5. Solve. Minimise the predicted KL within a byte budget (or the bytes within a KL bound): a sweep
   of the Lagrange multiplier λ picks each tensor's type minimising ΔKL + λ·bytes (its convex hull),
   then a greedy pass spends what the budget has left on the best upgrades per byte.

Cost: one forward pass over PROBE_CTX tokens per quantizable tensor (7 per layer in a dense model),
the candidate round trips of SAMPLE_ROWS rows per tensor, and the two joint probes; the single
probes dominate. Each costs a forward pass of the whole model, so the total grows as parameters
times tensors: on 2 cores SmolLM2-135M's 211 tensors take under 4 minutes (benchmarks/RESULTS.md),
which puts a 7B model (224 tensors, 52 times the work per pass) near 3 hours on the same 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slim import kernels
from slim.kernels import QTYPES
from slim.runtime.formats import mixes
from slim.runtime.formats.quality import Quality, write_quality
from slim.runtime.pipeline import Progress
from slim.runtime.pipeline.convert import (
    ConvertError,
    PlannedTensor,
    convert,
    load_imatrix,
    planned_tensors,
    quantize_tensor,
)

if TYPE_CHECKING:
    from slim.runtime.inference.evaluate import ReferenceLogits

# The types a measured plan chooses from: every standard type slim's kernels write with an importance
# matrix. The lattice i-quants (IQ3_S, IQ2_XS...) are left out: llama.cpp's quantizer for them is
# about 20 times slower, too slow to price every tensor with.
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q8_0", "F16")
PROBE_TYPE = "Q3_K"  # falls back to Q4_0 where 256 does not divide the rows, as llama-quantize's Q3_K does
PROBE_CTX = 256  # tokens per probe pass
PROBE_FIRST = 16  # positions scored from here on: every scored token sees at least 16 tokens
JOINT_TYPES = ("Q3_K", "Q4_K")  # every tensor at once at each (with llama-quantize's fallbacks)
JOINT_CHUNKS = 8  # windows of PROBE_CTX tokens the joint probes are scored on
SAMPLE_ROWS = 256  # rows per tensor (spread evenly) whose round trip prices each candidate type
QUALITY_CTX, QUALITY_CHUNKS = 512, 8  # the written file is measured as slim eval measures it
CALIBRATION_CHUNKS = 32  # with --text and no --imatrix: chunks of 512 tokens for the importance matrix
METADATA_RESERVE = 1024  # bytes the quality keys may add to the header
RETRIES = 3  # --max-kld: how often a plan whose measured KL misses the bound is tightened and rebuilt


class TargetError(ValueError):
    """A target that cannot be met or read; the message says what to do."""


@dataclass(frozen=True)
class Target:
    """What the user asked for: a file size in bytes, bits per weight, or a KL divergence bound."""

    size_bytes: int | None = None
    bits_per_weight: float | None = None
    max_kl: float | None = None

    def describe(self) -> str:
        if self.size_bytes is not None:
            return f"{self.size_bytes / 1e6:.2f} MB"
        if self.bits_per_weight is not None:
            return f"{self.bits_per_weight:g} bits/weight"
        return f"KL <= {self.max_kl:g}"


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> Target:
    """--target-size: "4.5bpw" (bits per weight, as slim convert reports them) or a file size such
    as "95MB", "90.5MiB", "1.2GB", "99000000B" (decimal units, binary with "i")."""
    value = text.strip().upper().replace(" ", "")
    unit = next((u for u in ("BPW", *sorted(_UNITS, key=len, reverse=True)) if value.endswith(u)), None)
    try:
        number = float(value[: -len(unit)] if unit else value)
    except ValueError:
        number = math.nan
    if unit is None or not math.isfinite(number) or number <= 0:
        raise TargetError(f"--target-size {text!r}: give bits per weight like 4.5bpw or a file size like 95MB or 1.2GB")
    if unit == "BPW":
        if not 1 <= number <= 16:
            raise TargetError(f"--target-size {text}: bits per weight must lie between 1 and 16")
        return Target(bits_per_weight=number)
    return Target(size_bytes=int(number * _UNITS[unit]))


@dataclass
class TensorCost:
    """One quantizable tensor, priced: bytes and predicted ΔKL for each type that fits its rows."""

    name: str
    elements: int
    probe_type: str
    probe_kl: float  # measured: KL divergence with this tensor alone at probe_type
    options: dict[str, tuple[int, float]]  # type -> (bytes, predicted ΔKL)


@dataclass
class Measurement:
    """What the probes found, and what the file around the chosen tensors costs."""

    tensors: list[TensorCost]
    fixed: dict[str, tuple[str, int]]  # tensors kept as they are (F32 norms, routers): type and bytes
    n_params: int
    header_bytes: int  # the file's bytes before the tensor data (metadata, vocabulary, tensor infos)
    alignment: int
    probe_tokens: int
    seconds: float
    # (summed single-tensor predictions, measured KL) with every tensor quantized at once, at each of
    # JOINT_TYPES: how the errors of many tensors compound, which the single probes cannot see
    joint: list[tuple[float, float]] = field(default_factory=list)
    floor: float = 0.0  # the KL that llama.cpp's quantized matmuls add whatever the weights

    def predicted(self, summed: float) -> float:
        """The model's KL divergence for a plan whose single-tensor predictions sum to `summed`: the
        floor plus the power law K = a·S^b through the joint probes (K = S without them)."""
        return self.floor + self._compounded(summed)

    def _compounded(self, summed: float) -> float:
        usable = [(x, y) for x, y in self.joint if x > 0 and y > 0]
        if not usable or summed <= 0:
            return max(summed, 0.0)
        if len(usable) == 1 or usable[0][0] == usable[-1][0]:
            return summed * usable[0][1] / usable[0][0]
        (s1, k1), (s2, k2) = usable[0], usable[-1]
        power = min(2.0, max(0.5, math.log(k1 / k2) / math.log(s1 / s2)))
        return k1 * (summed / s1) ** power

    def summed_for(self, kl: float) -> float:
        """The inverse of predicted(): the summed single-tensor budget that predicts `kl` (negative
        when `kl` is under the floor, which no quantized plan meets)."""
        if kl < self.floor:
            return -1.0
        low, high = 0.0, max(kl, 1.0)
        while self.predicted(high) < kl and high < 1e6:
            high *= 2
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if self.predicted(mid) <= kl else (low, mid)
        return low

    def file_size(self, tensor_bytes: Sequence[int]) -> int:
        """The GGUF's size with these tensor sizes (every tensor padded to the alignment)."""
        pad = self.alignment
        header = -(-(self.header_bytes + METADATA_RESERVE) // pad) * pad
        return header + sum(-(-n // pad) * pad for n in tensor_bytes)


@dataclass
class Choice:
    """A solved plan: the type of every tensor, with its predicted size and KL divergence."""

    types: dict[str, str]
    size_bytes: int
    bits_per_weight: float
    predicted_kl: float  # floor_kl plus the tensors' shares
    tensor_kl: dict[str, float]  # each chosen tensor's predicted share of the KL divergence
    floor_kl: float = 0.0  # what llama.cpp's quantized matmuls add whatever the weights


def measure(
    reference: Path,
    planned: list[PlannedTensor],
    text: str,
    *,
    quantized: Path | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Measurement:
    """Probe every quantizable tensor of `planned` (convert's plan for a quantized mix, with its
    importance) in the F16 GGUF `reference`, on the start of `text`. The file is rewritten in place
    during the probes and restored after each one. quantized: the same model as llama-quantize's
    Q8_0, to measure the floor of KL divergence that llama.cpp's quantized matmuls add whatever the
    weights (they round the activations to 8 bits; the F16 probes cannot see it)."""
    import gguf

    from slim.runtime import inference
    from slim.runtime.inference.evaluate import chunk_tokens

    started = time.perf_counter()
    reader = gguf.GGUFReader(reference)
    stored = {t.name: t for t in reader.tensors}
    chosen = [item for item in planned if item.qtype != "F32"]
    for item in chosen:
        if stored[item.gguf_name].tensor_type != gguf.GGMLQuantizationType.F16:
            raise ConvertError(
                f"{reference} holds {item.gguf_name} as {stored[item.gguf_name].tensor_type.name}, not F16"
            )
    header_bytes = int(reader.data_offset)
    alignment = int(reader.alignment)
    offsets = {name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for name, t in stored.items()}
    del reader, stored  # the probes write through their own map

    model = inference.load(reference, n_ctx=PROBE_CTX, n_batch=PROBE_CTX, n_threads=threads)
    try:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        chunks = chunk_tokens(tokens, PROBE_CTX, model.prompt_bos)[:1]
        if not chunks:
            raise TargetError(
                f"the text is {len(tokens)} tokens; the probes need at least {PROBE_CTX}: give a longer --text"
            )
        chunk = chunks[0]
        entropy_term, p_reference = _reference(model, chunk)
        weights = np.memmap(reference, mode="r+", dtype=np.uint8)
        costs = []
        total = len(chosen) + len(JOINT_TYPES)
        try:
            for done, item in enumerate(chosen):
                start, stop = offsets[item.gguf_name]
                original = np.array(weights[start:stop])
                values = np.asarray(item.load(), dtype=np.float32)
                probe = mixes.fit_row_length(PROBE_TYPE, values.shape[-1])
                weights[start:stop] = _round_trip(item, values, probe).astype(np.float16).view(np.uint8).reshape(-1)
                weights.flush()
                try:
                    logits = model.logits(chunk, PROBE_FIRST)[:-1]
                finally:
                    weights[start:stop] = original
                    weights.flush()
                probe_kl = max(0.0, float(_kl(entropy_term, p_reference, logits).mean()))
                costs.append(_price(item, values, probe, probe_kl))
                if progress:
                    progress(done + 1, total)
            del p_reference, entropy_term
            joint = []
            windows = chunk_tokens(tokens, PROBE_CTX, model.prompt_bos)[:JOINT_CHUNKS]
            references = [_reference(model, window) for window in windows]
            for level, qtype in enumerate(JOINT_TYPES):
                types = {item.gguf_name: mixes.fit_row_length(qtype, item.shape[-1]) for item in chosen}
                _write_all(weights, offsets, chosen, types)
                try:
                    kl = [
                        _kl(*ref, model.logits(window, PROBE_FIRST)[:-1])
                        for ref, window in zip(references, windows, strict=True)
                    ]
                finally:
                    _write_all(weights, offsets, chosen, dict.fromkeys(types, "F16"))
                summed = sum(cost.options[types[cost.name]][1] for cost in costs)
                joint.append((summed, float(np.concatenate(kl).mean())))
                if progress:
                    progress(len(chosen) + level + 1, total)
        finally:
            del weights
    finally:
        model.close()
    floor = 0.0
    if quantized is not None:
        eight_bit = inference.load(quantized, n_ctx=PROBE_CTX, n_batch=PROBE_CTX, n_threads=threads)
        try:
            kl = [
                _kl(*ref, eight_bit.logits(window, PROBE_FIRST)[:-1])
                for ref, window in zip(references, windows, strict=True)
            ]
        finally:
            eight_bit.close()
        weights_only = Measurement([], {}, 1, 0, 1, 0, 0.0, joint=joint)
        floor = max(
            0.0,
            float(np.concatenate(kl).mean()) - weights_only.predicted(sum(cost.options["Q8_0"][1] for cost in costs)),
        )
    if chosen and all(cost.probe_kl == 0.0 for cost in costs):
        raise TargetError("no probe moved the model's output: llama.cpp did not read the probed weights")
    fixed = {item.gguf_name: (item.qtype, item.nbytes) for item in planned if item.qtype == "F32"}
    n_params = sum(item.n_elements for item in planned)
    return Measurement(
        costs,
        fixed,
        n_params,
        header_bytes,
        alignment,
        len(chunk) - PROBE_FIRST - 1,
        time.perf_counter() - started,
        joint=joint,
        floor=floor,
    )


def _reference(model: Any, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The unquantized model's Σ p log p and p at the scored positions of one window (what _kl needs)."""
    from slim.runtime.inference.evaluate import log_softmax

    log_p = log_softmax(model.logits(window, PROBE_FIRST)[:-1])
    p = np.exp(log_p).astype(np.float32)
    return (p * log_p).sum(axis=-1), p


def _write_all(
    weights: np.memmap, offsets: dict[str, tuple[int, int]], chosen: list[PlannedTensor], types: dict[str, str]
) -> None:
    """Every chosen tensor's round trip through its type, written in F16 where the file holds it (F16:
    the tensor's own F16 values, as convert wrote them)."""
    for item in chosen:
        start, stop = offsets[item.gguf_name]
        values = np.asarray(item.load(), dtype=np.float32)
        weights[start:stop] = (
            _round_trip(item, values, types[item.gguf_name]).astype(np.float16).view(np.uint8).reshape(-1)
        )
    weights.flush()


def _kl(entropy_term: np.ndarray, p_reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || model) per position, without forming the model's log-probabilities:
    Σ p log p - Σ p·logits + logsumexp(logits), the sums carried in float64."""
    peak = logits.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    return entropy_term - (p_reference * logits).sum(axis=-1, dtype=np.float64) + log_sum


def _round_trip(item: PlannedTensor, values: np.ndarray, qtype: str) -> np.ndarray:
    """The tensor's values after quantizing to qtype (with its importance) and back."""
    if qtype == "F16":
        return values.astype(np.float16).astype(np.float32)
    data = quantize_tensor(replace(item, qtype=qtype, load=lambda: values))
    rows = values.reshape(-1, values.shape[-1])
    return kernels.dequantize(data, qtype, rows.shape).reshape(values.shape)


def _price(item: PlannedTensor, values: np.ndarray, probe: str, probe_kl: float) -> TensorCost:
    """Each fitting candidate's bytes and predicted ΔKL, from its round-trip error on sampled rows
    relative to the probe type's error on the same rows."""
    cols = values.shape[-1]
    experts = values.reshape(-1, *values.shape[-2:])  # (experts or 1, rows, cols)
    importance = item.importance
    per_expert = max(1, SAMPLE_ROWS // len(experts))
    samples = []
    for e, matrix in enumerate(experts):
        rows = np.unique(np.linspace(0, len(matrix) - 1, min(len(matrix), per_expert)).astype(np.int64))
        weight = importance[e] if importance is not None and importance.ndim == 2 else importance
        samples.append((np.ascontiguousarray(matrix[rows]), weight))

    def error(qtype: str) -> float:
        total = 0.0
        for rows, weight in samples:
            part = replace(item, shape=rows.shape, importance=weight)
            diff = (_round_trip(part, rows, qtype) - rows).astype(np.float64) ** 2
            total += float((diff * weight).sum() if weight is not None else diff.sum())
        return total

    fitting = [q for q in CANDIDATES if cols % QTYPES[q].block_size == 0]
    errors = {q: error(q) for q in fitting}
    scale = probe_kl / errors[probe] if errors[probe] > 0 else 0.0
    n_rows = int(np.prod(item.shape[:-1], dtype=np.int64))
    options = {q: (n_rows * QTYPES[q].row_bytes(cols), scale * errors[q]) for q in fitting}
    return TensorCost(item.gguf_name, n_rows * cols, probe, probe_kl, options)


def solve(measurement: Measurement, target: Target, allowed: Collection[str] = CANDIDATES) -> Choice:
    """The plan with the least predicted KL within the size (or the smallest within the KL bound),
    from the `allowed` types."""
    costs = measurement.tensors
    fixed_bytes = sum(n for _, n in measurement.fixed.values())
    types = [[q for q in cost.options if q in allowed] for cost in costs]
    for cost, fitting in zip(costs, types, strict=True):
        if not fitting:
            raise TargetError(f"none of the types {', '.join(allowed)} fits the rows of {cost.name}")
    width = max(len(t) for t in types)
    size = np.full((len(costs), width), np.inf)
    loss = np.full((len(costs), width), np.inf)
    for i, cost in enumerate(costs):
        for j, qtype in enumerate(types[i]):
            size[i, j], loss[i, j] = cost.options[qtype]
    rows = np.arange(len(costs))

    def pick(lam: float) -> np.ndarray:
        return np.argmin(loss + lam * size, axis=1)

    def totals(picked: np.ndarray) -> tuple[float, float]:
        return float(size[rows, picked].sum()), float(loss[rows, picked].sum())

    # λ from "bytes are free" (the largest types) to "bytes are all that count" (the smallest)
    low, high = 1e-16, 1e3
    if target.max_kl is not None:
        bound = measurement.summed_for(target.max_kl)
        if totals(pick(low))[1] > bound:
            raise TargetError(
                f"no plan of slim's types is predicted to keep KL under {target.max_kl:g} (llama.cpp's "
                f"quantized matmuls alone add {measurement.floor:.4f}): raise --max-kld or convert to F16"
            )
        for _ in range(100):  # the largest λ (smallest file) whose predicted KL meets the bound
            mid = math.sqrt(low * high)
            low, high = (mid, high) if totals(pick(mid))[1] <= bound else (low, mid)
        picked = pick(low)
    else:
        budget = _tensor_budget(measurement, target) - fixed_bytes
        smallest = float(size.min(axis=1).sum())
        if smallest > budget:
            floor = measurement.file_size([*size.min(axis=1).astype(int), *(n for _, n in measurement.fixed.values())])
            raise TargetError(
                f"--target-size {target.describe()} is below the smallest file slim's types make "
                f"({floor / 1e6:.2f} MB, {8 * (smallest + fixed_bytes) / measurement.n_params:.2f} bits/weight)"
            )
        for _ in range(100):  # the smallest λ whose plan fits the budget
            mid = math.sqrt(low * high)
            low, high = (low, mid) if totals(pick(mid))[0] <= budget else (mid, high)
        picked = _spend(pick(high), size, loss, budget)

    chosen = {cost.name: types[i][int(picked[i])] for i, cost in enumerate(costs)}
    tensor_bytes = [int(size[i, picked[i]]) for i in rows]
    all_types = {**{name: qtype for name, (qtype, _) in measurement.fixed.items()}, **chosen}
    total = sum(tensor_bytes) + fixed_bytes
    summed = float(loss[rows, picked].sum())
    predicted = measurement.predicted(summed)
    share = (predicted - measurement.floor) / summed if summed > 0 else 1.0
    return Choice(
        types=all_types,
        size_bytes=measurement.file_size([*tensor_bytes, *(n for _, n in measurement.fixed.values())]),
        bits_per_weight=8 * total / measurement.n_params,
        predicted_kl=predicted,
        tensor_kl={cost.name: share * float(loss[i, picked[i]]) for i, cost in enumerate(costs)},
        floor_kl=measurement.floor,
    )


def _tensor_budget(measurement: Measurement, target: Target) -> float:
    """The bytes the tensors may take: bits per weight as slim counts them, or the file size less
    the header and the padding of every tensor."""
    if target.bits_per_weight is not None:
        return target.bits_per_weight * measurement.n_params / 8
    assert target.size_bytes is not None
    n_tensors = len(measurement.tensors) + len(measurement.fixed)
    header = measurement.file_size([])
    return target.size_bytes - header - n_tensors * measurement.alignment


def _spend(picked: np.ndarray, size: np.ndarray, loss: np.ndarray, budget: float) -> np.ndarray:
    """Spend what the budget has left: repeatedly take the upgrade with the most KL saved per byte
    that still fits (the Lagrangian plan sits on each tensor's hull and may leave bytes unused)."""
    picked = picked.copy()
    rows = np.arange(len(picked))
    while True:
        left = budget - size[rows, picked].sum()
        extra = size - size[rows, picked][:, None]
        saved = loss[rows, picked][:, None] - loss
        useful = np.isfinite(size) & (extra > 0) & (extra <= left) & (saved > 0)
        if not useful.any():
            return picked
        gain = np.where(useful, saved / np.where(useful, extra, 1), -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        picked[i] = j


def file_type(types: dict[str, str], elements: dict[str, int]) -> mixes.Mix:
    """The mix written as general.file_type: the one whose base type holds the most weights, as
    llama.cpp guesses a file's type from its tensors."""
    weights: dict[str, int] = {}
    for name, qtype in types.items():
        if qtype != "F32":
            weights[qtype] = weights.get(qtype, 0) + elements[name]
    if not weights:
        return mixes.mix("F32")
    common = max(weights, key=lambda q: weights[q])
    return mixes.mix({"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(common, common))


@dataclass
class TargetReport:
    output: str | None  # None for --plan-only
    target: str
    types: dict[str, str]
    tensor_kl: dict[str, float]
    tensor_types: dict[str, int]
    size_bytes: int  # predicted for --plan-only, the written file's otherwise
    bits_per_weight: float
    predicted_kl: float
    floor_kl: float = 0.0
    quality: dict[str, Any] | None = None  # the written file's measured quality (formats.quality.Quality)
    measure_seconds: float = 0.0
    seconds: float = 0.0
    attempts: int = 0
    probe_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        head = (
            f"{'planned' if self.output is None else 'wrote ' + self.output}: {self.size_bytes / 1e6:.2f} MB, "
            f"{self.bits_per_weight:.2f} bits/weight ({counts}) for {self.target}"
        )
        said = [
            head,
            f"predicted KL {self.predicted_kl:.4f}, of which {self.floor_kl:.4f} is llama.cpp's 8-bit activations "
            f"(probes: {self.measure_seconds:.0f} s)",
        ]
        if self.quality:
            said.append("measured " + Quality(**self.quality).line())
        return said + self.notes

    def plan_lines(self) -> list[str]:
        """The chosen type of every quantized tensor with its predicted share of the KL divergence."""
        width = max((len(name) for name in self.tensor_kl), default=0)
        return [f"{name:<{width}}  {self.types[name]:<7} {kl:.6f}" for name, kl in self.tensor_kl.items()]


def convert_to_target(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    target: Target,
    text: str,
    text_name: str,
    *,
    imatrix: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> TargetReport:
    """Measure the source's tensors on `text`, solve for the target, and write the GGUF to `output`
    with its measured quality in the metadata (output None: plan only, nothing written).
    Without an imatrix, one is computed from `text` first (slim calibrate, 32 chunks of 512)."""
    from slim.runtime.pipeline.calibrate import calibrate

    started = time.perf_counter()
    report: Callable[[str, int, int | None], None] = progress or (lambda stage, done, total: None)
    if output is not None:
        output = Path(output)
        if not output.parent.is_dir():
            raise ConvertError(f"output directory {output.parent} does not exist; create it first")
    work_root = output.parent if output is not None else None
    with tempfile.TemporaryDirectory(prefix=".slim-target-", dir=work_root) as folder:
        work = Path(folder)
        reference = work / "reference-F16.gguf"
        report("writing the F16 reference", 0, None)
        convert(source, reference, mixes.mix("F16"), threads=threads, allow_pickle=allow_pickle)
        if imatrix is None:
            imatrix = work / "calibration.imatrix.gguf"
            calibration = calibrate(
                reference,
                text,
                chunks=CALIBRATION_CHUNKS,
                threads=threads,
                dataset=text_name,
                progress=lambda done, total: report("calibrating", done, total),
            )
            calibration.save(imatrix)
        else:
            calibration = load_imatrix(imatrix)
        _, planned = planned_tensors(source, mixes.mix("Q4_K_M"), calibration, allow_pickle=allow_pickle)
        eight_bit = work / "Q8_0.gguf"
        convert(source, eight_bit, mixes.mix("Q8_0"), threads=threads, allow_pickle=allow_pickle)
        measurement = measure(
            reference,
            planned,
            text,
            quantized=eight_bit,
            threads=threads,
            progress=lambda done, total: report("probing", done, total),
        )
        eight_bit.unlink()
        choice = solve(measurement, target)
        summary = TargetReport(
            output=None,
            target=target.describe(),
            types=choice.types,
            tensor_kl=choice.tensor_kl,
            tensor_types=_counts(choice.types),
            size_bytes=choice.size_bytes,
            bits_per_weight=choice.bits_per_weight,
            predicted_kl=choice.predicted_kl,
            floor_kl=choice.floor_kl,
            measure_seconds=measurement.seconds,
            probe_tokens=measurement.probe_tokens,
        )
        if output is None:
            summary.seconds = time.perf_counter() - started
            return summary

        written = work / "plan.gguf"
        choice, quality, attempt = build_plan(
            source, written, measurement, target, choice, text, text_name, reference,
            imatrix=imatrix, threads=threads, allow_pickle=allow_pickle, progress=report,
        )  # fmt: skip
        write_quality(written, output, quality)
    summary.output = str(output)
    summary.types, summary.tensor_kl, summary.tensor_types = choice.types, choice.tensor_kl, _counts(choice.types)
    summary.predicted_kl, summary.bits_per_weight = choice.predicted_kl, choice.bits_per_weight
    summary.size_bytes = Path(output).stat().st_size
    summary.quality = asdict(quality)
    summary.attempts = attempt
    if target.max_kl is not None and quality.kl_mean > target.max_kl:
        summary.notes.append(
            f"the measured KL {quality.kl_mean:.4f} is over the bound {target.max_kl:g} after {RETRIES} plans: "
            "give a larger --max-kld, or a longer --text for steadier probes"
        )
    summary.seconds = time.perf_counter() - started
    return summary


def build_plan(
    source: str | os.PathLike[str],
    written: Path,
    measurement: Measurement,
    target: Target,
    choice: Choice,
    text: str,
    text_name: str,
    reference: Path,
    *,
    imatrix: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    allow_pickle: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> tuple[Choice, Quality, int]:
    """Write `choice` to `written` and measure it on `text` against the F16 `reference`. For a KL
    bound, a file that misses it is planned again, aiming lower by the ratio it missed by, up to
    RETRIES times. Returns the plan written, its measured quality and the number of plans tried."""
    from slim.runtime.inference.evaluate import evaluate, measured_quality

    elements = {cost.name: cost.elements for cost in measurement.tensors}
    bound = target.max_kl
    reference_logits: ReferenceLogits | None = None
    for attempt in range(1, RETRIES + 1):
        if progress:
            progress("quantizing", attempt, RETRIES if bound is not None else 1)
        plan = mixes.TypePlan(file_type(choice.types, elements), choice.types)
        convert(source, written, plan, imatrix=imatrix, threads=threads, allow_pickle=allow_pickle)
        measured, reference_logits = evaluate(
            written, text, n_ctx=QUALITY_CTX, reference=reference_logits or reference, n_threads=threads,
            chunks=QUALITY_CHUNKS,
        )  # fmt: skip
        assert reference_logits is not None
        quality = measured_quality(
            measured, reference_logits, text, text_name, "F16 of the source", choice.predicted_kl
        )
        if bound is None or target.max_kl is None or quality.kl_mean <= target.max_kl or attempt == RETRIES:
            return choice, quality, attempt
        bound *= target.max_kl / quality.kl_mean * 0.97
        choice = solve(measurement, replace(target, max_kl=bound))
    raise AssertionError("unreachable: the last attempt returns")


def _counts(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return counts
