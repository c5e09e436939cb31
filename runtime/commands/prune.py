"""slim prune SRC -o OUT --method METHOD ... [--text CALIBRATION] [--name NAME]"""

from __future__ import annotations

import json

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import (
    add_to_store,
    check_store_name,
    default_threads,
    force_option,
    name_option,
    quiet_option,
    read_text_file,
    threads_option,
)
from slim.runtime.formats import mixes
from slim.runtime.pipeline.prune import LAYER_SCORES, METHODS, PruneReport


@click.command(name="prune")
@click.argument("source", metavar="SRC")
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="A folder for a Hugging Face checkpoint, or a file ending in .gguf (not needed by --dry-run, "
    "nor with --name, which writes the GGUF into the store).",
)
@click.option("-m", "--method", required=True, type=click.Choice(METHODS), help="What to remove (see above).")
@click.option(
    "--sparsity", type=float, default=None, help="magnitude/wanda: fraction of each output row to zero, in [0, 1)."
)
@click.option(
    "--pattern", default=None, metavar="N:M", help="magnitude/wanda: keep N of every M input weights (2:4, 4:8)."
)
@click.option("--remove", type=int, default=None, metavar="K", help="layers: how many blocks to remove.")
@click.option(
    "--score",
    type=click.Choice(LAYER_SCORES),
    default="angular",
    show_default=True,
    help="layers: angular distance of a run of K blocks, or each block's influence alone.",
)
@click.option("--ffn", type=float, default=1.0, show_default=True, help="width: fraction of FFN neurons to keep.")
@click.option(
    "--heads",
    type=float,
    default=1.0,
    show_default=True,
    help="width: fraction of attention heads to keep, in whole KV groups.",
)
@click.option("--keep", type=int, default=None, metavar="N", help="experts: how many experts each block keeps.")
@click.option(
    "--keep-fraction", type=float, default=None, metavar="F", help="experts: the fraction of experts each block keeps."
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Calibration text (UTF-8) for wanda, layers, width and experts.",
)
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False),
    default=None,
    help="A saved calibration (`slim calibrate -o`) instead of --text, for wanda, width and experts.",
)
@click.option(
    "-c",
    "--ctx",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Tokens per calibration and evaluation chunk.",
)
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Calibrate on at most this many chunks.")
@click.option(
    "--type",
    "qtype",
    default=None,
    metavar="TYPE",
    help=f"GGUF output type: {', '.join(mixes.type_names())}.  [default: Q4_K_M]",
)
@click.option(
    "--eval-text",
    type=click.Path(dir_okay=False),
    default=None,
    help="Held-out text (UTF-8): report the pruned and the unpruned model's perplexity on it.",
)
@click.option(
    "--heal",
    type=click.IntRange(min=1),
    default=None,
    metavar="STEPS",
    help="Heal the pruned model by self-distillation for STEPS training steps on --text, with the "
    "unpruned model as teacher (needs torch: pip install 'slim-llm[train]').",
)
@name_option
@click.option("--dry-run", is_flag=True, help="Print what would be removed and the expected size; write nothing.")
@threads_option
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
def command(
    source: str,
    output: str | None,
    method: str,
    sparsity: float | None,
    pattern: str | None,
    remove: int | None,
    score: str,
    ffn: float,
    heads: float,
    keep: int | None,
    keep_fraction: float | None,
    text_file: str | None,
    imatrix: str | None,
    ctx: int,
    chunks: int | None,
    qtype: str | None,
    eval_text: str | None,
    heal: int | None,
    name: str | None,
    dry_run: bool,
    threads: int | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Prune a model: zero the weights it barely uses, or remove whole blocks, neurons and heads.

    SRC is a Hugging Face checkpoint folder, a hub repo id, or a GGUF (exported internally).

    \b
    Unstructured (same shapes, so a dense GGUF is NOT smaller; a quality study and a start for
    sparse formats):
      magnitude  zero the smallest |W| of each output row (--sparsity S or --pattern N:M)
      wanda      zero the smallest |W| * ||X||, X the input activations on --text; no weight update
    Structured (a smaller model of the same architecture: smaller GGUF, faster llama.cpp):
      layers     --remove K blocks. The default --score angular removes the run of K consecutive
                 blocks whose output is closest to their input (arccos of the mean cosine / pi):
                 it measures what removing them together does, where 'influence' (1 - cosine
                 across each block) judges each block alone and ignores how removals add up.
      width      keep --ffn F of the FFN neurons and --heads H of the attention heads per block,
                 ranked by activation-weighted importance (E[a^2] times the squared norm of the
                 weights they feed); heads go in whole KV groups.
      experts    a mixture of experts (Qwen3-MoE, Mixtral): keep --keep N (or --keep-fraction F)
                 experts per block, those the router gave the most weight on --text (with
                 --imatrix: chosen most often); the router forgets the others.

    The calibration pass is the one `slim calibrate` makes: pass --imatrix FILE to reuse it.
    --heal STEPS then trains the pruned model on --text towards the unpruned model's next-token
    distribution (slim distill with the source as teacher), which wins back much of what pruning lost.

    \b
    Examples:
      slim prune ./smollm2-hf -o smol-wanda --method wanda --sparsity 0.5 --text wiki.txt
      slim prune smollm2-135m --name smol-26 --method layers --remove 4 --text wiki.txt --type Q8_0
      slim prune ./smollm2-hf --method width --ffn 0.75 --imatrix smol.imatrix.gguf --dry-run
      slim prune smollm2-135m -o smol-26.gguf --method layers --remove 4 --text wiki.txt --heal 300
      slim prune ./qwen3-30b-a3b -o qwen3-a3b-96.gguf --method experts --keep 96 --text wiki.txt
    """
    from pathlib import Path

    from slim.runtime import store
    from slim.runtime.commands.progress import StageBars
    from slim.runtime.pipeline.prune import PruneOptions, prune_model

    check_store_name(name, force)
    target = Path(output).expanduser() if output else None
    if name is not None and target is not None and not target.name.endswith(".gguf"):
        fail("--name adds a GGUF to the store: name the output file *.gguf, or drop -o")
    if target is not None and target.exists() and not force and not dry_run:
        fail(f"{target} already exists; add --force to replace it")
    if target is None and name is not None and not dry_run:
        target = store.model_file(name)  # straight into the store
        target.parent.mkdir(parents=True, exist_ok=True)
    if target is None and not dry_run:
        fail("give the output: -o FOLDER for a checkpoint, -o FILE.gguf, or --name NAME for the store")
    text, held_out = _read(text_file), _read(eval_text)
    try:
        mix = mixes.mix(qtype) if qtype else None
    except ValueError as exc:
        fail(str(exc))
    options = PruneOptions(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        remove=remove,
        score=score,
        ffn=ffn,
        heads=heads,
        keep=keep,
        keep_fraction=keep_fraction,
        text=text,
        imatrix=imatrix,
        ctx=ctx,
        chunks=chunks,
        mix=mix,
        held_out=held_out,
        heal=heal,
        dry_run=dry_run,
        threads=default_threads(threads),
    )
    try:
        with StageBars(_UNITS, disable=quiet or as_json, leave=False) as bars:
            report = prune_model(source, target, options, progress=bars, replace_output=force)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else _lines(report))
    if name is not None and target is not None and not dry_run:
        add_to_store(name, target, f"prune:{source}", say=not as_json)


_UNITS = {
    "calibrating": "chunk",
    "pruning": "tensor",
    "teacher": "chunk",
    "healing": "step",
    "converting": "B",
    "perplexity": "chunk",
}


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    return read_text_file(path)


def _lines(report: PruneReport) -> str:
    before, after = report.parameters_before, report.parameters_after
    lines = [report.removed, f"parameters: {before / 1e6:.2f}M -> {after / 1e6:.2f}M ({after / before:.1%})"]
    if report.zeroed is not None and report.block_weights is not None:
        lines.append(
            f"zero weights: {report.zeroed / 1e6:.2f}M ({report.zeroed / report.block_weights:.1%} of "
            f"the block matrices, {report.zeroed / after:.1%} of all parameters)"
        )
    form = f"as {report.type}" if report.type else "as safetensors"
    if report.expected_bytes is not None:
        lines.append(
            f"weights: {report.expected_bytes / 1e6:.1f} MB {form}, "
            f"{report.expected_bytes / report.unpruned_bytes:.1%} of the unpruned model's "
            f"{report.unpruned_bytes / 1e6:.1f} MB {form} (the source's file: {report.source_bytes / 1e6:.1f} MB)"
        )
    if report.dry_run:
        lines.append("dry run, nothing written")
        return "\n".join(lines)
    if report.healed is not None:
        healed = report.healed
        lines.append(
            f"healed by self-distillation: {healed['steps']} steps, loss {healed['loss_first']:.4f} -> "
            f"{healed['loss_last']:.4f}"
        )
    if report.output_bytes is not None:
        lines.append(f"wrote {report.output}: {report.output_bytes / 1e6:.1f} MB")
    if report.perplexity is not None and report.perplexity_error is not None:
        lines.append(f"perplexity ({report.perplexity_of}): {report.perplexity:.4f} ± {report.perplexity_error:.4f}")
        if report.perplexity_before is not None:
            lines.append(f"perplexity before pruning (the same way): {report.perplexity_before:.4f}")
    return "\n".join(lines)
