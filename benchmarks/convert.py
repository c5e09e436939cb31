"""slim convert against llama.cpp's two-step path, on the SmolLM2 HF checkpoint, in the same run.

    two-step: convert_hf_to_gguf.py SRC --outtype bf16  ->  llama-quantize Q4_K_M
    slim:     slim convert SRC --type Q4_K_M

Each side runs as its own process; wall time and peak resident memory come from the kernel's
accounting of that process (wait4). The checkpoint is the real SmolLM2-135M-Instruct, exported
by `slim export` as bf16 like the hub's original. Prints the figures, the ratios against the
targets (wall <= 0.5x the two-step path, peak memory <= 0.5x convert_hf_to_gguf.py), and whether
both outputs hold identical tensors.

    python benchmarks/convert.py [--type Q4_K_M] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_cpp_source import source_dir

from slim.runtime.formats.mixes import mix
from slim.runtime.store import assets


def measure(command: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MB) of that process.

    Its log goes to a file, not a pipe nobody reads while waiting. HF_HUB_OFFLINE keeps
    convert_hf_to_gguf.py's transformers from trying the network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"failed: {' '.join(command)}\n{log.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def checkpoint() -> Path:
    target = assets.slim_home() / "bench" / "smollm2-135m-instruct-hf-bf16"
    if not (target / "model.safetensors").exists():
        from slim.runtime.pipeline.export import export

        target.parent.mkdir(parents=True, exist_ok=True)
        export(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), target, "BF16")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the best is reported")
    args = parser.parse_args()
    src, llama_cpp = checkpoint(), source_dir()
    ftype = mix(args.type).ftype
    quantize = (
        "import sys, ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
        f"p.ftype = {ftype}; sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), "
        "sys.argv[2].encode(), ctypes.byref(p)))"
    )
    results: dict[str, list[tuple[float, float]]] = {"convert_hf_to_gguf.py": [], "llama-quantize": [], "slim": []}
    with tempfile.TemporaryDirectory() as tmp:
        bf16, theirs, ours = Path(tmp) / "bf16.gguf", Path(tmp) / "theirs.gguf", Path(tmp) / "ours.gguf"
        for _ in range(args.repeat):
            results["convert_hf_to_gguf.py"].append(
                measure(
                    [
                        sys.executable,
                        str(llama_cpp / "convert_hf_to_gguf.py"),
                        str(src),
                        "--outtype",
                        "bf16",
                        "--outfile",
                        str(bf16),
                    ]
                )
            )
            results["llama-quantize"].append(measure([sys.executable, "-c", quantize, str(bf16), str(theirs)]))
            results["slim"].append(
                measure(
                    [
                        sys.executable,
                        "-m",
                        "slim.runtime.cli",
                        "convert",
                        str(src),
                        "-o",
                        str(ours),
                        "--type",
                        args.type,
                        "--quiet",
                        "--force",  # each repeat replaces the last one's file
                    ]
                )
            )
        from slim.runtime.formats.gguf_file import open_gguf

        identical = all(
            a.name == b.name and a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data)
            for a, b in zip(open_gguf(theirs).tensors, open_gguf(ours).tensors, strict=False)
        ) and len(open_gguf(theirs).tensors) == len(open_gguf(ours).tensors)

    best = {name: (min(w for w, _ in runs), max(m for _, m in runs)) for name, runs in results.items()}
    two_step = best["convert_hf_to_gguf.py"][0] + best["llama-quantize"][0]
    print(f"SmolLM2-135M-Instruct (bf16 safetensors) -> {args.type}, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"{'step':<24}{'wall s':>10}{'peak MB':>10}")
    for name, (wall, peak) in best.items():
        print(f"{name:<24}{wall:>10.2f}{peak:>10.0f}")
    print(f"{'two-step total':<24}{two_step:>10.2f}")
    wall_ratio = best["slim"][0] / two_step
    mem_ratio = best["slim"][1] / best["convert_hf_to_gguf.py"][1]
    print(f"wall ratio slim / two-step:                 {wall_ratio:.2f}  (target <= 0.5)")
    print(f"peak memory ratio slim / convert_hf_to_gguf: {mem_ratio:.2f}  (target <= 0.5)")
    print(f"identical tensors (names, types, bytes):     {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
