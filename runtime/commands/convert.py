"""slim convert SRC -o OUT.gguf --type TYPE"""

from __future__ import annotations

import sys

import click

from slim.runtime.cli import fail
from slim.runtime.formats import mixes


@click.command(name="convert")
@click.argument("source", metavar="SRC")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The GGUF file to write.")
@click.option(
    "-t",
    "--type",
    "qtype",
    default="Q4_K_M",
    show_default=True,
    metavar="TYPE",
    help=f"Tensor type or llama-quantize mix: {', '.join(mixes.type_names())}.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "numpy", "ggml"]),
    default="auto",
    show_default=True,
    help="Quantizer: llama.cpp's C code (ggml), slim's numpy kernels, or ggml when available.",
)
@click.option("--threads", type=click.IntRange(1), default=None, help="Tensors quantized at once [default: all cores].")
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Importance matrix from `slim calibrate` (or llama-imatrix): weights the quantization error "
    "by how strongly each input column is used, as llama-quantize --imatrix does.",
)
@click.option(
    "--search",
    type=click.Choice(["reference", "thorough"]),
    default="reference",
    show_default=True,
    help="Scale search: llama.cpp's (byte-identical to llama-quantize) or a wider one with lower "
    "error (standard blocks every llama.cpp reads; slower, numpy only).",
)
@click.option("--allow-pickle", is_flag=True, help="Read pickled *.bin weights (runs code from the file: trust it).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    source: str,
    output: str,
    qtype: str,
    backend: str,
    threads: int | None,
    imatrix: str | None,
    search: str,
    allow_pickle: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert a Hugging Face model to one quantized GGUF, in one step.

    SRC is a local model folder (config.json, *.safetensors, tokenizer files) or a hub repo id
    such as HuggingFaceTB/SmolLM2-135M-Instruct. The GGUF holds the same tensor names, types and
    bytes as llama.cpp's convert_hf_to_gguf.py followed by llama-quantize, and loads in llama.cpp,
    Ollama and LM Studio.

    \b
    Examples:
      slim convert ./Qwen2.5-0.5B-Instruct -o qwen.gguf                # Q4_K_M
      slim convert ./SmolLM2-135M-Instruct -o smol-q8.gguf --type Q8_0
      slim convert ./SmolLM2-135M-Instruct -o smol.gguf --imatrix smol.imatrix.gguf --search thorough
    """
    from tqdm import tqdm

    from slim.runtime.pipeline.convert import convert

    try:
        mix = mixes.mix(qtype)
    except ValueError as exc:
        fail(str(exc))
    bar = tqdm(unit="B", unit_scale=True, desc="converting", disable=quiet or as_json or None, file=sys.stderr)
    try:
        summary = convert(
            source,
            output,
            mix,
            backend=backend,
            threads=threads,
            allow_pickle=allow_pickle,
            imatrix=imatrix,
            search=search,
            on_plan=lambda total: setattr(bar, "total", total),
            progress=bar.update,
        )
    except (ValueError, RuntimeError) as exc:
        bar.close()
        fail(str(exc))
    except KeyboardInterrupt:
        bar.close()
        fail("interrupted; nothing was written", 130)
    bar.close()
    click.echo(summary.to_json() if as_json else summary.line())
