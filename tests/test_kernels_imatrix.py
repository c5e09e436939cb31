"""Importance-weighted quantization (llama-quantize --imatrix): slim's numpy kernels write the same
bytes as llama.cpp's C quantizer given the same importance vector.

The oracle is ggml_quantize_chunk with its imatrix argument (slim.kernels.ggml), which takes
quantize_row_q4_0_impl & co.: weights importance * sqrt(sigma2 + x^2), with sigma2 over the whole row
for the legacy quants and over each 256-weight super-block for Q4_K/Q5_K, and the imatrix itself
for Q6_K.

The second half tests search="thorough" (the same seven types): on every block its weighted error
is at most the reference's, in total clearly lower, and gguf-py's independent decoder reads its
blocks as slim does.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_kernels import NUMPY_TYPES, _bf16_rounded, assert_same_bytes

from slim import kernels
from slim.kernels import QTYPES, _common, dequantize, ggml, kquants, legacy, quantize

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="llama-cpp-python (the C oracle) is not installed")

WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
IGNORING = ["F32", "F16", "BF16", "Q8_0", "TQ1_0", "TQ2_0"]  # their C quantizers have no imatrix path
ROWS = 8


def activation_importance(cols: int, rng: np.random.Generator) -> np.ndarray:
    """A realistic imatrix: the mean square of heavy-tailed activations whose channels differ in scale
    by orders of magnitude (a few outlier channels), with some dead channels at exactly 0."""
    channel_scale = rng.lognormal(0.0, 1.5, cols)
    activations = rng.standard_t(4, (64, cols)) * channel_scale
    importance = (activations * activations).mean(axis=0)
    importance[rng.random(cols) < 0.05] = 0
    return importance.astype(np.float32)


def _zero_groups(importance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole 16- and 32-column groups of zero importance, so whole sub-blocks carry no weight."""
    importance = importance.copy().reshape(-1, 16)
    importance[rng.random(len(importance)) < 0.3] = 0
    return importance.reshape(-1)


IMPORTANCES: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "activations": activation_importance,
    "zero_groups": lambda cols, rng: _zero_groups(activation_importance(cols, rng), rng),
    "all_zero": lambda cols, rng: np.zeros(cols, np.float32),
    "uniform": lambda cols, rng: np.ones(cols, np.float32),
}


def _special_blocks(x: np.ndarray) -> np.ndarray:
    """All-zero and constant 32-weight blocks, a whole zero row, a constant 256-weight span, -0.0s."""
    x = x.copy()
    x[0] = 0
    x[1, :32] = 0
    x[2, 32:64] = 0.37
    x[3, :256] = -0.02
    x[4, ::3] = -0.0
    return x


DATA: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "normal": lambda rng, cols: rng.standard_normal((ROWS, cols)) * 0.02,
    "heavy_tailed": lambda rng, cols: rng.standard_t(2, (ROWS, cols)) * 0.02,
    "bf16_rounded": lambda rng, cols: _bf16_rounded(rng.standard_normal((ROWS, cols)) * 0.02),
    "special_blocks": lambda rng, cols: _special_blocks(rng.standard_normal((ROWS, cols)) * 0.02),
    # pruned weights, x * mask: the pruned negative weights become -0.0
    "pruned": lambda rng, cols: rng.standard_normal((ROWS, cols)) * (rng.random((ROWS, cols)) < 0.3),
    "small_integers": lambda rng, cols: rng.integers(-8, 8, (ROWS, cols)),  # exact rounding ties
    "positive_only": lambda rng, cols: np.abs(rng.standard_normal((ROWS, cols))),
    "extreme": lambda rng, cols: rng.standard_normal((ROWS, cols)) * np.logspace(-38, 30, ROWS)[:, None],
}


def make_data(case: str, cols: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{case}/{cols}".encode()))
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(DATA[case](rng, cols), dtype=np.float32)


def make_importance(kind: str, cols: int) -> np.ndarray:
    return IMPORTANCES[kind](cols, np.random.default_rng(zlib.crc32(f"{kind}/{cols}".encode())))


def numpy_quantize(x: np.ndarray, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    # Extreme inputs overflow float16 scales to inf by design, in C as in numpy.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return quantize(x, qtype, importance=importance, backend="numpy")


def row_lengths(qtype: str) -> list[int]:
    """256 and 1536 for every type; 576 (18 blocks of 32, not a multiple of 256) for the legacy ones."""
    return [256, 1536] if QTYPES[qtype].block_size == 256 else [256, 576, 1536]


@needs_ggml
@pytest.mark.parametrize("case", list(DATA))
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_numpy_matches_c_with_importance(qtype: str, case: str) -> None:
    for cols in row_lengths(qtype):
        x = make_data(case, cols)
        for kind in IMPORTANCES:
            importance = make_importance(kind, cols)
            oracle = ggml.quantize_rows(x, QTYPES[qtype].ggml_type, importance)
            what = f"{case}, {cols} columns, {kind} importance"
            assert_same_bytes(numpy_quantize(x, qtype, importance), oracle, qtype, what)


@needs_ggml
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_bit_exact_rounding_path_with_importance(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The searches round with a fast float path when values are in range; the bit-exact emulation of
    nearest_int must give the same bytes."""
    for module in (_common, kquants):
        monkeypatch.setattr(module, "fits", lambda *extremes: False)
    for case in ("heavy_tailed", "special_blocks", "small_integers", "extreme"):
        x = make_data(case, 1536)
        importance = make_importance("zero_groups", 1536)
        oracle = ggml.quantize_rows(x, QTYPES[qtype].ggml_type, importance)
        assert_same_bytes(numpy_quantize(x, qtype, importance), oracle, qtype, case)


@needs_ggml
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_chunk_boundaries_with_importance(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are cut into chunks of rows, blocks into cache-sized runs; the importance must follow both."""
    monkeypatch.setattr(_common, "_CHUNK_BLOCKS", 7)
    monkeypatch.setattr(kernels, "_CHUNK_WEIGHTS", 3 * 1536)
    x = make_data("heavy_tailed", 1536)
    importance = make_importance("activations", 1536)
    oracle = ggml.quantize_rows(x, QTYPES[qtype].ggml_type, importance)
    assert_same_bytes(numpy_quantize(x, qtype, importance), oracle, qtype, "7-block runs, 3-row chunks")


@needs_ggml
@pytest.mark.parametrize("backend", ["numpy", "ggml"])
@pytest.mark.parametrize("qtype", IGNORING)
def test_types_without_an_imatrix_path_ignore_it(qtype: str, backend: str) -> None:
    x = make_data("heavy_tailed", 1536)
    with_importance = quantize(x, qtype, importance=make_importance("activations", 1536), backend=backend)
    assert np.array_equal(with_importance, quantize(x, qtype, backend=backend))


@needs_ggml
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_no_importance_is_the_reference_path(qtype: str) -> None:
    """importance=None writes llama.cpp's reference bytes; an importance changes them."""
    x = make_data("heavy_tailed", 1536)
    reference = quantize(x, qtype, backend="numpy")
    assert_same_bytes(reference, ggml.quantize_rows(x, QTYPES[qtype].ggml_type), qtype, "no importance")
    assert not np.array_equal(
        reference, quantize(x, qtype, importance=make_importance("activations", 1536), backend="numpy")
    )


def importance_weighted_error(x: np.ndarray, data: np.ndarray, qtype: str, importance: np.ndarray) -> float:
    """sum over weights of importance * (x - dequantized)^2: the error the imatrix asks to minimise."""
    y = dequantize(data, qtype, x.shape).astype(np.float64)
    return float((importance * (x - y) ** 2).sum())


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_importance_lowers_the_importance_weighted_error(qtype: str) -> None:
    """Sanity that the weighted path is taken: a realistic imatrix lowers the error it weights."""
    x = make_data("heavy_tailed", 1536)
    importance = make_importance("activations", 1536)
    plain = importance_weighted_error(x, quantize(x, qtype, backend="numpy"), qtype, importance)
    weighted = importance_weighted_error(x, numpy_quantize(x, qtype, importance), qtype, importance)
    assert weighted < 0.9 * plain, (qtype, weighted / plain)


@pytest.mark.parametrize("shape", [(1535,), (1, 1536), (3072,)])
def test_importance_of_the_wrong_shape_is_a_value_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="one value per column"):
        quantize(np.zeros((2, 1536), np.float32), "Q4_K", importance=np.ones(shape, np.float32))


# ----------------------------------------------------------------------------- search="thorough"

THOROUGH = [name for name in QTYPES if "thorough" in QTYPES[name].searches]


def search_weights(x: np.ndarray, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    """The weights the thorough search minimises, shaped like x: the reference search's own, from the
    functions the byte-identical reference paths above weight their search with.

    Q6_K: x*x, or the imatrix. Q4_K/Q5_K: av_x + |x|, or importance*sqrt(sigma2 + x^2). Legacy: with
    an imatrix importance*sqrt(sigma2 + x^2); without, 1 (their reference search minimises nothing)."""
    if QTYPES[qtype].block_size == 32:
        return np.ones_like(x) if importance is None else legacy._row_weights(x, importance)
    if qtype == "Q6_K":
        return x * x if importance is None else np.broadcast_to(importance, x.shape)
    blocks = x.reshape(-1, 256)
    per_weight = None if importance is None else np.broadcast_to(importance, x.shape).reshape(-1, 256)
    return kquants._scale_min_weights(blocks, per_weight)[1].T.reshape(x.shape)


def search_error(x: np.ndarray, data: np.ndarray, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    """Per block, sum of w*(x - decoded)^2 in float64 with w from search_weights."""
    decoded = dequantize(data, qtype, x.shape).astype(np.float64)
    error = search_weights(x, qtype, importance).astype(np.float64) * (x - decoded) ** 2
    return error.reshape(-1, QTYPES[qtype].block_size).sum(axis=1)


@pytest.mark.parametrize("importance_kind", [None, "activations", "zero_groups"])
@pytest.mark.parametrize("case", ["normal", "heavy_tailed", "bf16_rounded", "special_blocks", "pruned"])
@pytest.mark.parametrize("qtype", THOROUGH)
def test_thorough_search_is_never_worse_and_lower_overall(qtype: str, case: str, importance_kind: str | None) -> None:
    x = make_data(case, 1536)
    importance = None if importance_kind is None else make_importance(importance_kind, 1536)
    reference = search_error(x, quantize(x, qtype, importance=importance, backend="numpy"), qtype, importance)
    thorough = search_error(x, quantize(x, qtype, importance=importance, search="thorough"), qtype, importance)
    worse = np.flatnonzero(thorough > reference)
    assert worse.size == 0, f"{worse.size} blocks got worse, e.g. {thorough[worse[0]]} > {reference[worse[0]]}"
    # 3-20% lower without an imatrix, 5-50% with one (benchmarks/RESULTS.md)
    assert thorough.sum() < 0.99 * reference.sum(), thorough.sum() / reference.sum()


@pytest.mark.parametrize("case", ["small_integers", "positive_only", "extreme"])
@pytest.mark.parametrize("qtype", THOROUGH)
def test_thorough_search_is_never_worse_on_odd_data(qtype: str, case: str) -> None:
    """Rounding ties, one-signed blocks, scales that overflow half: it runs, and no block whose error
    is a number gets worse (NaN errors compare false)."""
    x = make_data(case, 1536)
    for importance in (None, make_importance("zero_groups", 1536)):
        with np.errstate(over="ignore", invalid="ignore"):
            reference = search_error(x, numpy_quantize(x, qtype, importance), qtype, importance)
            found = quantize(x, qtype, importance=importance, search="thorough")
            thorough = search_error(x, found, qtype, importance)
        assert not np.any(thorough > reference)


@pytest.mark.parametrize("importance_kind", [None, "activations"])
@pytest.mark.parametrize("qtype", THOROUGH)
def test_thorough_blocks_decode_the_same_in_gguf_py(qtype: str, importance_kind: str | None) -> None:
    """The thorough search writes standard blocks: gguf-py's independent decoder reads the same values."""
    import gguf

    x = make_data("heavy_tailed", 1536)
    importance = None if importance_kind is None else make_importance(importance_kind, 1536)
    data = quantize(x, qtype, importance=importance, search="thorough")
    theirs = gguf.quants.dequantize(data.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
    assert np.array_equal(dequantize(data, qtype, x.shape), theirs)


@pytest.mark.parametrize("qtype", [name for name in NUMPY_TYPES if name not in THOROUGH])
def test_types_without_a_thorough_search_run_the_reference(qtype: str) -> None:
    x = make_data("heavy_tailed", 1536)
    importance = make_importance("activations", 1536)
    for imatrix in (None, importance):
        assert np.array_equal(
            quantize(x, qtype, importance=imatrix, search="thorough"),
            quantize(x, qtype, importance=imatrix, backend="numpy"),
        )


def test_thorough_search_runs_numpy_and_refuses_the_ggml_backend() -> None:
    x = make_data("normal", 256)
    assert np.array_equal(
        quantize(x, "Q4_K", search="thorough"), quantize(x, "Q4_K", search="thorough", backend="numpy")
    )
    if ggml.available():
        with pytest.raises(ValueError, match="reference search only"):
            quantize(x, "Q4_K", search="thorough", backend="ggml")
    with pytest.raises(ValueError, match="unknown search"):
        quantize(x, "Q4_K", search="exhaustive")


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_gguf: Path) -> list[np.ndarray]:
    """The first 96 rows of three real weight matrices of SmolLM2-135M-Instruct (from its Q4_1 GGUF),
    as float32: ffn_down ones, whose rows of 1536 fit K-quant blocks (the model's 576-wide rows do
    not). Their values sit on Q4_1's grid, which a search judged by stored values can partly recover."""
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    wanted = ("blk.0.ffn_down.weight", "blk.14.ffn_down.weight", "blk.29.ffn_down.weight")
    tensors = {t.name: t for t in reader.tensors if t.name in wanted}
    assert sorted(tensors) == sorted(wanted)
    return [
        gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)[:96].astype(np.float32) for name in wanted
    ]


@needs_ggml
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_real_weights_match_c_with_importance(qtype: str, smollm2_tensors: list[np.ndarray]) -> None:
    for x in smollm2_tensors:
        importance = make_importance("activations", x.shape[1])
        oracle = ggml.quantize_rows(x, QTYPES[qtype].ggml_type, importance)
        assert_same_bytes(numpy_quantize(x, qtype, importance), oracle, qtype, f"SmolLM2 weights {x.shape}")


@pytest.mark.parametrize("qtype", THOROUGH)
def test_thorough_search_on_real_weights(qtype: str, smollm2_tensors: list[np.ndarray]) -> None:
    for x in smollm2_tensors:
        importance = make_importance("activations", x.shape[1])
        for imatrix in (None, importance):
            reference = search_error(x, quantize(x, qtype, importance=imatrix, backend="numpy"), qtype, imatrix)
            thorough = search_error(x, quantize(x, qtype, importance=imatrix, search="thorough"), qtype, imatrix)
            assert np.all(thorough <= reference)
            # these weights sit on Q4_1's grid, which Q4_1 and Q5_1 may already decode (nearly) exactly
            if qtype not in ("Q4_1", "Q5_1"):
                assert thorough.sum() < 0.99 * reference.sum(), (qtype, x.shape, thorough.sum() / reference.sum())
