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
@click.option(
    "--target-size",
    metavar="SIZE",
    default=None,
    help="Choose each tensor's type by measurement to the least output error within SIZE: bits per "
    "weight (4.5bpw) or a file size (95MB, 1.2GB). Probes each tensor on --text; replaces --type.",
)
@click.option(
    "--max-kld",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="KL",
    help="Choose types by measurement for the smallest file whose KL divergence from the F16 on --text "
    "stays under KL (nats per token, e.g. 0.02).",
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="With --target-size/--max-kld: the text the tensors are measured on (and the importance matrix "
    "computed from, without --imatrix)  [default: slim's Wikipedia calibration text].",
)
@click.option(
    "--plan-only",
    is_flag=True,
    help="With --target-size/--max-kld: print each tensor's chosen type, the predicted size and KL, and write nothing.",
)
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
    target_size: str | None,
    max_kld: float | None,
    text_file: str | None,
    plan_only: bool,
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
      slim convert ./model -o m.gguf --target-size 4.5bpw --imatrix m.imatrix.gguf   # measured per-tensor types
      slim convert ./model -o m.gguf --max-kld 0.02 --text my-chats.txt
      slim convert ./model --target-size 95MB --plan-only --json                       # the plan, nothing written

    With --target-size or --max-kld the measured quality (KL divergence and perplexity against the
    F16, the text's name and sha256) is written into the file, where `slim show` and /v1/models read it.
    """
    from tqdm import tqdm

    from slim.runtime.pipeline.convert import convert
    from slim.runtime.store.hub import HubError, HubInputError

    measured = target_size is not None or max_kld is not None
    if not measured and (text_file or plan_only):
        fail(f"{'--text' if text_file else '--plan-only'} goes with --target-size or --max-kld")
    if measured:
        ctx = click.get_current_context()
        given = [
            flag
            for flag, value in (
                ("--type", ctx.get_parameter_source("qtype") != click.core.ParameterSource.DEFAULT),
                ("--tensor-type", bool(tensor_types)),
                ("--output-tensor-type", output_tensor_type),
                ("--token-embedding-type", token_embedding_type),
                ("--pure", pure),
                ("--leave-output-tensor", leave_output_tensor),
                ("--search thorough", search != "reference"),
            )
            if value
        ]
        if given:
            fail(f"{given[0]} does not go with --target-size/--max-kld, which choose every tensor's type themselves")
        if target_size is not None and max_kld is not None:
            fail("give --target-size or --max-kld, not both")
        _convert_to_target(
            source, output, name, target_size, max_kld, text_file, plan_only, imatrix, threads, allow_pickle, force,
            as_json, quiet,
        )  # fmt: skip
        return
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


def _convert_to_target(
    source: str,
    output: str | None,
    name: str | None,
    target_size: str | None,
    max_kld: float | None,
    text_file: str | None,
    plan_only: bool,
    imatrix: str | None,
    threads: int | None,
    allow_pickle: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """--target-size / --max-kld: measure, solve, write (slim.runtime.pipeline.target)."""
    from pathlib import Path

    from slim.runtime.commands.options import read_text_file
    from slim.runtime.commands.progress import StageBars
    from slim.runtime.pipeline.target import Target, convert_to_target, parse_size
    from slim.runtime.store import assets
    from slim.runtime.store.hub import HubError, HubInputError

    try:
        target = parse_size(target_size) if target_size is not None else Target(max_kl=max_kld)
    except ValueError as exc:
        fail(str(exc))
    if imatrix is not None and not Path(imatrix).is_file():
        fail(f"importance matrix {imatrix} does not exist; make one with `slim calibrate`")
    if text_file is None:
        text_path = assets.wiki_text("train")
        text, text_name = text_path.read_text(encoding="utf-8"), "slim wiki-train"
    else:
        text, text_name = read_text_file(text_file), Path(text_file).name
    label = target_size.replace(" ", "") if target_size else f"kl{max_kld:g}"
    destination = None
    if not plan_only:
        check_store_name(name, force)
        destination = gguf_output(output, name, f"{source_stem(source)}-{label}.gguf", force)
    units = {"probing": "tensor", "calibrating": "chunk", "quantizing": "plan"}
    try:
        with StageBars(units, disable=quiet or as_json) as bars:
            report = convert_to_target(
                source, destination, target, text, text_name, imatrix=imatrix, threads=default_threads(threads),
                allow_pickle=allow_pickle, progress=bars,
            )  # fmt: skip
    except HubInputError as exc:
        fail(str(exc))
    except HubError as exc:
        fail(str(exc), 1)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    if as_json:
        click.echo(report.to_json())
    else:
        if plan_only:
            click.echo("\n".join(report.plan_lines()))
        click.echo("\n".join(report.lines()))
    if destination is not None and name is not None:
        add_to_store(name, destination, f"convert:{source}", say=not as_json)
    if report.notes and target.max_kl is not None:
        sys.exit(1)  # the bound was not met: scripts must not take the file for one that meets it
