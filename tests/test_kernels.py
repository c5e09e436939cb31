"""slim's numpy kernels write the same bytes as llama.cpp's C quantizer, for every type.

The oracle is ggml_quantize_chunk in the libggml-base that llama-cpp-python ships
(slim.kernels.ggml); the gguf package's dequantizers check the block layouts independently.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest

from slim.kernels import QTYPES, _common, dequantize, ggml, kquants, quantize

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="llama-cpp-python (the C oracle) is not installed")

NUMPY_TYPES = [
    name for name in QTYPES if not QTYPES[name].c_only
]  # the lattice i-quants: tests/test_kernels_lattice.py
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ROWS, COLS = 16, 1024  # 64 K-quant blocks or 512 legacy blocks per case


def _bf16_rounded(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32: weights read from BF16."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32)


def _zero_groups(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero random 16-weight groups (so whole 16- and 32-weight sub-blocks), one whole block and one sub-block."""
    x = x.reshape(-1, 16).copy()
    x[rng.random(len(x)) < 0.5] = 0
    x = x.reshape(ROWS, COLS)
    x[0, :256] = 0
    x[1, :32] = 0
    return x


def _extreme(x: np.ndarray) -> np.ndarray:
    """Rows from 1e-38 (float32 denormals) to 1e30 (half overflows to inf): C's garbage-in paths."""
    scales = np.array([1e-38, 1e-30, 1e-12, 1e6, 1e15, 1e30], dtype=np.float32)
    return (x * scales[np.arange(ROWS) % len(scales), None]).astype(np.float32)


CASES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "normal": lambda rng: rng.standard_normal((ROWS, COLS)) * 0.02,
    "heavy_tailed": lambda rng: rng.standard_t(2, (ROWS, COLS)) * 0.02,
    "bf16_rounded": lambda rng: _bf16_rounded(rng.standard_normal((ROWS, COLS)) * 0.02),
    "all_zero": lambda rng: np.zeros((ROWS, COLS)),
    "constant": lambda rng: np.full((ROWS, COLS), 0.37),
    "negative_constant": lambda rng: np.full((ROWS, COLS), -0.37),
    "tiny": lambda rng: rng.standard_normal((ROWS, COLS)) * 1e-6,
    "huge": lambda rng: rng.standard_normal((ROWS, COLS)) * 1e3,
    "zero_subblocks": lambda rng: _zero_groups(rng.standard_normal((ROWS, COLS)), rng),
    "negative_only": lambda rng: -np.abs(rng.standard_normal((ROWS, COLS))),
    "positive_only": lambda rng: np.abs(rng.standard_normal((ROWS, COLS))),
    "sparse": lambda rng: np.where(rng.random((ROWS, COLS)) < 0.05, rng.standard_normal((ROWS, COLS)), 0.0),
    # x * mask, as a pruning mask is often applied: the pruned negative weights become -0.0
    "signed_zeros": lambda rng: rng.standard_normal((ROWS, COLS)) * (rng.random((ROWS, COLS)) < 0.05),
    "small_integers": lambda rng: rng.integers(-8, 8, (ROWS, COLS)),  # exact rounding ties
    "extreme": lambda rng: _extreme(rng.standard_normal((ROWS, COLS))),
}


def make_case(name: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return np.ascontiguousarray(CASES[name](rng), dtype=np.float32)


def numpy_quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    # Extreme inputs overflow float16 scales to inf by design, in C as in numpy.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return quantize(x, qtype, backend="numpy")


def assert_same_bytes(mine: np.ndarray, oracle: np.ndarray, qtype: str, what: str) -> None:
    """Equal bytes, or a message naming how many blocks differ and the first one."""
    assert mine.shape == oracle.shape, (mine.shape, oracle.shape)
    blocks_mine = mine.reshape(-1, QTYPES[qtype].type_size)
    blocks_oracle = oracle.reshape(-1, QTYPES[qtype].type_size)
    bad = np.flatnonzero((blocks_mine != blocks_oracle).any(axis=1))
    assert bad.size == 0, (
        f"{qtype} on {what}: {bad.size} of {len(blocks_mine)} blocks differ from ggml; first block {bad[0]}:\n"
        f"numpy {blocks_mine[bad[0]].tobytes().hex()}\nggml  {blocks_oracle[bad[0]].tobytes().hex()}"
    )


@needs_ggml
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("qtype", NUMPY_TYPES)
def test_numpy_matches_c_oracle(qtype: str, case: str) -> None:
    x = make_case(case)
    assert_same_bytes(numpy_quantize(x, qtype), ggml.quantize_rows(x, QTYPES[qtype].ggml_type), qtype, case)


@needs_ggml
@pytest.mark.parametrize("qtype", NUMPY_TYPES)
def test_backends_write_identical_bytes(qtype: str) -> None:
    x = make_case("heavy_tailed")
    from_c = quantize(x, qtype, backend="ggml")
    assert_same_bytes(quantize(x, qtype, backend="numpy"), from_c, qtype, "backend='numpy' vs 'ggml'")
    assert_same_bytes(quantize(x, qtype), from_c, qtype, "backend='auto' vs 'ggml'")


@needs_ggml
@pytest.mark.parametrize("case", ["normal", "zero_subblocks", "small_integers", "extreme"])
@pytest.mark.parametrize("qtype", K_QUANTS)
def test_bit_exact_rounding_path_matches_c(qtype: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The K-quants round with a fast float path when values are in range; the bit-exact emulation
    of nearest_int (the fallback) must give the same bytes everywhere."""
    for module in (_common, kquants):
        monkeypatch.setattr(module, "fits", lambda *extremes: False)
    x = make_case(case)
    assert_same_bytes(numpy_quantize(x, qtype), ggml.quantize_rows(x, QTYPES[qtype].ggml_type), qtype, case)


@needs_ggml
@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quants_across_chunk_boundaries(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks are processed in cache-sized chunks; 7-block chunks over 64 blocks leave a ragged last one."""
    monkeypatch.setattr(_common, "_CHUNK_BLOCKS", 7)
    x = make_case("zero_subblocks")
    assert_same_bytes(numpy_quantize(x, qtype), ggml.quantize_rows(x, QTYPES[qtype].ggml_type), qtype, "7-block chunks")


def test_nearest_int_is_ggmls() -> None:
    """Round half to even within +-4194303; beyond, C's mantissa-bit garbage, which callers must see too."""
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 4194302.5, -4194302.5], dtype=np.float32)
    np.testing.assert_array_equal(kquants.nearest_int(ties), [0, 2, 2, 0, -2, -2, 4194302, -4194302])
    x = np.random.default_rng(0).uniform(-4194303, 4194303, 10_000).astype(np.float32)
    np.testing.assert_array_equal(kquants.nearest_int(x), np.rint(x).astype(np.int32))
    outside = np.array([4194304.0, -4194305.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(kquants.nearest_int(outside), [-4194304, 4194302, -4194304, -4194304, 0])


@pytest.mark.parametrize("case", ["normal", "heavy_tailed", "zero_subblocks", "huge"])
@pytest.mark.parametrize("qtype", NUMPY_TYPES)
def test_dequantize_matches_gguf(qtype: str, case: str) -> None:
    x = make_case(case)
    data = numpy_quantize(x, qtype)
    mine = dequantize(data, qtype, x.shape)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    np.testing.assert_array_equal(mine.view(np.uint32), theirs.reshape(x.shape).view(np.uint32))


# Offsets of the float16 fields in each quantized block; random bytes elsewhere cover every bit of the layout.
HALF_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
    "TQ1_0": [52],
    "TQ2_0": [64],
}


@pytest.mark.parametrize("qtype", list(HALF_FIELDS))
def test_dequantize_random_blocks_matches_gguf(qtype: str) -> None:
    cls = QTYPES[qtype]
    rng = np.random.default_rng(cls.ggml_type)
    data = rng.integers(0, 256, (64, 4 * cls.type_size), dtype=np.uint8)
    blocks = data.reshape(-1, cls.type_size)
    for offset in HALF_FIELDS[qtype]:  # finite scales, so both sides compute plain numbers
        blocks[:, offset : offset + 2] = rng.uniform(-2, 2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    shape = (64, 4 * cls.block_size)
    mine = dequantize(data, qtype, shape)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    np.testing.assert_array_equal(mine.view(np.uint32), theirs.reshape(shape).view(np.uint32))


# Relative RMS error bounds on Gaussian weights, a little above what each type reaches.
MAX_RELATIVE_RMS = {
    "F32": 0.0,
    "F16": 5e-4,
    "BF16": 4e-3,
    "Q8_0": 0.01,
    "Q6_K": 0.03,
    "Q5_0": 0.06,
    "Q5_1": 0.06,
    "Q5_K": 0.05,
    "Q4_0": 0.12,
    "Q4_1": 0.12,
    "Q4_K": 0.1,
    "IQ4_NL": 0.09,
    "IQ4_XS": 0.09,
    "Q3_K": 0.17,
    "Q2_K": 0.32,
    # ternary: d = max|x| sends most Gaussian weights to 0; ternary weights round-trip exactly (test_kernels_lowbit)
    "TQ1_0": 0.85,
    "TQ2_0": 0.85,
}


def _relative_rms(qtype: str, x: np.ndarray) -> float:
    back = dequantize(numpy_quantize(x, qtype), qtype, x.shape)
    return float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2)))


@pytest.mark.parametrize("qtype", NUMPY_TYPES)
def test_round_trip_error_is_sane(qtype: str) -> None:
    assert _relative_rms(qtype, make_case("normal")) <= MAX_RELATIVE_RMS[qtype]


def test_k_quants_beat_legacy_quants_of_the_same_width() -> None:
    x = make_case("heavy_tailed")
    err = {name: _relative_rms(name, x) for name in ("Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_0", "Q5_K", "Q6_K")}
    assert err["Q4_K"] < err["Q4_0"] and err["Q5_K"] < err["Q5_0"]
    assert err["Q6_K"] < err["Q5_K"] < err["Q4_K"] < err["Q3_K"] < err["Q2_K"]


def test_unknown_type_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"unknown quantization type 'Q7_K'; choose one of F32, .*Q6_K"):
        quantize(np.zeros((1, 256), np.float32), "Q7_K")
    with pytest.raises(ValueError, match="unknown quantization type"):
        dequantize(np.zeros(144, np.uint8), "nope", (1, 256))


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_bad_row_length_is_a_value_error(qtype: str) -> None:
    message = rf"{qtype} packs 256 weights per block.*got 576 \(nearest that fit: 512, 768\)"
    with pytest.raises(ValueError, match=message):
        quantize(np.zeros((2, 576), np.float32), qtype)
    with pytest.raises(ValueError, match="needs"):
        dequantize(np.zeros(100, np.uint8), qtype, (1, 256))


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_gguf: Path) -> list[tuple[str, np.ndarray]]:
    """Every 2-D weight tensor of SmolLM2-135M-Instruct (Q4_1 GGUF), dequantized to float32 rows of 256."""
    reader = gguf.GGUFReader(smollm2_gguf)
    weights = []
    for tensor in reader.tensors:
        if len(tensor.shape) == 2:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            weights.append((tensor.name, values.reshape(-1, 256)))
    assert len(weights) > 200
    return weights


@needs_ggml
@pytest.mark.parametrize("qtype", NUMPY_TYPES)
def test_real_model_matches_c_oracle(qtype: str, smollm2_weights: list[tuple[str, np.ndarray]]) -> None:
    """Every weight tensor of a real model, whole; ggml runs in a second thread (it releases the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        for name, rows in smollm2_weights:
            from_c = pool.submit(ggml.quantize_rows, rows, QTYPES[qtype].ggml_type)
            assert_same_bytes(numpy_quantize(rows, qtype), from_c.result(), qtype, name)
