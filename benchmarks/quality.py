"""What calibration buys: Q4_K_M with and without the importance matrix and the thorough search.

    slim export (real SmolLM2) -> F16 reference
    slim calibrate F16 on wiki train text   (timed against llama-imatrix on the same chunks)
    slim convert Q4_K_M: plain, --imatrix, --search thorough, both   (convert time each)
    slim eval each against the F16 on held-out wiki text: size, bits/weight, perplexity, KL, top-1

The calibration text (wiki-train) and the evaluation text (wiki-test) are different articles.

    python benchmarks/quality.py [--chunks 40] [--eval-chars 200000] [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from llama_cpp_source import build_tool

from slim.runtime.formats.mixes import mix
from slim.runtime.inference.evaluate import evaluate
from slim.runtime.pipeline.calibrate import Calibration, calibrate
from slim.runtime.pipeline.convert import convert
from slim.runtime.pipeline.export import export
from slim.runtime.store import assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--chunks", type=int, default=40, help="calibration chunks of 512 tokens")
    parser.add_argument("--eval-chars", type=int, default=200_000, help="held-out characters to evaluate on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-llama-imatrix", action="store_true")
    args = parser.parse_args()

    train = assets.wiki_text("train")
    heldout = assets.wiki_text("test").read_text(encoding="utf-8")[: args.eval_chars]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), work / "hf", "F32")
        f16 = work / "f16.gguf"
        convert(work / "hf", f16, mix("F16"))

        start = time.perf_counter()
        cal = calibrate(
            f16,
            train.read_text(encoding="utf-8"),
            ctx=512,
            chunks=args.chunks,
            threads=args.threads,
            dataset=train.name,
        )
        slim_seconds = time.perf_counter() - start
        imatrix = work / "smollm2.imatrix.gguf"
        cal.save(imatrix)
        print(f"slim calibrate: {cal.chunk_count} chunks x 512 tokens in {slim_seconds:.1f} s")
        if not args.skip_llama_imatrix:
            theirs = work / "theirs.imatrix.gguf"
            start = time.perf_counter()
            subprocess.run(
                [
                    str(build_tool("llama-imatrix")),
                    "-m",
                    str(f16),
                    "-f",
                    str(train),
                    "-o",
                    str(theirs),
                    "-c",
                    "512",
                    "-b",
                    "512",
                    "--chunks",
                    str(args.chunks),
                    "-t",
                    str(args.threads),
                    "--no-ppl",
                ],
                capture_output=True,
                check=True,
            )
            their_seconds = time.perf_counter() - start
            worst = max(
                float(abs(cal.sums[n] - s).max() / max(abs(s).max(), 1e-30))
                for n, s in Calibration.load(theirs).sums.items()
            )
            print(
                f"llama-imatrix:  {their_seconds:.1f} s  (slim/llama = {slim_seconds / their_seconds:.2f}x); "
                f"largest relative difference {worst:.2e}"
            )

        variants = [
            ("reference", None, "reference"),
            ("imatrix", imatrix, "reference"),
            ("thorough", None, "thorough"),
            ("imatrix + thorough", imatrix, "thorough"),
        ]
        rows = []
        reference_logits = None
        for label, matrix, search in variants:
            out = work / f"{label.replace(' + ', '-')}.gguf"
            summary = convert(work / "hf", out, mix(args.type), imatrix=matrix, search=search)
            report, ref = evaluate(out, heldout, n_ctx=512, reference=reference_logits or f16, n_threads=args.threads)
            reference_logits = reference_logits or ref
            rows.append((label, summary, report))
            print(f"  {label}: done ({summary.seconds:.1f} s to convert)", flush=True)

    print(f"\n{args.type} on SmolLM2-135M-Instruct, held-out wiki text ({args.eval_chars} chars), against F16:")
    print("| variant | convert s | size MB | bits/weight | perplexity | KL mean | KL p99 | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, summary, report in rows:
        d = report.divergence
        print(
            f"| {label} | {summary.seconds:.1f} | {summary.size_bytes / 1e6:.2f} | {summary.bits_per_weight:.3f} | "
            f"{report.perplexity:.4f} ± {report.perplexity_error:.4f} | {d.kl_mean:.5f} | {d.kl_p99:.4f} | "
            f"{d.top1_agreement:.4f} |"
        )


if __name__ == "__main__":
    main()
