"""Measured plans against llama-quantize's mixes: size against KL divergence, on held-out text.

    slim export (real SmolLM2) -> F16 reference; slim calibrate on wiki-train -> imatrix
    llama-quantize's mixes, with and without the imatrix (slim convert --type writes the same bytes,
      tests/test_mixes.py and tests/test_convert.py hold it to that)
    slim's measured plans (pipeline/target.py: probes on wiki-train, one measurement for every size)
      at each imatrix mix's exact file size, and for --max-kld bounds
    every file evaluated against the F16 on wiki-test (articles the calibration never saw)

Prints a markdown table (size, bits/weight, KL mean and p99, the plan's predicted KL) and, with
--plot FILE.png, draws both curves (needs matplotlib, which slim does not depend on).
--cross-check runs llama-perplexity --kl-divergence on the Q4_K_M pair (builds llama.cpp's tool).

    python benchmarks/target_size.py [--eval-chunks 20] [--threads 2] [--plot benchmarks/target_size.png]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from slim.runtime.formats import mixes
from slim.runtime.formats.model_info import describe
from slim.runtime.inference.evaluate import evaluate
from slim.runtime.pipeline import target
from slim.runtime.pipeline.calibrate import calibrate
from slim.runtime.pipeline.convert import convert, planned_tensors
from slim.runtime.pipeline.export import export
from slim.runtime.store import assets

MIXES = ("Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
PLAIN_MIXES = ("Q3_K_M", "Q4_K_M", "Q5_K_M")  # without an imatrix, for the table's second curve
BOUNDS = (0.01, 0.02, 0.05)
# The embedded SmolLM2 ships as Q4_1, so its "unquantized" weights lie on Q4_1's grid (and on Q5_1's,
# which holds every Q4_1 level): those two types store them almost losslessly. The control leaves
# them out, to show what the measured plans gain on weights that are not already quantized.
CONTROL_EXCLUDED = ("Q4_1", "Q5_1")
CONTROL_MIXES = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
CONTROL_LABEL = "without Q4_1/Q5_1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-chunks", type=int, default=20, help="held-out chunks of 512 tokens")
    parser.add_argument("--calibration-chunks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--cross-check", action="store_true")
    args = parser.parse_args()

    train = assets.wiki_text("train").read_text(encoding="utf-8")
    heldout = assets.wiki_text("test").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), work / "hf", "F32")
        f16 = work / "f16.gguf"
        convert(work / "hf", f16, mixes.mix("F16"))
        imatrix = work / "wiki.imatrix.gguf"
        calibration = calibrate(f16, train, chunks=args.calibration_chunks, threads=args.threads, dataset="wiki-train")
        calibration.save(imatrix)

        reference_logits = None

        def held_out(path: Path) -> tuple[float, float]:
            nonlocal reference_logits
            report, reference_logits = evaluate(
                path, heldout, n_ctx=512, reference=reference_logits or f16, n_threads=args.threads,
                chunks=args.eval_chunks,
            )  # fmt: skip
            assert report.divergence is not None
            return report.divergence.kl_mean, report.divergence.kl_p99

        rows: list[tuple[str, int, float, float, float, float | None]] = []
        sizes = {}
        for name in MIXES + tuple(f"{m} (no imatrix)" for m in PLAIN_MIXES):
            plain = name.endswith("(no imatrix)")
            out = work / f"{name.split()[0]}{'-plain' if plain else ''}.gguf"
            summary = convert(work / "hf", out, mixes.mix(name.split()[0]), imatrix=None if plain else imatrix)
            kl, p99 = held_out(out)
            rows.append((f"llama-quantize {name}", summary.size_bytes, summary.bits_per_weight, kl, p99, None))
            if not plain:
                sizes[name] = (summary.size_bytes, out)
            print(f"  {name}: {summary.size_bytes / 1e6:.2f} MB, KL {kl:.5f}", flush=True)

        started = time.perf_counter()
        reference = work / "probe-F16.gguf"
        convert(work / "hf", reference, mixes.mix("F16"))
        _, planned = planned_tensors(work / "hf", mixes.mix("Q4_K_M"), calibration)
        convert(work / "hf", work / "Q8_0.gguf", mixes.mix("Q8_0"))
        measurement = target.measure(reference, planned, train, quantized=work / "Q8_0.gguf", threads=args.threads)
        print(
            f"  measured {len(measurement.tensors)} tensors in {time.perf_counter() - started:.0f} s; joint probes "
            f"{measurement.joint}, floor {measurement.floor:.5f}",
            flush=True,
        )
        elements = {item.gguf_name: item.n_elements for item in planned}

        def build(choice: target.Choice, label: str) -> tuple[int, float, float]:
            out = work / f"plan-{re.sub(r'[^A-Za-z0-9_.=<-]+', '-', label)}.gguf"
            plan = mixes.TypePlan(target.file_type(choice.types, elements), choice.types)
            summary = convert(work / "hf", out, plan, imatrix=imatrix)
            kl, p99 = held_out(out)
            rows.append(
                (f"slim plan at {label}", summary.size_bytes, summary.bits_per_weight, kl, p99, choice.predicted_kl)
            )
            print(
                f"  plan {label}: {summary.size_bytes / 1e6:.2f} MB, KL {kl:.5f} (predicted {choice.predicted_kl:.5f})"
            )
            return summary.size_bytes, kl, p99

        ratios: dict[str, dict[str, float]] = {"all types": {}, CONTROL_LABEL: {}}
        for name, (size, _) in sizes.items():
            theirs = next(r for r in rows if r[0] == f"llama-quantize {name}")
            _, kl, _ = build(target.solve(measurement, target.Target(size_bytes=size)), f"{name} size")
            ratios["all types"][name] = kl / theirs[3]
            if name in CONTROL_MIXES:
                allowed = [q for q in target.CANDIDATES if q not in CONTROL_EXCLUDED]
                choice = target.solve(measurement, target.Target(size_bytes=size), allowed)
                _, kl, _ = build(choice, f"{name} size, {CONTROL_LABEL}")
                ratios[CONTROL_LABEL][name] = kl / theirs[3]
        for bound in BOUNDS:
            # as slim convert --max-kld does it: planned, written, checked on the calibration text (and
            # planned again if it missed), then scored here on the held-out text
            goal = target.Target(max_kl=bound)
            written = work / f"bound-{bound:g}.gguf"
            choice, quality, attempts = target.build_plan(
                work / "hf", written, measurement, goal, target.solve(measurement, goal), train, "wiki-train",
                reference, imatrix=imatrix, threads=args.threads,
            )  # fmt: skip
            kl, p99 = held_out(written)
            size = written.stat().st_size
            label = f"KL<={bound:g} ({attempts} plan{'s' if attempts > 1 else ''}, {quality.kl_mean:.4f} on wiki-train)"
            bits = describe(written).bits_per_weight
            rows.append((f"slim plan at {label}", size, bits, kl, p99, choice.predicted_kl))
            meeting = [r for r in rows if r[0].startswith("llama-quantize") and r[3] <= bound]
            smallest = min(meeting, key=lambda r: r[1]) if meeting else None
            print(
                f"  --max-kld {bound:g}: measured {kl:.5f} ({'meets' if kl <= bound else 'MISSES'} the bound), "
                f"{size / 1e6:.2f} MB; smallest llama-quantize mix meeting it: "
                + (f"{smallest[0]} {smallest[1] / 1e6:.2f} MB" if smallest else "none")
            )

        if args.cross_check:
            plan = work / "plan-Q4_K_M-size.gguf"
            _cross_check(work, f16, heldout, sizes["Q4_K_M"][1], plan, args.threads, args.eval_chunks)

    print("\nSmolLM2-135M-Instruct, KL(F16 || file) on held-out wiki-test, "
          f"{args.eval_chunks} chunks of 512 (second halves scored):")  # fmt: skip
    print("| file | size MB | bits/weight | KL mean | KL p99 | predicted KL |")
    print("|---|---|---|---|---|---|")
    for label, size, bpw, kl, p99, predicted in sorted(rows, key=lambda r: r[1]):
        shown = f"{predicted:.5f}" if predicted is not None else "-"
        print(f"| {label} | {size / 1e6:.2f} | {bpw:.3f} | {kl:.5f} | {p99:.4f} | {shown} |")
    for label, by_mix in ratios.items():
        print(f"\nKL of slim's plan ({label}) / llama-quantize's at the same size: "
              + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in by_mix.items()))  # fmt: skip
    if args.plot:
        _plot(rows, args.plot)


def _cross_check(work: Path, f16: Path, text: str, theirs: Path, ours: Path, threads: int, chunks: int) -> None:
    """llama-perplexity --kl-divergence on the same held-out text, for the two Q4_K_M-sized files."""
    from llama_cpp_source import build_tool

    tool = str(build_tool("llama-perplexity"))
    text_file = work / "heldout.txt"
    text_file.write_text(text, encoding="utf-8")
    base = work / "f16.kld"
    common = ["-f", str(text_file), "-c", "512", "-t", str(threads), "--chunks", str(chunks)]
    subprocess.run([tool, "-m", str(f16), "--kl-divergence-base", str(base), *common], capture_output=True, check=True)
    for label, path in (("llama-quantize Q4_K_M", theirs), ("slim plan", ours)):
        run = subprocess.run(
            [tool, "-m", str(path), "--kl-divergence-base", str(base), "--kl-divergence", *common],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        found = re.search(r"Mean\s+KLD:\s+([0-9.]+)", run.stdout + run.stderr)
        print(f"  llama-perplexity --kl-divergence, {label}: mean KLD {found.group(1) if found else '?'}")


def _plot(rows: list[tuple[str, int, float, float, float, float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    curves = {
        "llama-quantize mixes, imatrix": [
            r for r in rows if r[0].startswith("llama-quantize") and "no imatrix" not in r[0]
        ],
        "llama-quantize mixes, no imatrix": [r for r in rows if "no imatrix" in r[0]],
        "slim measured plans": [r for r in rows if r[0].startswith("slim plan") and CONTROL_LABEL not in r[0]],
        f"slim measured plans, {CONTROL_LABEL}": [r for r in rows if CONTROL_LABEL in r[0]],
    }
    for label, points in curves.items():
        points = sorted(points, key=lambda r: r[1])
        axes.plot([r[1] / 1e6 for r in points], [r[3] for r in points], marker="o", label=label)
    axes.set_yscale("log")
    axes.set_xlabel("file size (MB)")
    axes.set_ylabel("KL divergence from F16, held-out text (nats/token)")
    axes.set_title("SmolLM2-135M-Instruct: size against quality")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plotted {path}")


if __name__ == "__main__":
    main()
