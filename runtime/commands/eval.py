"""slim eval MODEL... --text FILE"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from slim.runtime.cli import fail, plural
from slim.runtime.commands.options import (
    default_threads,
    force_option,
    output_file,
    quiet_option,
    read_text_file,
    threads_option,
)


@click.command(name="eval")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False), help="The text to score (UTF-8).")
@click.option(
    "-c",
    "--ctx",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Tokens per chunk; the second half of each chunk is scored.",
)
@click.option(
    "--reference",
    default=None,
    metavar="MODEL",
    help="Compare against this model (e.g. the F16): KL divergence, top-1 agreement, RMS Δp.",
)
@click.option(
    "--reference-logits",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Compare against logits saved earlier with --save-logits.",
)
@click.option(
    "--save-logits",
    type=click.Path(dir_okay=False),
    default=None,
    help="Save the reference's log-probabilities here, to reuse with --reference-logits.",
)
@click.option(
    "--write-metadata",
    is_flag=True,
    help="Record the measured quality (KL divergence, perplexity of both, the text's name and sha256) in "
    "each MODEL's GGUF metadata, where `slim show`, `slim list` and /v1/models read it. Needs a reference.",
)
@threads_option
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@quiet_option
def command(
    models: tuple[str, ...],
    text_file: str,
    ctx: int,
    reference: str | None,
    reference_logits: str | None,
    save_logits: str | None,
    write_metadata: bool,
    threads: int | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Measure what quantization lost: perplexity, and divergence from a reference.

    Perplexity is computed as llama.cpp's llama-perplexity does (chunks of --ctx tokens, the second
    half of each scored), with its error estimate. With several MODELs, one table compares them.

    \b
    Examples:
      slim eval model-q4_k_m.gguf --text wiki.txt
      slim eval q4_k_m.gguf q5_k_m.gguf q8_0.gguf --text wiki.txt --reference f16.gguf
      slim eval q4_k_m.gguf --text held-out.txt --reference f16.gguf --write-metadata
    """
    from tqdm import tqdm

    from slim.runtime import store
    from slim.runtime.formats.quality import write_quality
    from slim.runtime.inference.evaluate import EvalReport, ReferenceLogits, evaluate, measured_quality, reports_json

    if reference and reference_logits:
        fail("give --reference or --reference-logits, not both")
    if write_metadata and not (reference or reference_logits):
        fail("--write-metadata records the KL divergence from a reference: give --reference MODEL.gguf")
    logits_file = output_file(save_logits, "reference-logits.npz", force) if save_logits else None
    text = read_text_file(text_file)
    try:
        paths = [store.resolve(m) for m in models]
        ref: Path | ReferenceLogits | None = (
            Path(reference_logits) if reference_logits else (store.resolve(reference) if reference else None)
        )
    except ValueError as exc:
        fail(str(exc))
    reports: list[EvalReport] = []
    try:
        for path in paths:
            with tqdm(desc=path.name, unit="chunk", disable=quiet or as_json or None, file=sys.stderr) as bar:

                def advance(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                report, ref = evaluate(
                    path,
                    text,
                    n_ctx=ctx,
                    reference=ref,
                    n_threads=default_threads(threads),
                    progress=advance,
                    save_logits=logits_file if not reports else None,
                )
            reports.append(report)
            if write_metadata:
                assert isinstance(ref, ReferenceLogits)
                reference_name = Path(reference_logits).name if reference_logits else Path(str(reference)).name
                quality = measured_quality(report, ref, text, Path(text_file).name, reference_name)
                try:
                    write_quality(path, path, quality)
                except OSError as exc:
                    fail(f"could not rewrite {path} with its quality: {exc.strerror or exc}")
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    click.echo(reports_json(reports) if as_json else table(reports))


def table(reports: list) -> str:
    header = ["model", "size MB", "bits/w", "PPL", "±", "KL mean", "KL p99", "top-1", "RMS Δp"]
    rows = []
    for r in reports:
        d = r.divergence
        rows.append(
            [
                Path(r.model).name,
                f"{r.size_bytes / 1e6:.1f}",
                f"{r.bits_per_weight:.2f}",
                f"{r.perplexity:.4f}",
                f"{r.perplexity_error:.4f}",
                f"{d.kl_mean:.5f}" if d else "-",
                f"{d.kl_p99:.5f}" if d else "-",
                f"{100 * d.top1_agreement:.2f}%" if d else "-",
                f"{100 * d.rms_delta_p:.3f}%" if d else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header] + rows
    ]
    first = reports[0]
    lines.append(f"({plural(first.chunks, 'chunk')} of {first.n_ctx} tokens, {first.tokens_scored} tokens scored)")
    return "\n".join(lines)
