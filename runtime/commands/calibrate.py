"""slim calibrate MODEL --text FILE [-o IMATRIX.gguf]"""

from __future__ import annotations

import json
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
    source_stem,
    threads_option,
)


@click.command(name="calibrate")
@click.argument("model", metavar="MODEL")
@click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Calibration text (UTF-8): a few hundred KB of the kind of text the model will see.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="The importance matrix to write (llama.cpp's imatrix GGUF); a folder means the default name "
    "inside it  [default: MODEL.imatrix.gguf here].",
)
@click.option(
    "-c",
    "--ctx",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Tokens per chunk, as llama-imatrix -c.",
)
@click.option(
    "--chunks",
    type=click.IntRange(min=1),
    default=None,
    help="Use at most this many chunks  [default: all of the text].",
)
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
@threads_option
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
@quiet_option
def command(
    model: str,
    text_file: str,
    output: str | None,
    ctx: int,
    chunks: int | None,
    process_output: bool,
    threads: int | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Measure a model's activations on a text: the importance matrix for quantization and pruning.

    For every matmul weight the sum of squared inputs per column is collected while llama.cpp
    runs MODEL over the text, and written in llama-imatrix's format. `slim convert --imatrix`
    (and llama-quantize --imatrix) then spend precision where the activations are large, and
    `slim prune --method wanda` scores weights with it. Calibrate the F16 or Q8_0 of the model.

    \b
    Without -o the file is named after MODEL (llama-imatrix writes imatrix.gguf; one name per
    model keeps two calibrations apart).

    \b
    Examples:
      slim calibrate smollm2-f16.gguf --text wiki.txt          # writes smollm2-f16.imatrix.gguf
      slim convert ./SmolLM2-135M-Instruct -o smol.gguf --type Q4_K_M --imatrix smollm2-f16.imatrix.gguf
    """
    from tqdm import tqdm

    from slim.runtime import store
    from slim.runtime.inference import EngineError
    from slim.runtime.pipeline.calibrate import CalibrationError, calibrate

    target = output_file(output, f"{source_stem(model)}.imatrix.gguf", force)
    text = read_text_file(text_file)
    try:
        path = store.resolve(model)
    except ValueError as exc:
        fail(str(exc))
    with tqdm(desc="calibrating", unit="chunk", disable=quiet or as_json or None, file=sys.stderr) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = calibrate(
                path,
                text,
                ctx=ctx,
                chunks=chunks,
                threads=default_threads(threads),
                include_output=process_output,
                dataset=Path(text_file).name,
                progress=advance,
            )
        except (CalibrationError, EngineError, ValueError) as exc:
            bar.close()
            fail(str(exc), 1 if isinstance(exc, EngineError) else 2)
        except KeyboardInterrupt:
            bar.close()
            fail("interrupted; nothing was written", 130)
    try:
        result.save(target)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror}", 1)
    tokens = max(result.counts.values())
    weights = len(result.sums) + len(result.expert_sums)
    routing = result.routing()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "output": str(target),
                    "weights": weights,
                    "chunks": result.chunk_count,
                    "chunk_size": result.chunk_size,
                    "tokens": tokens,
                    "routing": {str(layer): shares.round(4).tolist() for layer, shares in routing.items()},
                }
            )
        )
    else:
        click.echo(
            f"wrote {target}: {weights} weights, {plural(result.chunk_count, 'chunk')} of "
            f"{result.chunk_size} tokens ({tokens} tokens)"
            + (f"; how often each expert was chosen: slim show {target}" if routing else "")
        )
