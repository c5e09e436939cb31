"""slim prune on the real model (SmolLM2-135M-Instruct): what each kind of pruning costs and pays.

    calibration: the first --cal-chunks chunks of wiki_text("train"), one pass (column statistics
                 for Wanda and width, hidden-state similarities for layers), on the F16 GGUF
    held out:    the start of wiki_text("test"), --eval-chunks chunks of --ctx tokens, perplexity as
                 llama-perplexity computes it (slim.runtime.inference.evaluate), every model as a --type GGUF

Tables: unstructured (magnitude against Wanda at 50% and 2:4); blocks removed (the chosen blocks
against as many evenly spaced ones, with GGUF size and generation speed against the dense model,
speed measured in alternating rounds so background load hits all alike); width (FFN 0.75 loaded in
transformers and llama.cpp). The machine is shared: read the ratios.

    python benchmarks/prune.py [--threads 2] [--cal-chunks 40] [--eval-chunks 20] [--type F16]
                               [--remove 2 4 6] [--speed-threads 1] [--tokens 128] [--repeat 5]
                               [--skip unstructured,layers,width] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"


def evenly_spaced(n_layer: int, count: int) -> list[int]:
    """`count` blocks spread over the depth: the middle of each of `count` equal stretches."""
    return [int((j + 0.5) * n_layer / count) for j in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--cal-chunks", type=int, default=40)
    parser.add_argument("--eval-chunks", type=int, default=20)
    parser.add_argument("--type", default="F16", help="GGUF type every model is evaluated and timed as")
    parser.add_argument("--remove", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument(
        "--speed-threads",
        type=int,
        default=1,
        help="threads for the speed runs (one thread suffers least from a busy machine)",
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per speed run")
    parser.add_argument("--repeat", type=int, default=5, help="speed rounds; the median is reported")
    parser.add_argument("--skip", default="", help="comma-separated: unstructured, layers, width")
    parser.add_argument("--work", help="folder for the intermediate models [default: a temporary one]")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import gguf

    from slim import models
    from slim.runtime import inference
    from slim.runtime.formats.checkpoint import Checkpoint
    from slim.runtime.formats.mixes import mix
    from slim.runtime.inference.evaluate import evaluate
    from slim.runtime.pipeline.calibrate import calibrate
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.pipeline.export import export
    from slim.runtime.pipeline.prune import Plan, plan_layers, plan_unstructured, plan_width, prune_checkpoint
    from slim.runtime.store import assets

    work = Path(args.work or tempfile.mkdtemp(prefix="slim-prune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"SmolLM2-135M-Instruct (from the Q4_1 asset), {args.threads} threads, --type {args.type}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    source = work / "hf"
    if not source.exists():
        export(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), source, "F32")
    checkpoint = Checkpoint(source)
    arch = models.for_hf_config(checkpoint.config)
    dense = work / f"dense-{args.type}.gguf"
    if not dense.exists():
        convert(source, dense, mix(args.type))
    f16 = work / "dense-F16.gguf"
    if not f16.exists():
        convert(source, f16, mix("F16"))

    started = time.perf_counter()
    calibration = calibrate(
        f16,
        assets.wiki_text("train").read_text(encoding="utf-8"),
        ctx=args.ctx,
        chunks=args.cal_chunks,
        threads=args.threads,
        hidden_states="layers" not in skip,
    )
    print(
        f"calibration: {calibration.chunk_count} chunks of {args.ctx} tokens in {time.perf_counter() - started:.0f} s"
    )
    held_out = assets.wiki_text("test").read_text(encoding="utf-8")[: args.eval_chunks * args.ctx * 5]

    def perplexity(path: Path) -> tuple[float, float, int]:
        report, _ = evaluate(path, held_out, n_ctx=args.ctx, n_threads=args.threads)
        return report.perplexity, report.perplexity_error, report.chunks

    def build(name: str, plan: Plan) -> tuple[Path, Path]:
        hf, gguf_path = work / name, work / f"{name}-{args.type}.gguf"
        if not gguf_path.exists():
            shutil.rmtree(hf, ignore_errors=True)
            prune_checkpoint(source, hf, plan)
            convert(hf, gguf_path, mix(args.type))
        return hf, gguf_path

    def row(label: str, path: Path) -> None:
        ppl, error, _ = perplexity(path)
        print(f"| {label} | {ppl:.2f} ± {error:.2f} |", flush=True)

    base_ppl, _, chunks = perplexity(dense)
    print(f"\nheld-out perplexity over {chunks} chunks of {args.ctx} tokens; dense model: {base_ppl:.2f}\n")

    if "unstructured" not in skip:
        print("| unstructured | perplexity |\n|---|---:|")
        for label, method, amount in (
            ("50% magnitude", "magnitude", {"sparsity": 0.5}),
            ("50% Wanda", "wanda", {"sparsity": 0.5}),
            ("2:4 magnitude", "magnitude", {"pattern": (2, 4)}),
            ("2:4 Wanda", "wanda", {"pattern": (2, 4)}),
        ):
            plan = plan_unstructured(arch, method, calibration=calibration, **amount)
            row(label, build(label.replace(" ", "-").replace("%", "").replace(":", "of"), plan)[1])
        print()

    if "layers" not in skip:
        print(
            "| blocks removed | chosen (angular) | perplexity | chosen (influence) | perplexity | evenly spaced "
            "| perplexity | GGUF MB | size / dense | tokens/s | speed / dense |"
        )
        print("|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|")
        timed = {"dense": dense}
        lines = []
        for k in args.remove:
            angular = plan_layers(arch, calibration, k, "angular")
            influence = plan_layers(arch, calibration, k, "influence")
            even = Plan("layers", removed_blocks=evenly_spaced(arch.n_layer, k))
            chosen = build(f"layers-{k}-angular", angular)[1]
            cells = [
                str(k),
                " ".join(map(str, angular.removed_blocks)),
                f"{perplexity(chosen)[0]:.2f}",
                " ".join(map(str, influence.removed_blocks)),
            ]
            cells.append(
                f"{perplexity(build(f'layers-{k}-influence', influence)[1])[0]:.2f}"
                if influence.removed_blocks != angular.removed_blocks
                else "same"
            )
            cells += [
                " ".join(map(str, even.removed_blocks)),
                f"{perplexity(build(f'layers-{k}-even', even)[1])[0]:.2f}",
            ]
            timed[f"K={k}"] = chosen
            lines.append(cells)
            print("| " + " | ".join(cells) + " |", flush=True)
        speeds = generation_speeds(inference, timed, args.speed_threads, args.tokens, args.repeat)
        print(
            f"\nwith sizes and generation speeds ({args.speed_threads} thread(s), {args.tokens} tokens, "
            f"median of {args.repeat}):"
        )
        dense_mb = dense.stat().st_size / 1e6
        print(f"| dense | {dense_mb:.1f} | 1.00 | {speeds['dense']:.1f} | 1.00 |")
        for cells, k in zip(lines, args.remove, strict=False):
            mb = timed[f"K={k}"].stat().st_size / 1e6
            print(
                "| " + " | ".join(cells) + f" | {mb:.1f} | {mb / dense_mb:.3f} | {speeds[f'K={k}']:.1f} | "
                f"{speeds[f'K={k}'] / speeds['dense']:.2f} |"
            )
        print(
            "expected size / dense for K blocks: "
            + ", ".join(f"K={k}: {1 - k * block_bytes(dense, 0) / dense.stat().st_size:.3f}" for k in args.remove)
        )
        print()

    if "width" not in skip:
        plan = plan_width(checkpoint, arch, calibration, ffn=0.75)
        hf, path = build("width-ffn-0.75", plan)
        ppl = perplexity(path)[0]
        mb = path.stat().st_size / 1e6
        agreement = transformers_agreement(hf, path, held_out[:2000])
        print("| width | FFN | parameters | GGUF MB | perplexity | loads in transformers | transformers vs llama.cpp |")
        print("|---|---:|---:|---:|---:|---|---|")
        n_params = sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
        print(
            f"| FFN 0.75 | {len(next(iter(plan.ffn_kept.values())))} | {n_params / 1e6:.1f}M | {mb:.1f} "
            f"| {ppl:.2f} | yes | {agreement} |"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; intermediate models in {work}")


def block_bytes(path: Path, block: int) -> int:
    """Bytes of one block's tensors in a GGUF."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name.startswith(f"blk.{block}."))


def generation_speeds(inference, paths: dict[str, Path], threads: int, tokens: int, repeat: int) -> dict[str, float]:
    """Median greedy generation speed (tokens/s) of each model, the models taking turns each round."""
    loaded = {label: inference.load(path, n_threads=threads, n_ctx=512) for label, path in paths.items()}
    runs: dict[str, list[float]] = {label: [] for label in paths}
    try:
        for model in loaded.values():
            model.complete(PROMPT, temperature=0, max_tokens=4)  # warm-up: page the weights in
        for _ in range(repeat):
            for label, model in loaded.items():
                model.clear_cache()
                result = model.complete(PROMPT, temperature=0, max_tokens=tokens)
                if result.completion_tokens < tokens // 2:
                    print(f"note: {label} stopped after {result.completion_tokens} tokens")
                runs[label].append(result.timings.generation_tokens_per_s)
    finally:
        for model in loaded.values():
            model.close()
    return {label: statistics.median(values) for label, values in runs.items()}


def transformers_agreement(hf: Path, path: Path, text: str) -> str:
    """transformers' next-token choices against llama.cpp's on the same tokens."""
    import numpy as np
    import torch
    import transformers

    from slim.runtime import inference

    with inference.load(path, n_ctx=512, n_threads=2) as model:
        tokens = model.tokenize(text, add_special=True, parse_special=False)[:256]
        ours = model.logits(tokens)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        logits = theirs(torch.tensor([tokens])).logits[0].numpy()
    same = float((logits.argmax(-1) == ours.argmax(-1)).mean())
    return f"same top token {same:.1%}, max |Δlogit| {np.abs(logits - ours).max():.3f}"


if __name__ == "__main__":
    main()
