"""The lattice i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): llama.cpp's C encoder,
slim's numpy decoder. The decoder must equal ggml's C dequantizer bit for bit, on the blocks the
encoder writes and on random blocks; the types llama.cpp refuses without an imatrix are refused in
one line."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels_imatrix import make_data, make_importance

from slim.kernels import QTYPES, dequantize, ggml, quantize

pytestmark = pytest.mark.skipif(not ggml.available(), reason="llama-cpp-python (the C encoder) is not installed")

LATTICE = [name for name in QTYPES if QTYPES[name].c_only]
NEEDS_IMATRIX = ["IQ2_XXS", "IQ2_XS", "IQ1_S"]
# Relative RMS error on Gaussian weights with an imatrix, a little above what each type reaches.
MAX_RELATIVE_RMS = {
    "IQ3_S": 0.16,
    "IQ3_XXS": 0.22,
    "IQ2_S": 0.29,
    "IQ2_XS": 0.35,
    "IQ2_XXS": 0.39,
    "IQ1_M": 0.54,
    "IQ1_S": 0.57,
}


def test_every_lattice_type_is_registered() -> None:
    assert sorted(LATTICE) == sorted(["IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"])


@pytest.mark.parametrize("case", ["heavy_tailed", "special_blocks", "pruned"])
@pytest.mark.parametrize("qtype", LATTICE)
def test_numpy_decoder_equals_c(qtype: str, case: str) -> None:
    x = make_data(case, 1536)
    data = quantize(x, qtype, importance=make_importance("activations", 1536))
    mine = dequantize(data, qtype, x.shape)
    theirs = ggml.dequantize_rows(data, QTYPES[qtype].ggml_type, qtype, x.shape)
    np.testing.assert_array_equal(mine.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", LATTICE)
def test_round_trip_error_is_sane(qtype: str) -> None:
    x = (np.random.default_rng(0).standard_normal((8, 512)) * 0.02).astype(np.float32)
    importance = np.random.default_rng(1).lognormal(0, 1, 512).astype(np.float32)
    back = dequantize(quantize(x, qtype, importance=importance), qtype, x.shape)
    assert np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2)) < MAX_RELATIVE_RMS[qtype]


@pytest.mark.parametrize("qtype", LATTICE)
def test_numpy_decoder_equals_c_on_random_blocks(qtype: str) -> None:
    """Random bytes reach every grid index, sign and scale code; the half scale is kept finite."""
    cls = QTYPES[qtype]
    rng = np.random.default_rng(cls.ggml_type)
    data = rng.integers(0, 256, (16, 2 * cls.type_size), dtype=np.uint8)
    if qtype != "IQ1_M":  # IQ1_M spreads its scale over the scales' top bits; any value is finite
        blocks = data.reshape(-1, cls.type_size)
        blocks[:, 0:2] = rng.uniform(-2, 2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    shape = (16, 2 * cls.block_size)
    mine = dequantize(data, qtype, shape)
    np.testing.assert_array_equal(
        mine.view(np.uint32), ggml.dequantize_rows(data, cls.ggml_type, qtype, shape).view(np.uint32)
    )


@pytest.mark.parametrize("qtype", NEEDS_IMATRIX)
def test_refused_without_an_imatrix(qtype: str) -> None:
    with pytest.raises(ValueError, match=rf"^{qtype} needs an importance matrix.*slim calibrate"):
        quantize(make_data("normal", 256), qtype)


@pytest.mark.parametrize("qtype", ["IQ3_S", "IQ2_S"])
def test_encoded_by_c_only(qtype: str) -> None:
    x = make_data("normal", 256)
    assert quantize(x, qtype).shape == (len(x), QTYPES[qtype].type_size)  # without an imatrix, as llama.cpp
    with pytest.raises(ValueError, match="C code only"):
        quantize(x, qtype, backend="numpy")
