"""The 2-, 3-bit K-quants, the non-linear 4-bit and the ternary types: the facts the parametrized
oracle tests of test_kernels.py and test_kernels_imatrix.py (which cover them byte for byte) do not
show on their own: the level table's tie rule, and that ternary weights survive exactly."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import assert_same_bytes

from slim.kernels import QTYPES, dequantize, ggml, iquants, quantize

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="llama-cpp-python (the C oracle) is not installed")


def test_nearest_level_breaks_ties_upwards_and_sends_nan_to_the_top() -> None:
    levels = iquants.KVALUES
    midpoints = (levels[:-1] + levels[1:]) / 2  # exactly halfway (every gap is odd or even alike in float32)
    np.testing.assert_array_equal(iquants.nearest_level(midpoints.astype(np.float32)), np.arange(1, 16))
    edges = np.array([-1e9, -127, 113, 1e9, np.nan, -np.inf, np.inf], dtype=np.float32)
    np.testing.assert_array_equal(iquants.nearest_level(edges), [0, 0, 15, 15, 15, 0, 15])


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_ternary_weights_round_trip_exactly(qtype: str) -> None:
    rng = np.random.default_rng(3)
    trits = rng.integers(-1, 2, (4, 512)).astype(np.float32)
    trits[:, ::256] = 1  # every block reaches its scale
    x = trits * np.float32(0.25)
    np.testing.assert_array_equal(dequantize(quantize(x, qtype, backend="numpy"), qtype, x.shape), x)


@needs_ggml
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"])
def test_one_row_of_one_block(qtype: str) -> None:
    """The smallest tensor llama-quantize meets: one row of one block, with a -0.0 and a tie."""
    cls = QTYPES[qtype]
    x = np.linspace(-1, 1, cls.block_size, dtype=np.float32).reshape(1, -1)
    x[0, 1] = -0.0
    x[0, 2] = x[0, 3] = 0.5
    assert_same_bytes(quantize(x, qtype, backend="numpy"), ggml.quantize_rows(x, cls.ggml_type), qtype, "one block")
