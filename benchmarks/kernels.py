"""Quantization throughput: slim's numpy kernels next to llama.cpp's C reference, one thread, same data.

    python benchmarks/kernels.py [--weights N] [--repeats R] [--types Q3_K,Q2_K,Q4_K]

Prints three tables; each number is the best of --repeats runs on the same Gaussian weights.
  1. per type, millions of weights per second for numpy and for ggml_quantize_chunk (which is
     single-threaded), their ratio, and whether both wrote the same bytes;
  2. the same with an importance matrix (llama-quantize --imatrix), for the types that use one;
  3. search="thorough" against the reference search, without and with the imatrix: numpy speed of
     both, the slowdown, and the weighted squared error (the weights the reference search minimises)
     of thorough over reference.
The importance is a realistic stand-in: the mean square of heavy-tailed activations whose channels
differ in scale by orders of magnitude.
"""

from __future__ import annotations

import os

# One thread for numpy too, so the comparison with single-threaded C is fair; must precede the import.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from slim.kernels import QTYPES, dequantize, ggml, kquants, legacy, quantize  # noqa: E402

ROW_LENGTH = 4096  # a multiple of every block size
# the types whose C quantizer uses an importance matrix
WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def best_seconds(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def activation_importance(cols: int, rng: np.random.Generator) -> np.ndarray:
    """Mean square of heavy-tailed activations with log-normal channel scales, as llama-imatrix collects."""
    activations = rng.standard_t(4, (256, cols)) * rng.lognormal(0.0, 1.5, cols)
    return (activations * activations).mean(axis=0).astype(np.float32)


def search_error(x: np.ndarray, data: np.ndarray, qtype: str, importance: np.ndarray | None) -> float:
    """sum of w*(x - decoded)^2, w the weights the thorough search minimises: the reference search's,
    i.e. Q6_K x*x or the imatrix; Q4_K/Q5_K av_x + |x| or importance*sqrt(sigma2 + x^2); legacy quants
    1 (their reference minimises nothing) or importance*sqrt(sigma2 + x^2)."""
    if QTYPES[qtype].block_size == 32:
        weights = np.ones_like(x) if importance is None else legacy._row_weights(x, importance)
    elif qtype == "Q6_K":
        weights = x * x if importance is None else np.broadcast_to(importance, x.shape)
    else:
        per_weight = None if importance is None else np.broadcast_to(importance, x.shape).reshape(-1, 256)
        weights = kquants._scale_min_weights(x.reshape(-1, 256), per_weight)[1].T.reshape(x.shape)
    decoded = dequantize(data, qtype, x.shape).astype(np.float64)
    return float((weights.astype(np.float64) * (x - decoded) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=int, default=1 << 22, help="weights per run (default 4M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--types", default=",".join(QTYPES), help="comma-separated types (default: all)")
    args = parser.parse_args()

    rows = max(1, args.weights // ROW_LENGTH)
    x = (np.random.default_rng(0).standard_normal((rows, ROW_LENGTH)) * 0.02).astype(np.float32)
    has_c = ggml.available()
    print(
        f"{x.size:,} Gaussian weights in rows of {ROW_LENGTH}, best of {args.repeats}, one thread"
        + ("" if has_c else "; llama-cpp-python missing, so no C column")
    )
    print(f"{'type':<6} {'numpy Mw/s':>11} {'C Mw/s':>9} {'numpy/C':>8}  same bytes")
    for name in args.types.split(","):
        cls = QTYPES[name.strip().upper()]
        numpy_s, numpy_bytes = best_seconds(partial(quantize, x, cls.name, backend="numpy"), args.repeats)
        numpy_rate = x.size / numpy_s / 1e6
        if not has_c:
            print(f"{cls.name:<6} {numpy_rate:11.1f} {'-':>9} {'-':>8}  -")
            continue
        c_s, c_bytes = best_seconds(partial(ggml.quantize_rows, x, cls.ggml_type), args.repeats)
        c_rate = x.size / c_s / 1e6
        same = "yes" if np.array_equal(numpy_bytes, c_bytes) else "NO"
        print(f"{cls.name:<6} {numpy_rate:11.1f} {c_rate:9.1f} {numpy_rate / c_rate:8.2f}  {same}")

    importance = activation_importance(ROW_LENGTH, np.random.default_rng(1))
    weighted = [name.strip().upper() for name in args.types.split(",") if name.strip().upper() in WEIGHTED]
    print("\nwith an importance matrix (llama-quantize --imatrix)")
    print(f"{'type':<6} {'numpy Mw/s':>11} {'C Mw/s':>9} {'numpy/C':>8}  same bytes")
    for name in weighted:
        numpy_s, numpy_bytes = best_seconds(
            partial(quantize, x, name, importance=importance, backend="numpy"), args.repeats
        )
        numpy_rate = x.size / numpy_s / 1e6
        if not has_c:
            print(f"{name:<6} {numpy_rate:11.1f} {'-':>9} {'-':>8}  -")
            continue
        c_s, c_bytes = best_seconds(partial(ggml.quantize_rows, x, QTYPES[name].ggml_type, importance), args.repeats)
        c_rate = x.size / c_s / 1e6
        same = "yes" if np.array_equal(numpy_bytes, c_bytes) else "NO"
        print(f"{name:<6} {numpy_rate:11.1f} {c_rate:9.1f} {numpy_rate / c_rate:8.2f}  {same}")

    thorough = [name for name in weighted if "thorough" in QTYPES[name].searches]
    print('\nsearch="thorough" against the reference search (numpy, both)')
    print(
        f"{'type':<6} {'imatrix':<8} {'ref Mw/s':>9} {'thorough Mw/s':>14} {'slowdown':>9} {'error thorough/ref':>19}"
    )
    for name in thorough:
        for imatrix in (None, importance):
            ref_s, ref_bytes = best_seconds(
                partial(quantize, x, name, importance=imatrix, backend="numpy"), args.repeats
            )
            thorough_s, thorough_bytes = best_seconds(
                partial(quantize, x, name, importance=imatrix, search="thorough"), args.repeats
            )
            ratio = search_error(x, thorough_bytes, name, imatrix) / search_error(x, ref_bytes, name, imatrix)
            print(
                f"{name:<6} {'no' if imatrix is None else 'yes':<8} {x.size / ref_s / 1e6:9.1f} "
                f"{x.size / thorough_s / 1e6:14.1f} {thorough_s / ref_s:8.1f}x {ratio:19.4f}"
            )


if __name__ == "__main__":
    main()
