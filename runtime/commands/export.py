"""slim export MODEL -o DIR"""

from __future__ import annotations

import sys

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import force_option, output_folder, quiet_option


@click.command(name="export")
@click.argument("source", metavar="MODEL")
@click.option("-o", "--output", required=True, type=click.Path(), help="The folder to create.")
@click.option(
    "--dtype",
    type=click.Choice(["F32", "F16", "BF16"], case_sensitive=False),
    default="F32",
    show_default=True,
    help="Precision of the written safetensors: F32 keeps every dequantized weight exactly; "
    "BF16 and F16 take half the space.",
)
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@quiet_option
def command(source: str, output: str, dtype: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Export a GGUF (a path, or a store or catalog name) to a Hugging Face checkpoint folder.

    Quantized weights are dequantized and the llama Q/K permutation is undone, so the folder loads
    in transformers and converts back with `slim convert`. Useful to evaluate, prune or fine-tune
    a model that only ships as a GGUF. The default F32 is about 4 bytes a parameter: 538 MB for
    the 98 MB SmolLM2-135M Q4_1; --dtype BF16 halves it.

    \b
    Examples:
      slim export smollm2-135m -o ./smollm2-hf
      slim export smollm2-135m -o ./smollm2-hf-bf16 --dtype BF16
    """
    from tqdm import tqdm

    from slim.runtime import store
    from slim.runtime.pipeline.export import export

    target = output_folder(output, force)
    with tqdm(desc="exporting", unit="tensor", disable=quiet or as_json or None, file=sys.stderr) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            summary = export(store.resolve(source), target, dtype, replace=force, progress=advance)
        except (ValueError, RuntimeError) as exc:
            bar.close()
            fail(str(exc))
        except KeyboardInterrupt:
            bar.close()
            fail("interrupted; nothing was written", 130)
    click.echo(summary.to_json() if as_json else summary.line())
    if summary.dtype == "F32" and not as_json:
        click.echo("(F32 by default, so nothing is rounded again; --dtype BF16 or F16 writes half the bytes)")
