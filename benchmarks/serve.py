"""Serving throughput: `slim serve` against llama-cpp-python's server (and llama.cpp's llama-server),
on the same GGUF, threads and machine, in one run.

Each server is started as a subprocess on a free 127.0.0.1 port, warmed up with one request, then
--clients streaming clients start together, each asking --requests completions (the same prompts
for every server: "Once upon a time"-style openings, greedy, --tokens tokens, end-of-text ignored
by counting whatever comes back). Reported per server:

    tokens/s      generated tokens of all clients over the wall time from the first request to the last reply
    TTFT p50/p95  request sent -> first text chunk, over all requests

slim decodes up to --parallel sequences in one batch; llama-cpp-python's server handles one
request at a time (the others wait); llama-server (only with --llama-server PATH, or --build-llama-server
to build it from the sources llama-cpp-python vendors: a long build) uses its own slots (-np).
The machine is shared: read ratios, not absolute figures.

    python benchmarks/serve.py [--model PATH] [--threads 2] [--clients 8] [--tokens 64] [--requests 1]
                               [--parallel 8] [--skip-llama-cpp-python] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The history of the printing press begins",
    "In the year 2150, the first city on Mars",
    "A recipe for a simple tomato soup:",
    "The most important thing to know about bicycles is",
    "Dear diary, today I finally",
    "The old lighthouse keeper looked at the sea and",
    "Ten facts about the ocean:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def stream_completion(base: str, model: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text chunk, seconds in all, tokens generated) of one streamed request."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
    total = time.perf_counter() - start
    generated = usage["completion_tokens"] if usage else chunks
    return (first if first is not None else total), total, generated


def load_test(base: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    stream_completion(base, model, "Hello", 4)  # warm-up
    ttfts: list[float] = []
    generated: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        try:
            barrier.wait()
            for r in range(requests):
                first, _, n = stream_completion(base, model, PROMPTS[(index + r) % len(PROMPTS)], tokens)
                ttfts.append(first)
                generated.append(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    ttfts.sort()
    return {"tokens": sum(generated), "wall_s": wall, "tokens_per_s": sum(generated) / wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def run_server(name: str, command: list[str], model: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    print(f"{name}: {' '.join(command)}", file=sys.stderr)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, process)
        return load_test(base, model, args.clients, args.requests, args.tokens)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF to serve [default: the SmolLM2-135M-Instruct Q4_1 asset]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--parallel", type=int, default=8, help="sequences slim (and llama-server) decode together")
    parser.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    parser.add_argument("--skip-llama-cpp-python", action="store_true")
    parser.add_argument("--llama-server", help="path of a llama-server binary")
    parser.add_argument("--build-llama-server", action="store_true", help="build llama-server first (long)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    if args.model:
        path = Path(args.model)
    else:
        from slim.runtime import assets

        path = assets.fetch("smollm2-135m-instruct-q4_1.gguf")
    python = sys.executable
    results: dict[str, dict[str, float]] = {}

    port = free_port()
    results["slim serve"] = run_server("slim serve", [
        python, "-m", "slim.runtime.cli", "serve", str(path), "--port", str(port), "--threads", str(args.threads),
        "--parallel", str(args.parallel), "--ctx", str(args.ctx)], path.name, port, args)

    if not args.skip_llama_cpp_python:
        port = free_port()
        results["llama-cpp-python server"] = run_server("llama-cpp-python server", [
            python, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx),
            "--interrupt_requests", "False"], str(path), port, args)

    llama_server = args.llama_server
    if llama_server is None and args.build_llama_server:
        sys.path.insert(0, str(Path(__file__).parent))
        from llama_cpp_source import build_tool

        llama_server = str(build_tool("llama-server"))
    if llama_server:
        port = free_port()
        results["llama-server"] = run_server("llama-server", [
            llama_server, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
            "-np", str(args.parallel), "-c", str(args.ctx * args.parallel), "--no-webui"], path.name, port, args)

    print(f"\n{args.clients} streaming clients x {args.requests} request(s), max_tokens {args.tokens}, "
          f"{args.threads} threads, {path.name}")
    print(f"{'server':<26}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}")
    for name, r in results.items():
        print(f"{name:<26}{r['tokens']:>8}{r['wall_s']:>9.2f}{r['tokens_per_s']:>10.1f}"
              f"{r['ttft_p50_s']:>10.3f}{r['ttft_p95_s']:>10.3f}")
    ours = results["slim serve"]
    for name, r in results.items():
        if name != "slim serve":
            print(f"slim serve / {name}: tokens/s x{ours['tokens_per_s'] / r['tokens_per_s']:.2f}, "
                  f"TTFT p50 x{ours['ttft_p50_s'] / r['ttft_p50_s']:.2f} (lower is better)")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
