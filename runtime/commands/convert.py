"""slim convert SRC [-o OUT.gguf] [--type TYPE] [--name NAME]"""

from __future__ import annotations

import sys

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import (
    add_to_store,
    check_store_name,
    default_threads,
    force_option,
    gguf_output,
    name_option,
    quiet_option,
    source_stem,
    threads_option,
)
from slim.runtime.formats import mixes


@click.command(name="convert")
@click.argument("source", metavar="SRC")
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="The GGUF file to write; a folder means SRC-TYPE.gguf inside it  [default: SRC-TYPE.gguf here, "
    "or straight into the store with --name].",
)
@click.option(
    "--type",
    "qtype",
    default="Q4_K_M",
    show_default=True,
    metavar="TYPE",
    help=f"Tensor type or llama-quantize mix: {', '.join(mixes.type_names())}.",
)
@name_option
@click.option(
    "--backend",
    type=click.Choice(["auto", "numpy", "ggml"]),
    default="auto",
    show_default=True,
    help="Quantizer: llama.cpp's C code (ggml), slim's numpy kernels, or ggml when available.",
)
@threads_option
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
@click.option(
    "--tensor-type",
    "tensor_types",
    multiple=True,
    metavar="PATTERN=TYPE",
    help="Give the tensors whose name matches the regex PATTERN this type, as llama-quantize --tensor-type "
    "(repeatable; the first match wins).",
)
@click.option("--output-tensor-type", metavar="TYPE", default=None, help="The output projection's type.")
@click.option("--token-embedding-type", metavar="TYPE", default=None, help="The token embeddings' type.")
@click.option("--pure", is_flag=True, help="No per-tensor bumps: every quantized tensor gets the mix's base type.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep the output projection unquantized (F32).")
@click.option("--allow-pickle", is_flag=True, help="Read pickled *.bin weights (runs code from the file: trust it).")
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@quiet_option
def command(
    source: str,
    output: str | None,
    qtype: str,
    name: str | None,
    backend: str,
    threads: int | None,
    imatrix: str | None,
    search: str,
    tensor_types: tuple[str, ...],
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    pure: bool,
    leave_output_tensor: bool,
    allow_pickle: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert a Hugging Face model to one quantized GGUF, in one step.

    SRC is a local model folder (config.json, *.safetensors, tokenizer files) or a hub repo id
    such as HuggingFaceTB/SmolLM2-135M-Instruct. The GGUF holds the same tensor names, types and
    bytes as llama.cpp's convert_hf_to_gguf.py followed by llama-quantize, and loads in llama.cpp,
    Ollama and LM Studio. --name adds it to the store, so `slim run NAME` and `slim serve` find it.

    \b
    Examples:
      slim convert ./Qwen2.5-0.5B-Instruct                              # Qwen2.5-0.5B-Instruct-Q4_K_M.gguf
      slim convert ./SmolLM2-135M-Instruct --type Q8_0 --name smol-q8   # into the store
      slim convert ./SmolLM2-135M-Instruct -o smol.gguf --imatrix smol.imatrix.gguf --search thorough
      slim convert ./model -o m.gguf --type Q3_K_M --tensor-type 'attn_v=Q8_0' --output-tensor-type Q8_0
    """
    from tqdm import tqdm

    from slim.runtime.pipeline.convert import convert
    from slim.runtime.store.hub import HubError, HubInputError

    try:
        mix = mixes.mix(qtype)
        tensor_overrides = mixes.overrides(
            tensor_types, output_tensor_type, token_embedding_type, pure=pure, leave_output_tensor=leave_output_tensor
        )
    except ValueError as exc:
        fail(str(exc))
    check_store_name(name, force)
    target = gguf_output(output, name, f"{source_stem(source)}-{mix.name}.gguf", force)
    bar = tqdm(unit="B", unit_scale=True, desc="converting", disable=quiet or as_json or None, file=sys.stderr)
    try:
        summary = convert(
            source,
            target,
            mix,
            backend=backend,
            threads=default_threads(threads),
            allow_pickle=allow_pickle,
            imatrix=imatrix,
            search=search,
            tensor_overrides=tensor_overrides,
            on_plan=lambda total: setattr(bar, "total", total),
            progress=bar.update,
        )
    except HubInputError as exc:
        bar.close()
        fail(str(exc))
    except HubError as exc:  # the network or the hub: the same exit code as slim pull's
        bar.close()
        fail(str(exc), 1)
    except (ValueError, RuntimeError) as exc:
        bar.close()
        fail(str(exc))
    except KeyboardInterrupt:
        bar.close()
        fail("interrupted; nothing was written", 130)
    bar.close()
    click.echo(summary.to_json() if as_json else summary.line())
    if name is not None:
        add_to_store(name, target, f"convert:{source}", say=not as_json)
