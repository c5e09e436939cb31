"""Generation speed of slim's engine against llama.cpp, on the same GGUF, threads and prompt, in one run.

    slim:              slim.runtime.inference Model.complete (greedy, --tokens tokens)
    llama-cpp-python:  Llama.create_completion, streamed (greedy, the same prompt and tokens)
    llama-bench:       tg<tokens> of llama.cpp's own benchmark, built from the sources llama-cpp-python
                       vendors (llama_cpp_source.build_tool, the first run builds it) and run on the
                       libllama/libggml llama-cpp-python ships: the same build slim runs on
    start-up:          process start -> first token on stdout of `slim run` (median of --ttft-runs)
    whole process:     `slim run --raw` of --whole-tokens tokens against a script that does the same with
                       llama-cpp-python (import, load, stream the completion to stdout), each timed from
                       process start to exit, taking turns (median of --whole-runs): what a user waits;
                       also the CPU seconds each used, which background load disturbs less

Generation speed is tokens after the first over the time from the first token to the last (each
needs one decode and one sample), measured the same way on both Python sides; llama-bench
reports decode-only speed of a fresh context. slim and llama-cpp-python load the same
libllama, in this process, and take turns (--repeat rounds; the median is reported), so
background load hits both alike. The machine is shared: read ratios, not absolute figures.
--startup-only measures the start-up and the whole processes alone (no llama-bench build).

    python benchmarks/generate.py [--model PATH] [--threads 2] [--tokens 128] [--repeat 3]
                                  [--llama-bench PATH] [--ttft-runs 5] [--whole-tokens 160] [--whole-runs 5]
                                  [--startup-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"


def slim_side(path: Path, threads: int, n_ctx: int):
    from slim.runtime import inference

    model = inference.load(path, n_threads=threads, n_ctx=n_ctx)

    def run(prompt: str, tokens: int) -> tuple[int, float]:
        model.clear_cache()
        result = model.complete(prompt, temperature=0, max_tokens=tokens)
        return result.completion_tokens, result.timings.generation_tokens_per_s

    return model, run


def llama_cpp_python_side(path: Path, threads: int, n_ctx: int, extra_buffers: bool):
    import llama_cpp
    import llama_cpp.llama as high_level

    # Same weight placement as slim's engine (see inference.Model: the AMX path crashes).
    defaults = high_level.llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    high_level.llama_cpp.llama_model_default_params = model_params
    try:
        llm = llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
        )
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


def llama_bench(
    binary: Path, path: Path, threads: int, tokens: int, repeat: int, library_dir: Path | None = None
) -> tuple[float | str, str]:
    """llama-bench's tg<tokens> average (tokens/s) and the options it ran with. With library_dir,
    its libllama/libggml come from there (LD_LIBRARY_PATH beats the binary's RUNPATH): the same
    build slim and llama-cpp-python run on. Retried with --repack 0 if it fails (a build with
    ggml's AMX kernels can crash in them, see inference.Model)."""
    command = [
        str(binary),
        "-m",
        str(path),
        "-t",
        str(threads),
        "-p",
        "0",
        "-n",
        str(tokens),
        "-r",
        str(repeat),
        "-o",
        "json",
    ]
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


# llama-cpp-python's side of the whole-process comparison: what a user of its Python API writes.
LLAMA_CPP_PYTHON_SCRIPT = """
import sys
import llama_cpp
import llama_cpp.llama as high_level

path, threads, n_ctx, tokens, prompt, extra_buffers = sys.argv[1:]
defaults = high_level.llama_cpp.llama_model_default_params


def model_params():  # the same weight placement as slim's engine (see generate.py)
    params = defaults()
    params.use_extra_bufts = extra_buffers == "1"
    return params


high_level.llama_cpp.llama_model_default_params = model_params
llm = llama_cpp.Llama(path, n_ctx=int(n_ctx), n_threads=int(threads), n_threads_batch=int(threads), verbose=False)
for chunk in llm.create_completion(prompt, max_tokens=int(tokens), temperature=0, repeat_penalty=1.0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"])
    sys.stdout.flush()
sys.stdout.write("\\n")
"""


def timed_process(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds from starting `command` to its exit, the CPU seconds it used, and what it printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {run.stderr.decode()[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu, run.stdout.decode("utf-8", "replace").strip()


def whole_processes(
    path: Path, threads: int, n_ctx: int, tokens: int, prompt: str, extra_buffers: bool, runs: int
) -> dict[str, tuple[list[float], list[float], str]]:
    """Per side ("slim", "llama-cpp-python"): the wall and CPU seconds of its whole processes, run
    taking turns, and the text it printed last."""
    commands = {
        "slim": slim_command()
        + [
            "run",
            str(path),
            prompt,
            "--raw",
            "--temperature",
            "0",
            "-n",
            str(tokens),
            "--threads",
            str(threads),
            "--ctx",
            str(n_ctx),
        ],
        "llama-cpp-python": [
            sys.executable,
            "-c",
            LLAMA_CPP_PYTHON_SCRIPT,
            str(path),
            str(threads),
            str(n_ctx),
            str(tokens),
            prompt,
            "1" if extra_buffers else "0",
        ],
    }
    for command in commands.values():  # warm-up: page in the weights and the libraries
        timed_process(command)
    walls: dict[str, list[float]] = {side: [] for side in commands}
    cpus: dict[str, list[float]] = {side: [] for side in commands}
    texts: dict[str, str] = {}
    for _ in range(runs):
        for side, command in commands.items():
            wall, cpu, texts[side] = timed_process(command)
            walls[side].append(wall)
            cpus[side].append(cpu)
    return {side: (walls[side], cpus[side], texts[side]) for side in commands}


def decode_comparison(path: Path, args: argparse.Namespace, n_ctx: int, extra_buffers: bool) -> None:
    """Generation speed of slim's engine, llama-cpp-python and llama-bench, taking turns; prints the table."""
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

    print(f"tokens generated per run: {sorted(counts)}")
    print()
    print(f"{'generation (tokens/s)':<40}{'median':>10}{'runs':>36}{'slim / it':>12}")
    print(f"{'slim engine':<40}{slim_tps:>10.1f}{' '.join(f'{t:.1f}' for _, t in slim_runs):>36}{'':>12}")
    print(
        f"{'llama-cpp-python create_completion':<40}{llama_tps:>10.1f}"
        f"{' '.join(f'{t:.1f}' for _, t in llama_runs):>36}{slim_tps / llama_tps:>12.2f}"
    )
    for label, runs in bench_runs.items():
        if runs:
            value = statistics.median(runs)
            print(
                f"{label:<40}{value:>10.1f}{' '.join(f'{t:.1f}' for t in runs):>36}{slim_tps / value:>12.2f}"
                + (f"  ({bench_notes[label]})" if bench_notes[label] != "defaults" else "")
            )
        else:
            print(f"{label}: {bench_notes[label]}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF to run [default: the SmolLM2-135M-Instruct Q4_1 asset]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each side; the median is reported")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--llama-bench", help="path of a llama-bench binary")
    parser.add_argument("--ttft-runs", type=int, default=5)
    parser.add_argument("--whole-tokens", type=int, default=160, help="tokens of each whole-process run")
    parser.add_argument("--whole-runs", type=int, default=5, help="whole-process runs of each side")
    parser.add_argument(
        "--startup-only",
        action="store_true",
        help="only the first token and the whole processes (no generation table, no llama-bench)",
    )
    args = parser.parse_args()

    from slim.runtime import inference
    from slim.runtime.store import assets

    path = Path(args.model) if args.model else assets.fetch("smollm2-135m-instruct-q4_1.gguf")
    n_ctx = 1024
    L = inference.llama_bindings()
    system_info = L.llama_print_system_info().decode().strip()
    extra_buffers = "AMX_INT8 = 1" not in system_info
    print(f"model {path.name}, {args.threads} threads, {args.tokens} tokens, greedy, {args.repeat} rounds")
    print(f"llama-cpp-python's libllama: {system_info}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    if not args.startup_only:
        decode_comparison(path, args, n_ctx, extra_buffers)

    ttfts = []
    for _ in range(args.ttft_runs):
        seconds, reply = time_to_first_token(path, args.threads)
        ttfts.append(seconds)
    ttft = statistics.median(ttfts)
    whole = whole_processes(path, args.threads, n_ctx, args.whole_tokens, args.prompt, extra_buffers, args.whole_runs)
    model = inference.load(path, n_ctx=n_ctx, n_threads=args.threads)
    printed = {side: len(model.tokenize(text, add_special=False)) for side, (_, _, text) in whole.items()}
    model.close()

    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"slim run, process start -> first token: median {ttft:.2f} s "
        f"(runs {' '.join(f'{t:.2f}' for t in ttfts)}; target < 1.5 s)"
    )
    print()
    print(f"whole process, --max-tokens {args.whole_tokens}, start to exit; median of {args.whole_runs}")
    print(f"{'':<32}{'wall s':>8}{'CPU s':>8}{'tokens':>8}   wall runs")
    medians = {}
    for side, label in (("slim", "slim run --raw"), ("llama-cpp-python", "llama-cpp-python script")):
        walls, cpus, _ = whole[side]
        medians[side] = statistics.median(walls), statistics.median(cpus)
        print(
            f"{label:<32}{medians[side][0]:>8.2f}{medians[side][1]:>8.2f}{printed[side]:>8}   "
            + " ".join(f"{t:.2f}" for t in walls)
        )
    (slim_wall, slim_cpu), (script_wall, script_cpu) = medians["slim"], medians["llama-cpp-python"]
    print(
        f"slim run / llama-cpp-python script, speed: {script_wall / slim_wall:.2f}x by wall time "
        f"(target at least 1.0x), {script_cpu / slim_cpu:.2f}x by CPU time"
    )
    print("(tokens: the printed text retokenized; greedy on the same libllama can part ways on a near-tie)")


if __name__ == "__main__":
    main()
