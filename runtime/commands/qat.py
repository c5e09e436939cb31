"""slim qat SRC --type TYPE --text FILE [-o OUT.gguf] [--name NAME]"""

from __future__ import annotations

from typing import Any

import click

from slim.runtime.cli import fail
from slim.runtime.commands.distill import require_torch, run_training, training_options
from slim.runtime.commands.options import check_store_name, gguf_output, read_text_file, source_stem
from slim.runtime.formats import mixes


@click.command(name="qat")
@click.argument("source", metavar="SRC")
@click.option(
    "--type",
    "qtype",
    default="Q4_K_M",
    show_default=True,
    metavar="TYPE",
    help=f"The quantized type or mix: {', '.join(t for t in mixes.type_names() if t not in mixes.FLOAT_MIXES)}.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="The GGUF file to write; a folder means SRC-qat-TYPE.gguf inside it  [default: SRC-qat-TYPE.gguf "
    "here, or straight into the store with --name].",
)
@click.option(
    "--teacher", default=None, metavar="MODEL", help="The unquantized model's GGUF  [default: SRC converted to F16]."
)
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Importance matrix (slim calibrate) for the initial quantization.",
)
@click.option(
    "--search",
    type=click.Choice(["thorough", "reference"]),
    default="thorough",
    show_default=True,
    help="Scale search of the starting post-training quantization (see slim convert --search).",
)
@click.option(
    "--eval-text",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Held-out text to validate on  [default: the last tenth of --text, not trained on].",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=None,
    help="Score the held-out text every N steps  [default: a tenth of --steps].",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Stop after this many held-out scores without progress.",
)
@training_options
def command(
    source: str,
    qtype: str,
    output: str | None,
    teacher: str | None,
    imatrix: str | None,
    search: str,
    eval_text: str | None,
    **options: Any,
) -> None:
    """Quantization-aware training: 4-bit weights trained to lose less than post-training rounding.

    Every weight the --type mix quantizes is quantized once, which fixes its block scales (the
    grid). Training then runs the forward pass on the weights rounded onto that grid (a
    straight-through gradient reaches the float weights), against the top-k distribution of the
    unquantized model. The GGUF holds exactly the rounded weights of the state kept: only the
    codes in the blocks changed, the scales are the post-training ones, so the file has the same
    size as `slim convert --type TYPE`.

    The state kept is the one closest to the unquantized model on held-out text (--eval-text, or
    the last tenth of --text), scored every --eval-every steps: training stops when it stops
    improving there, and a run that never beats its starting point writes the post-training
    blocks (and says so). The summary gives the held-out KL before and after.

    \b
    Examples:
      slim qat ./smollm2-hf --type Q4_K_M --text wiki.txt -o smol-qat.gguf --steps 200
      slim qat ./smollm2-hf --text wiki.txt --name smol-qat --imatrix smol.imatrix.gguf
    """
    from slim.runtime import store

    require_torch()
    try:
        mix = mixes.mix(qtype)
        if mix.name in mixes.FLOAT_MIXES:
            fail(f"{qtype} is not quantized; QAT needs a quantized --type such as Q4_K_M")
        teacher = str(store.resolve(teacher)) if teacher else None
    except ValueError as exc:
        fail(str(exc))
    force, name = options.pop("force"), options["name"]
    check_store_name(name, force)
    target = gguf_output(output, name, f"{source_stem(source)}-qat-{mix.name}.gguf", force)

    held_out = read_text_file(eval_text) if eval_text else None

    def job(**kwargs: Any) -> Any:
        from slim.runtime.train.qat import qat

        return qat(
            source, mix, output=target, teacher=teacher, imatrix=imatrix, search=search, eval_text=held_out, **kwargs
        )

    run_training(job, target, store_source=f"qat:{source}", **options)
