"""slim export MODEL.gguf -o DIR"""

from __future__ import annotations

import click

from slim.runtime.cli import fail


@click.command(name="export")
@click.argument("source", metavar="MODEL")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The folder to create.")
@click.option(
    "--dtype",
    type=click.Choice(["F32", "F16", "BF16"], case_sensitive=False),
    default="F32",
    show_default=True,
    help="Precision of the written safetensors.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(source: str, output: str, dtype: str, as_json: bool) -> None:
    """Export a GGUF (a path, or a store or catalog name) to a Hugging Face checkpoint folder.

    Quantized weights are dequantized and the llama Q/K permutation is undone, so the folder loads
    in transformers and converts back with `slim convert`. Useful to evaluate, prune or fine-tune
    a model that only ships as a GGUF.

    \b
    Example:
      slim export smollm2-135m -o ./smollm2-hf
    """
    from slim.runtime import store
    from slim.runtime.pipeline.export import export

    try:
        summary = export(store.resolve(source), output, dtype)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    click.echo(summary.to_json() if as_json else summary.line())
