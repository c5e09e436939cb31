"""slim qat SRC --type TYPE --text FILE -o OUT.gguf"""

from __future__ import annotations

from typing import Any

import click

from slim.runtime.cli import fail
from slim.runtime.commands.distill import require_torch, run_training, training_options
from slim.runtime.formats import mixes


@click.command(name="qat")
@click.argument("source", metavar="SRC")
@click.option(
    "-t",
    "--type",
    "qtype",
    default="Q4_K_M",
    show_default=True,
    metavar="TYPE",
    help=f"The quantized type or mix: {', '.join(t for t in mixes.type_names() if t not in mixes.FLOAT_MIXES)}.",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The GGUF file to write.")
@click.option(
    "--teacher", default=None, metavar="MODEL", help="The unquantized model's GGUF  [default: SRC converted to F16]."
)
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Importance matrix (slim calibrate) for the initial quantization.",
)
@training_options
def command(source: str, qtype: str, output: str, teacher: str | None, imatrix: str | None, **options: Any) -> None:
    """Quantization-aware training: 4-bit weights trained to lose less than post-training rounding.

    Every weight the --type mix quantizes is quantized once, which fixes its block scales (the
    grid). Training then runs the forward pass on the weights rounded onto that grid (a
    straight-through gradient reaches the float weights), against the top-k distribution of the
    unquantized model. The GGUF holds exactly the rounded weights of the last step: only the
    codes in the blocks changed, the scales are the post-training ones, so the file has the same
    size as `slim convert --type TYPE`.

    \b
    Examples:
      slim qat ./smollm2-hf --type Q4_K_M --text wiki.txt -o smol-qat.gguf --steps 200
      slim qat ./smollm2-hf --text wiki.txt -o smol-qat.gguf --imatrix smol.imatrix --resume
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

    def job(**kwargs: Any) -> Any:
        from slim.runtime.train.qat import qat

        return qat(source, mix, output=output, teacher=teacher, imatrix=imatrix, **kwargs)

    run_training(job, **options)
