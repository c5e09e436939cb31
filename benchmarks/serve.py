"""Serving throughput: `slim serve` against llama-cpp-python's server (and llama.cpp's llama-server),
on the same GGUF, threads and machine, in one run.

Each server is started as a subprocess on a free 127.0.0.1 port, warmed up with one request, then
--clients streaming clients start together, each asking --requests completions (the same prompts
for every server: "Once upon a time"-style openings, greedy, --tokens tokens, end-of-text ignored
by counting whatever comes back). Reported per server:

    tokens/s      generated tokens of all clients over the wall time from the first request to the last reply
    TTFT p50/p95  request sent -> first text chunk, over all requests
    CPU s         CPU time the server process used during the load (all its threads): what the
                  work costs, which other processes on a shared machine disturb far less than wall time

--agent runs an agent-like workload instead: --clients conversations of --turns turns each, every
turn a streamed chat completion that resends the whole conversation (a ~1,500-token system prompt
shared by all, then the turns so far), the conversations more than the servers' --parallel slots,
so a turn often finds its conversation's slot taken by another. Both servers run with a prompt
cache of --cache-ram MiB (slim's --cache-ram, llama-server's own --cache-ram). TTFT here is over the
turns after each conversation's first (what the prompt cache is for), beside all turns.

--decode-steps measures llama.cpp alone instead, in this process: CPU milliseconds per llama_decode
of one token for each of 1..16 sequences (what batching buys on this machine), and for 8 sequences
given in shuffled rather than ascending order (what slim's scheduler avoids: with one KV stream per
sequence, llama.cpp splits a batch into runs of consecutive sequence ids).

With --rounds N the servers take turns N times (slim, the others, slim, ...) and each figure is the
median of its rounds, so a burst of load from elsewhere does not land on one server only.

slim decodes up to --parallel sequences in one batch; llama-cpp-python's server handles one
request at a time (the others wait); llama-server (only with --llama-server PATH, or --build-llama-server
to build it from the sources llama-cpp-python vendors: a long build) uses its own slots (-np).
The machine is shared: read ratios, not absolute figures.

    python benchmarks/serve.py [--model PATH] [--threads 2] [--clients 8] [--tokens 64] [--requests 1]
                               [--parallel 8] [--rounds 3] [--skip-llama-cpp-python] [--llama-server PATH]
    python benchmarks/serve.py --agent [--clients 8] [--turns 6] [--parallel 4] [--cache-ram 256] --build-llama-server
    python benchmarks/serve.py --decode-steps [--model PATH]
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
from collections.abc import Callable
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
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
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


def stream_chat(base: str, model: str, messages: list[dict[str, str]], tokens: int) -> tuple[float, str, int]:
    """(seconds to the first text chunk, the reply, tokens generated) of one streamed chat turn."""
    body = json.dumps(
        {
            "model": model,
            "messages": messages,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    first, text, usage = None, [], None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    text.append(choice["delta"]["content"])
                    if first is None:
                        first = time.perf_counter() - start
    waited = first if first is not None else time.perf_counter() - start
    return waited, "".join(text), usage["completion_tokens"] if usage else len(text)


AGENT_ASKS = [
    "Summarise the passage above in one sentence.",
    "Which names does it mention?",
    "What happened first?",
    "Give one question a reader might ask.",
    "Name a place from the text.",
    "Say which part is most surprising.",
    "List two dates or numbers it gives.",
    "What would you look up next?",
]


def agent_system_prompt() -> str:
    """About 1,500 tokens of instructions and reference text, the same for every conversation."""
    from slim.runtime.store import assets

    text = assets.wiki_text("test").read_text(encoding="utf-8")
    return "You are a careful research assistant. Answer from the reference text below.\n\n" + text[:6000]


def concurrently(work: Callable[[int], None], n: int) -> float:
    """work(0) ... work(n - 1), each in its own thread, started together: the seconds they took.
    Raises RuntimeError naming the first failure when any failed."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} clients failed: {errors[0]!r}")
    return time.perf_counter() - start


def agent_test(base: str, model: str, conversations: int, turns: int, tokens: int) -> dict[str, float]:
    """Each conversation in its own thread, its turns one after another, every turn resending it all."""
    system = agent_system_prompt()
    first_turns: list[float] = []
    later_turns: list[float] = []
    generated: list[int] = []

    def conversation(index: int) -> None:
        messages = [{"role": "system", "content": system}]
        for turn in range(turns):
            messages.append({"role": "user", "content": AGENT_ASKS[(index + turn) % len(AGENT_ASKS)]})
            first, reply, n = stream_chat(base, model, messages, tokens)
            (later_turns if turn else first_turns).append(first)
            generated.append(n)
            messages.append({"role": "assistant", "content": reply})

    wall = concurrently(conversation, conversations)
    every = sorted(first_turns + later_turns)
    return {
        "tokens": sum(generated),
        "wall_s": wall,
        "tokens_per_s": sum(generated) / wall,
        "ttft_p50_s": statistics.median(sorted(later_turns)),
        "ttft_p95_s": sorted(later_turns)[min(len(later_turns) - 1, round(0.95 * (len(later_turns) - 1)))],
        "ttft_all_p50_s": statistics.median(every),
    }


def load_test(base: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    ttfts: list[float] = []
    generated: list[int] = []

    def client(index: int) -> None:
        for r in range(requests):
            first, _, n = stream_completion(base, model, PROMPTS[(index + r) % len(PROMPTS)], tokens)
            ttfts.append(first)
            generated.append(n)

    wall = concurrently(client, clients)
    ttfts.sort()
    return {
        "tokens": sum(generated),
        "wall_s": wall,
        "tokens_per_s": sum(generated) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_server(name: str, command: list[str], model: str, args: argparse.Namespace) -> dict[str, float]:
    """Start the server (its command has {port} to fill), load it, stop it."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    base = f"http://127.0.0.1:{port}"
    print(f"{name}: {' '.join(command)}", file=sys.stderr)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, process)
        stream_completion(base, model, "Hello", 4)  # warm-up
        cpu = cpu_seconds(process.pid)
        if args.agent:
            result = agent_test(base, model, args.clients, args.turns, args.tokens)
        else:
            result = load_test(base, model, args.clients, args.requests, args.tokens)
        result["cpu_s"] = cpu_seconds(process.pid) - cpu
        return result
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def decode_steps(path: Path, steps: int = 24) -> None:
    """CPU ms per decode step by number of sequences and by their order in the batch (one thread)."""
    from slim.runtime import inference

    def measure(order: list[int]) -> float:
        with inference.load(path, n_ctx=512 * len(order), n_seq_max=len(order), n_threads=1) as model:
            batch = inference.Batch(model.n_batch)
            prompts = [model.tokenize(PROMPTS[s % len(PROMPTS)]) for s in order]
            batch.clear()
            for s, tokens in zip(order, prompts, strict=False):
                for i, token in enumerate(tokens):
                    batch.add(token, i, s, i == len(tokens) - 1)
            model.decode(batch)
            positions = {s: len(tokens) for s, tokens in zip(order, prompts, strict=False)}
            start = time.thread_time()
            for step in range(steps):
                batch.clear()
                for s in order:
                    batch.add(100 + step, positions[s], s, True)
                    positions[s] += 1
                model.decode(batch)
            batch.free()
            return (time.thread_time() - start) / steps * 1000

    print(f"{'sequences':<22}{'CPU ms/step':>12}{'tokens per CPU s':>18}")
    for n in (1, 2, 4, 8, 16):
        ms = measure(list(range(n)))
        print(f"{n:<22}{ms:>12.1f}{n / ms * 1000:>18.1f}")
    ms = measure([3, 0, 5, 4, 1, 2, 7, 6])
    print(f"{'8, shuffled order':<22}{ms:>12.1f}{8 / ms * 1000:>18.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF to serve [default: the SmolLM2-135M-Instruct Q4_1 asset]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--parallel", type=int, default=8, help="sequences slim (and llama-server) decode together")
    parser.add_argument("--ctx", type=int, default=None, help="context tokens per sequence [512; --agent: 3072]")
    parser.add_argument("--rounds", type=int, default=3, help="times each server is measured, taking turns")
    parser.add_argument("--skip-llama-cpp-python", action="store_true")
    parser.add_argument("--llama-server", help="path of a llama-server binary")
    parser.add_argument("--build-llama-server", action="store_true", help="build llama-server first (long)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--decode-steps", action="store_true", help="time llama_decode per step in-process instead")
    parser.add_argument("--agent", action="store_true", help="the agent-like workload (see above) instead")
    parser.add_argument("--turns", type=int, default=6, help="--agent: turns per conversation")
    parser.add_argument("--cache-ram", type=int, default=256, help="--agent: prompt cache MiB of each server")
    args = parser.parse_args()

    if args.model:
        path = Path(args.model)
    else:
        from slim.runtime.store import assets

        path = assets.fetch("smollm2-135m-instruct-q4_1.gguf")
    if args.decode_steps:
        decode_steps(path)
        return
    args.ctx = args.ctx or (3072 if args.agent else 512)
    cache = ["--cache-ram", str(args.cache_ram)] if args.agent else []
    python = sys.executable
    servers = {
        "slim serve": (
            [
                python,
                "-m",
                "slim.runtime.cli",
                "serve",
                str(path),
                "--port",
                "{port}",
                "--threads",
                str(args.threads),
                "--parallel",
                str(args.parallel),
                "--ctx",
                str(args.ctx),
                *cache,
            ],
            path.name,
        )
    }
    if not args.skip_llama_cpp_python and not args.agent:  # one request at a time: no agent workload
        servers["llama-cpp-python server"] = (
            [
                python,
                "-m",
                "llama_cpp.server",
                "--model",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--n_threads",
                str(args.threads),
                "--n_threads_batch",
                str(args.threads),
                "--n_ctx",
                str(args.ctx),
                "--interrupt_requests",
                "False",
            ],
            str(path),
        )
    llama_server = args.llama_server
    if llama_server is None and args.build_llama_server:
        from llama_cpp_source import build_tool

        llama_server = str(build_tool("llama-server"))
    if llama_server:
        servers["llama-server"] = (
            [
                llama_server,
                "-m",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "-t",
                str(args.threads),
                "-np",
                str(args.parallel),
                "-c",
                str(args.ctx * args.parallel),
                "--no-webui",
                *cache,
            ],
            path.name,
        )

    load_before = os.getloadavg()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, (command, model) in servers.items():
            rounds[name].append(run_server(name, command, model, args))
    results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}

    workload = (
        f"{args.clients} conversations x {args.turns} turns (TTFT: turns after the first), prompt cache "
        f"{args.cache_ram} MiB, {args.parallel} slots"
        if args.agent
        else f"{args.clients} streaming clients x {args.requests} request(s)"
    )
    print(
        f"\n{workload}, max_tokens {args.tokens}, "
        f"{args.threads} threads, {path.name}; median of {args.rounds} round(s); load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"{'server':<26}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'CPU s':>8}")
    for name, r in results.items():
        print(
            f"{name:<26}{r['tokens']:>8.0f}{r['wall_s']:>9.2f}{r['tokens_per_s']:>10.1f}"
            f"{r['ttft_p50_s']:>10.3f}{r['ttft_p95_s']:>10.3f}{r['cpu_s']:>8.2f}"
        )
    ours = results["slim serve"]
    for name, r in results.items():
        if name != "slim serve":
            print(
                f"slim serve / {name}: tokens/s x{ours['tokens_per_s'] / r['tokens_per_s']:.2f}, "
                f"TTFT p50 x{ours['ttft_p50_s'] / r['ttft_p50_s']:.2f} (lower is better), "
                f"CPU s per token x{(ours['cpu_s'] / ours['tokens']) / (r['cpu_s'] / r['tokens']):.2f} "
                "(lower is better)"
            )
    if args.json:
        print(json.dumps({"median": results, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
