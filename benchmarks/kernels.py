"""Quantization throughput: slim's numpy kernels next to llama.cpp's C reference, one thread, same data.

    python benchmarks/kernels.py [--weights N] [--repeats R] [--types Q4_K,Q5_K,Q6_K]

Prints, per type, millions of weights per second for numpy and for ggml_quantize_chunk (which is
single-threaded), their ratio, and whether both wrote the same bytes. Each number is the best of
--repeats runs on the same Gaussian weights.
"""

from __future__ import annotations

import os

# One thread for numpy too, so the comparison with single-threaded C is fair; must precede the import.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from slim.kernels import QTYPES, ggml, quantize  # noqa: E402

ROW_LENGTH = 4096  # a multiple of every block size


def best_seconds(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=int, default=1 << 22, help="weights per run (default 4M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--types", default=",".join(QTYPES), help="comma-separated types (default: all)")
    args = parser.parse_args()

    rows = max(1, args.weights // ROW_LENGTH)
    x = (np.random.default_rng(0).standard_normal((rows, ROW_LENGTH)) * 0.02).astype(np.float32)
    has_c = ggml.available()
    print(f"{x.size:,} Gaussian weights in rows of {ROW_LENGTH}, best of {args.repeats}, one thread"
          + ("" if has_c else "; llama-cpp-python missing, so no C column"))
    print(f"{'type':<6} {'numpy Mw/s':>11} {'C Mw/s':>9} {'numpy/C':>8}  same bytes")
    for name in args.types.split(","):
        cls = QTYPES[name.strip().upper()]
        numpy_s, numpy_bytes = best_seconds(lambda: quantize(x, cls.name, backend="numpy"), args.repeats)
        numpy_rate = x.size / numpy_s / 1e6
        if not has_c:
            print(f"{cls.name:<6} {numpy_rate:11.1f} {'-':>9} {'-':>8}  -")
            continue
        c_s, c_bytes = best_seconds(lambda: ggml.quantize_rows(x, cls.ggml_type), args.repeats)
        c_rate = x.size / c_s / 1e6
        same = "yes" if np.array_equal(numpy_bytes, c_bytes) else "NO"
        print(f"{cls.name:<6} {numpy_rate:11.1f} {c_rate:9.1f} {numpy_rate / c_rate:8.2f}  {same}")


if __name__ == "__main__":
    main()
