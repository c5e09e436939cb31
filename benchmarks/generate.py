"""Generation speed of slim's engine against llama.cpp, on the same GGUF, threads and prompt, in one run.

    slim:              slim.runtime.inference.engine Model.complete (greedy, --tokens tokens)
    llama-cpp-python:  Llama.create_completion, streamed (greedy, the same prompt and tokens)
    llama-bench:       tg<tokens> of llama.cpp's own benchmark, built from the sources llama-cpp-python
                       vendors (llama_cpp_source.build_tool, the first run builds it) and run on the
                       libllama/libggml llama-cpp-python ships: the same build slim runs on
    start-up:          process start -> first token on stdout of `slim run` (median of --ttft-runs)

Generation speed is tokens after the first over the time from the first token to the last (each
needs one decode and one sample), measured the same way on both Python sides; llama-bench
reports decode-only speed of a fresh context. slim and llama-cpp-python load the same
libllama, in this process, and take turns (--repeat rounds; the median is reported), so
background load hits both alike. The machine is shared: read ratios, not absolute figures.

    python benchmarks/generate.py [--model PATH] [--threads 2] [--tokens 128] [--repeat 3]
                                  [--llama-bench PATH] [--ttft-runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"


def slim_side(path: Path, threads: int, n_ctx: int):
    from slim.runtime.inference import engine

    model = engine.load(path, n_threads=threads, n_ctx=n_ctx)

    def run(prompt: str, tokens: int) -> tuple[int, float]:
        model.clear_cache()
        result = model.complete(prompt, temperature=0, max_tokens=tokens)
        return result.completion_tokens, result.timings.generation_tokens_per_s

    return model, run


def llama_cpp_python_side(path: Path, threads: int, n_ctx: int, extra_buffers: bool):
    import llama_cpp
    import llama_cpp.llama as high_level

    # Same weight placement as slim's engine (see engine.Model: the AMX path crashes).
    defaults = high_level.llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    high_level.llama_cpp.llama_model_default_params = model_params
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=512, verbose=False)
    finally:
        high_level.llama_cpp.llama_model_default_params = defaults

    def run(prompt: str, tokens: int) -> tuple[int, float]:
        llm.reset()
        stamps = []
        for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True):
            if chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
        n = len(stamps)  # one streamed chunk per token for this (ASCII, stop-free) text
        return n, (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0

    return llm, run


def find_llama_bench(given: str | None) -> Path:
    if given:
        return Path(given)
    from llama_cpp_source import build_tool

    return build_tool("llama-bench")


def llama_bench(binary: Path, path: Path, threads: int, tokens: int, repeat: int,
                library_dir: Path | None = None) -> tuple[float | str, str]:
    """llama-bench's tg<tokens> average (tokens/s) and the options it ran with. With library_dir,
    its libllama/libggml come from there (LD_LIBRARY_PATH beats the binary's RUNPATH): the same
    build slim and llama-cpp-python run on. Retried with --repack 0 if it fails (a build with
    ggml's AMX kernels can crash in them, see engine.Model)."""
    command = [str(binary), "-m", str(path), "-t", str(threads), "-p", "0", "-n", str(tokens),
               "-r", str(repeat), "-o", "json"]
    env = dict(os.environ)
    if library_dir is not None:
        env["LD_LIBRARY_PATH"] = f"{library_dir}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    for extra in ([], ["--repack", "0"]):
        run = subprocess.run(command + extra, capture_output=True, text=True, env=env)
        if run.returncode == 0:
            rows = json.loads(run.stdout)
            return float(rows[0]["avg_ts"]), " ".join(extra) or "defaults"
    return f"failed ({run.returncode}): {(run.stderr.strip().splitlines() or ['?'])[-1]}", ""


def slim_command() -> list[str]:
    script = Path(sys.executable).parent / "slim"
    return [str(script)] if script.exists() else [sys.executable, "-m", "slim.runtime.cli"]


def time_to_first_token(path: Path, threads: int) -> tuple[float, str]:
    """Seconds from starting `slim run` to the first byte of the reply on its stdout."""
    command = slim_command() + ["run", str(path), "Hi!", "--temperature", "0", "-n", "8", "--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    rest = proc.stdout.read()
    proc.wait()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"slim run failed: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, (first + rest).decode("utf-8", "replace").strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF to run [default: the SmolLM2-135M-Instruct Q4_1 asset]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each side; the median is reported")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--llama-bench", help="path of a llama-bench binary")
    parser.add_argument("--ttft-runs", type=int, default=5)
    args = parser.parse_args()

    from slim.runtime.store import assets
    from slim.runtime.inference import engine

    path = Path(args.model) if args.model else assets.fetch("smollm2-135m-instruct-q4_1.gguf")
    n_ctx = 1024
    L = engine.llama_bindings()
    system_info = L.llama_print_system_info().decode().strip()
    extra_buffers = "AMX_INT8 = 1" not in system_info
    print(f"model {path.name}, {args.threads} threads, {args.tokens} tokens, greedy, {args.repeat} rounds")
    print(f"llama-cpp-python's libllama: {system_info}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    bench_binary = find_llama_bench(args.llama_bench)
    import llama_cpp

    bench_sides = {f"llama-bench tg{args.tokens}": Path(llama_cpp.__file__).parent / "lib"}

    slim_model, run_slim = slim_side(path, args.threads, n_ctx)
    llm, run_llama = llama_cpp_python_side(path, args.threads, n_ctx, extra_buffers)
    run_slim(args.prompt, 4), run_llama(args.prompt, 4)  # warm-up: page in the weights
    slim_runs, llama_runs = [], []
    bench_runs: dict[str, list[float]] = {label: [] for label in bench_sides}
    bench_notes: dict[str, str] = {}
    for _ in range(args.repeat):  # the sides take turns, so background load hits all alike
        slim_runs.append(run_slim(args.prompt, args.tokens))
        llama_runs.append(run_llama(args.prompt, args.tokens))
        for label, library_dir in bench_sides.items():
            value, options = llama_bench(bench_binary, path, args.threads, args.tokens, 1, library_dir)
            if isinstance(value, float):
                bench_runs[label].append(value)
            bench_notes[label] = options if isinstance(value, float) else value
    slim_tps = statistics.median(tps for _, tps in slim_runs)
    llama_tps = statistics.median(tps for _, tps in llama_runs)
    counts = {n for n, _ in slim_runs + llama_runs}
    slim_model.close()
    del llm

    ttfts = []
    for _ in range(args.ttft_runs):
        seconds, reply = time_to_first_token(path, args.threads)
        ttfts.append(seconds)
    ttft = statistics.median(ttfts)

    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"tokens generated per run: {sorted(counts)}")
    print()
    print(f"{'generation (tokens/s)':<40}{'median':>10}{'runs':>36}{'slim / it':>12}")
    print(f"{'slim engine':<40}{slim_tps:>10.1f}{' '.join(f'{t:.1f}' for _, t in slim_runs):>36}{'':>12}")
    print(f"{'llama-cpp-python create_completion':<40}{llama_tps:>10.1f}"
          f"{' '.join(f'{t:.1f}' for _, t in llama_runs):>36}{slim_tps / llama_tps:>12.2f}")
    for label, runs in bench_runs.items():
        if runs:
            value = statistics.median(runs)
            print(f"{label:<40}{value:>10.1f}{' '.join(f'{t:.1f}' for t in runs):>36}{slim_tps / value:>12.2f}"
                  + (f"  ({bench_notes[label]})" if bench_notes[label] != "defaults" else ""))
        else:
            print(f"{label}: {bench_notes[label]}")
    print()
    print(f"slim run, process start -> first token: median {ttft:.2f} s "
          f"(runs {' '.join(f'{t:.2f}' for t in ttfts)}; target < 1.5 s)")


if __name__ == "__main__":
    main()
