"""slim prune SRC -o OUT --method METHOD ... [--text CALIBRATION]"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from slim.runtime.formats import mixes
from slim.runtime.cli import fail
from slim.runtime.commands.options import read_text_file
from slim.runtime.pipeline.prune import LAYER_SCORES, METHODS


@click.command(name="prune")
@click.argument("source", metavar="SRC")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="A folder for a Hugging Face checkpoint, or a file ending in .gguf.")
@click.option("-m", "--method", required=True, type=click.Choice(METHODS), help="What to remove (see above).")
@click.option("--sparsity", type=float, default=None, help="magnitude/wanda: fraction of each output row to zero, in [0, 1).")
@click.option("--pattern", default=None, metavar="N:M", help="magnitude/wanda: keep N of every M input weights (2:4, 4:8).")
@click.option("--remove", type=int, default=None, metavar="K", help="layers: how many blocks to remove.")
@click.option("--score", type=click.Choice(LAYER_SCORES), default="angular", show_default=True,
              help="layers: angular distance of a run of K blocks, or each block's influence alone.")
@click.option("--ffn", type=float, default=1.0, show_default=True, help="width: fraction of FFN neurons to keep.")
@click.option("--heads", type=float, default=1.0, show_default=True,
              help="width: fraction of attention heads to keep, in whole KV groups.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration text (UTF-8) for wanda, layers and width.")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="A saved calibration (`slim calibrate -o`) instead of --text, for wanda and width.")
@click.option("-c", "--ctx", type=click.IntRange(min=16), default=512, show_default=True,
              help="Tokens per calibration and evaluation chunk.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Calibrate on at most this many chunks.")
@click.option("-t", "--type", "qtype", default=None, metavar="TYPE",
              help=f"GGUF output type: {', '.join(mixes.type_names())}.  [default: Q4_K_M]")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="Held-out text (UTF-8): report the pruned model's perplexity on it.")
@click.option("--heal", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Heal the pruned model by self-distillation for STEPS training steps on --text, with the "
                   "unpruned model as teacher (needs torch: pip install 'slim-llm[train]').")
@click.option("--dry-run", is_flag=True, help="Print what would be removed and the expected size; write nothing.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for llama.cpp  [default: physical cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def command(source: str, output: str, method: str, sparsity: float | None, pattern: str | None, remove: int | None,
            score: str, ffn: float, heads: float, text_file: str | None, imatrix: str | None, ctx: int,
            chunks: int | None, qtype: str | None, eval_text: str | None, heal: int | None, dry_run: bool,
            threads: int | None, as_json: bool, quiet: bool) -> None:
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

    The calibration pass is the one `slim calibrate` makes: pass --imatrix FILE to reuse it.
    --heal STEPS then trains the pruned model on --text towards the unpruned model's next-token
    distribution (slim distill with the source as teacher), which wins back much of what pruning lost.

    \b
    Examples:
      slim prune ./smollm2-hf -o smol-wanda --method wanda --sparsity 0.5 --text wiki.txt
      slim prune smollm2-135m -o smol-26.gguf --method layers --remove 4 --text wiki.txt --type Q8_0
      slim prune ./smollm2-hf -o smol-w.gguf --method width --ffn 0.75 --imatrix smol.imatrix --dry-run
      slim prune smollm2-135m -o smol-26.gguf --method layers --remove 4 --text wiki.txt --heal 300
    """
    from tqdm import tqdm

    from slim.runtime.pipeline.prune import PruneError

    to_gguf = output.endswith(".gguf")
    mix = None
    text, held_out = _read(text_file), _read(eval_text)
    try:
        _check_options(method, to_gguf, qtype, text, imatrix, sparsity, pattern, remove, heal)
        if to_gguf:
            mix = mixes.mix(qtype or "Q4_K_M")
        out = Path(output)
        if not out.parent.is_dir():
            raise PruneError(f"output's parent folder {out.parent} does not exist; create it first")
        if not to_gguf and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PruneError(f"{out} already exists and is not an empty folder; choose a new output")
    except ValueError as exc:
        fail(str(exc))

    def bar(desc: str, unit: str) -> Any:
        return tqdm(desc=desc, unit=unit, disable=quiet or as_json or None, file=sys.stderr, leave=False)

    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".slim-prune-") as tmp:
            work = Path(tmp)
            report = _run(source, out, work, bar, method=method, sparsity=sparsity, pattern=pattern, remove=remove,
                          score=score, ffn=ffn, heads=heads, text=text, imatrix=imatrix, ctx=ctx, chunks=chunks,
                          mix=mix, held_out=held_out, heal=heal, dry_run=dry_run, threads=threads)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    click.echo(json.dumps(report, indent=2) if as_json else _lines(report))


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    return read_text_file(path)


def _check_options(method: str, to_gguf: bool, qtype: str | None, text: str | None, imatrix: str | None,
                   sparsity: float | None, pattern: str | None, remove: int | None, heal: int | None) -> None:
    """Refuse flags that the method would silently ignore, before any work starts."""
    from slim.runtime.pipeline.prune import UNSTRUCTURED, PruneError

    if heal is not None:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise PruneError("--heal trains the model and needs torch: pip install 'slim-llm[train]'")
        if text is None:
            raise PruneError("--heal trains on a text: give --text FILE")

    if qtype and not to_gguf:
        raise PruneError("--type applies to a GGUF output: name the output file *.gguf")
    if text is not None and imatrix:
        raise PruneError("give --text or --imatrix, not both")
    if method == "magnitude" and imatrix:
        raise PruneError("--method magnitude uses no calibration; drop --imatrix (or use --method wanda)")
    if method == "magnitude" and text is not None and heal is None:
        raise PruneError("--method magnitude uses no calibration; drop --text (or use --method wanda, or --heal)")
    if method != "magnitude" and text is None and not imatrix:
        raise PruneError(f"--method {method} needs a calibration text: --text FILE (or --imatrix FILE)")
    if method == "layers" and imatrix:
        raise PruneError("--method layers needs the hidden states of a calibration pass: give --text, not --imatrix")
    if method not in UNSTRUCTURED and (sparsity is not None or pattern):
        raise PruneError(f"--sparsity and --pattern belong to magnitude and wanda, not --method {method}")
    if method != "layers" and remove is not None:
        raise PruneError(f"--remove belongs to --method layers, not {method}")
    if method == "layers" and remove is None:
        raise PruneError("--method layers needs --remove K (how many blocks)")


def _run(source: str, out: Path, work: Path, bar: Any, *, method: str, text: str | None, imatrix: str | None,
         ctx: int, chunks: int | None, mix: mixes.Mix | None, held_out: str | None, heal: int | None, dry_run: bool,
         threads: int | None, **amounts: Any) -> dict[str, Any]:
    from slim import models
    from slim.runtime.formats.checkpoint import Checkpoint
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.pipeline.prune import (check_amounts, expected_size, parameter_count, parse_pattern, plan_layers,
                                    plan_unstructured, plan_width, prune_checkpoint)

    hf_source, source_gguf, source_bytes = _source(source, work)
    checkpoint = Checkpoint(hf_source)
    arch = models.for_hf_config(checkpoint.config)
    pattern = parse_pattern(amounts["pattern"]) if amounts["pattern"] else None
    check_amounts(arch, method, sparsity=amounts["sparsity"], pattern=pattern, remove=amounts["remove"],
                  ffn=amounts["ffn"], heads=amounts["heads"])

    calibration = None
    if imatrix:
        from slim.runtime.pipeline.calibrate import Calibration

        calibration = Calibration.load(imatrix)
    if source_gguf is None and (heal is not None or (text is not None and not imatrix and method != "magnitude")):
        source_gguf = work / "source-f16.gguf"  # llama.cpp runs the calibration and the healing teacher
        convert(hf_source, source_gguf, mixes.MIXES["F16"])
    if calibration is None and text is not None and method != "magnitude":
        from slim.runtime.pipeline.calibrate import calibrate

        with bar("calibrating", "chunk") as progress:
            calibration = calibrate(source_gguf, text, ctx=ctx, chunks=chunks, threads=threads,
                                    hidden_states=method == "layers", progress=_advance(progress))

    if method in ("magnitude", "wanda"):
        plan = plan_unstructured(arch, method, sparsity=amounts["sparsity"], pattern=pattern, calibration=calibration)
    elif method == "layers":
        plan = plan_layers(arch, calibration, amounts["remove"], amounts["score"])
    else:
        plan = plan_width(checkpoint, arch, calibration, amounts["ffn"], amounts["heads"])

    report: dict[str, Any] = {"source": source, "output": str(out), "method": method, "removed": plan.describe(arch)}
    n_after, size_after = expected_size(checkpoint, plan, mix)
    report.update(parameters_before=parameter_count(checkpoint), parameters_after=n_after, source_bytes=source_bytes)
    if dry_run:
        report["expected_bytes"] = size_after
        report["dry_run"] = True
        return report

    hf_out = work / "pruned-hf" if mix or heal else out
    with bar("pruning", "tensor") as progress:
        summary = prune_checkpoint(hf_source, hf_out, plan, progress=progress.update)
    if method in ("magnitude", "wanda"):
        report.update(zeroed=summary.zeroed, block_weights=summary.block_weights)
    if heal is not None:
        from slim.runtime.train.distill import distill

        healed = work / "healed-hf"  # its training checkpoint (healed-hf.ckpt) stays in the work folder
        with bar("teacher", "chunk") as teacher_bar, bar("healing", "step") as heal_bar:
            def advance(step: int, total: int, loss: float) -> None:
                heal_bar.total = total
                heal_bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                heal_bar.update(step - heal_bar.n)

            healing = distill(source_gguf, hf_out, text, healed, steps=heal, threads=threads, progress=advance,
                              teacher_progress=_advance(teacher_bar))
        report["healed"] = {"steps": healing.steps, "loss_first": healing.first_loss, "loss_last": healing.last_loss}
        hf_out = healed
        if not mix:
            os.replace(healed, out)
            hf_out = out
    evaluated = None
    if mix:
        with bar("converting", "B") as progress:
            convert(hf_out, out, mix, threads=threads, progress=progress.update)
        report["type"], evaluated = mix.name, out
    report["output_bytes"] = out.stat().st_size if mix else summary.size_bytes
    if held_out is not None:
        from slim.runtime.inference.evaluate import evaluate

        if evaluated is None:
            evaluated = work / "pruned-f16.gguf"
            convert(hf_out, evaluated, mixes.MIXES["F16"])
        with bar("perplexity", "chunk") as progress:
            result, _ = evaluate(evaluated, held_out, n_ctx=ctx, n_threads=threads, progress=_advance(progress))
        report["perplexity"], report["perplexity_error"] = result.perplexity, result.perplexity_error
        report["perplexity_of"] = evaluated.name if evaluated == out else "the pruned model as F16"
    return report


def _source(source: str, work: Path) -> tuple[Path, Path | None, int]:
    """(HF folder, GGUF of the same model or None, bytes of the source's weights)."""
    from slim.runtime import store
    from slim.runtime.pipeline.convert import resolve_source
    from slim.runtime.pipeline.export import export
    from slim.runtime.store.hub import is_repo_id

    path = Path(source).expanduser()
    if path.is_dir() or (not path.exists() and is_repo_id(source)):
        directory = resolve_source(source)
        return directory, None, sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    gguf_path = store.resolve(source)
    export(gguf_path, work / "source-hf", "F32")
    return work / "source-hf", gguf_path, gguf_path.stat().st_size


def _advance(bar: Any) -> Any:
    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return advance


def _lines(report: dict[str, Any]) -> str:
    before, after = report["parameters_before"], report["parameters_after"]
    lines = [report["removed"],
             f"parameters: {before / 1e6:.2f}M -> {after / 1e6:.2f}M ({after / before:.1%})"]
    if "zeroed" in report:
        lines.append(f"zero weights: {report['zeroed'] / 1e6:.2f}M ({report['zeroed'] / report['block_weights']:.1%} of "
                     f"the block matrices, {report['zeroed'] / after:.1%} of all parameters)")
    if report.get("dry_run"):
        lines.append(f"expected size: {report['expected_bytes'] / 1e6:.1f} MB of weights (source {report['source_bytes'] / 1e6:.1f} MB); "
                     "dry run, nothing written")
        return "\n".join(lines)
    if "healed" in report:
        healed = report["healed"]
        lines.append(f"healed by self-distillation: {healed['steps']} steps, loss {healed['loss_first']:.4f} -> "
                     f"{healed['loss_last']:.4f}")
    lines.append(f"wrote {report['output']}: {report['output_bytes'] / 1e6:.1f} MB (source {report['source_bytes'] / 1e6:.1f} MB)")
    if "perplexity" in report:
        lines.append(f"perplexity ({report['perplexity_of']}): {report['perplexity']:.4f} ± {report['perplexity_error']:.4f}")
    return "\n".join(lines)
