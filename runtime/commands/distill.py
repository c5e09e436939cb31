"""slim distill --teacher T --student S --text FILE -o OUT"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from slim.runtime.cli import fail, size_text
from slim.runtime.commands.options import (
    add_to_store,
    check_store_name,
    default_threads,
    force_option,
    name_option,
    output_folder,
    quiet_option,
    read_text_file,
    threads_option,
)
from slim.runtime.formats import mixes

TORCH_MISSING = "training needs torch, which is an optional extra: pip install 'slim-llm[train]'"


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options distill and qat share: text, steps, learning rate, loss, checkpoints, --name, --force."""
    options = [
        click.option(
            "--text", "text_file", required=True, type=click.Path(dir_okay=False), help="The training text (UTF-8)."
        ),
        click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimizer steps."),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            default=1e-4,
            show_default=True,
            help="Peak learning rate (AdamW; linear warm-up, then cosine decay to a tenth).",
        ),
        click.option(
            "--seq-len",
            type=click.IntRange(min=8),
            default=256,
            show_default=True,
            help="Tokens per training sequence.",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences per step."
        ),
        click.option(
            "--alpha",
            type=click.FloatRange(0, 1),
            default=None,
            help="Weight of the KL term; 1 - alpha weighs cross-entropy on the text  "
            "[default: 0.5 for distill; 1 for qat, whose goal is closeness to the unquantized model].",
        ),
        click.option(
            "-T",
            "--temperature",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Softmax temperature of the KL term (scaled by T^2).",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Teacher log-probabilities kept per position; the KL compares these k tokens "
            "and one tail bucket with the rest of the mass, tempered at T over those k + 1.",
        ),
        click.option(
            "--save-every",
            type=click.IntRange(min=1),
            default=50,
            show_default=True,
            help="Checkpoint the training state (OUT.ckpt) every N steps; it is deleted once the run ends.",
        ),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.ckpt, bit for bit."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order."),
        threads_option,
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Where the teacher's top-k are cached  [default: SLIM_HOME/distill-cache].",
        ),
        name_option,
        force_option,
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        quiet_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        fail(TORCH_MISSING, 1)


def run_training(
    job: Callable[..., Any],
    output: Path,
    text_file: str,
    quiet: bool,
    as_json: bool,
    name: str | None,
    threads: int | None,
    store_source: str,
    **kwargs: Any,
) -> None:
    """Read the text, run distill or qat with progress bars, report the summary or one error line;
    then delete the training checkpoint (OUT.ckpt: --resume's, useless after a finished run) and add
    the GGUF to the store under --name."""
    from tqdm import tqdm

    from slim.runtime.train.distill import checkpoint_path

    text = read_text_file(text_file)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}  # unset: the job's default
    hide = quiet or as_json or None
    teacher_bar = tqdm(desc="teacher", unit="seq", disable=hide, file=sys.stderr)
    train_bar = tqdm(desc="training", unit="step", disable=hide, file=sys.stderr)

    def teacher_progress(done: int, total: int) -> None:
        teacher_bar.total = total
        teacher_bar.update(done - teacher_bar.n)

    def progress(step: int, total: int, loss: float) -> None:
        train_bar.total = total
        train_bar.update(step - train_bar.n)
        train_bar.set_postfix(loss=f"{loss:.4f}")

    try:
        summary = job(
            text=text,
            progress=progress,
            teacher_progress=teacher_progress,
            threads=default_threads(threads),
            **kwargs,
        )
    except ValueError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted; the last checkpoint is kept (--resume continues from it)", 130)
    finally:
        teacher_bar.close()
        train_bar.close()
    checkpoint = checkpoint_path(output)
    freed = checkpoint.stat().st_size if checkpoint.is_file() else 0
    checkpoint.unlink(missing_ok=True)
    click.echo(summary.to_json() if as_json else summary.line())
    if freed and not as_json:
        click.echo(f"(deleted the training checkpoint {checkpoint}, {size_text(freed)}: the run is complete)")
    if name is not None:
        add_to_store(name, Path(summary.gguf or summary.output), store_source, say=not as_json)


@click.command(name="distill")
@click.option(
    "--teacher",
    required=True,
    metavar="MODEL",
    help="The teacher: a GGUF (store name or path), or an HF folder with --online.",
)
@click.option(
    "--student",
    required=True,
    type=click.Path(file_okay=False),
    help="The student: a Hugging Face checkpoint folder with the teacher's tokenizer.",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="The folder for the trained checkpoint.")
@click.option("--online", is_flag=True, help="Run an HF teacher in torch at each step (its full distribution).")
@click.option(
    "--type",
    "qtype",
    default=None,
    metavar="TYPE",
    help=f"Also write OUT-<type>.gguf of this type (--name adds it to the store): {', '.join(mixes.type_names())}.",
)
@training_options
def command(teacher: str, student: str, output: str, online: bool, qtype: str | None, **options: Any) -> None:
    """Train a student on a teacher's whole next-token distribution (knowledge distillation).

    loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy on the text.

    Offline (the default), llama.cpp runs the teacher GGUF over the text once and its top-k
    log-probabilities are cached, so later epochs and runs cost only the student. Healing a pruned
    model is distillation with the unpruned model as the teacher. The result is a Hugging Face
    checkpoint (and, with --type, a GGUF); training state is saved to OUT.ckpt while it runs, for
    --resume after an interruption, and deleted when the run completes.

    \b
    Examples:
      slim distill --teacher smol-f16.gguf --student ./smol-pruned -o ./smol-healed --text wiki.txt
      slim distill --teacher ./big-hf --online --student ./small-hf -o ./small-kd --text wiki.txt --steps 500
    """
    from slim.runtime import store

    require_torch()
    mix = None
    if qtype is not None:
        try:
            mix = mixes.mix(qtype)
        except ValueError as exc:
            fail(str(exc))
    if options["name"] is not None and mix is None:
        fail("--name adds a GGUF to the store: give --type too (the checkpoint folder is not a GGUF)")
    force = options.pop("force")
    check_store_name(options["name"], force)
    target = output_folder(output, force)
    if mix is not None:
        gguf = target.with_name(f"{target.name}-{mix.name.lower()}.gguf")
        if gguf.exists() and not force:
            fail(f"{gguf} already exists; add --force to replace it")
    if not online:
        try:
            teacher = str(store.resolve(teacher))
        except ValueError as exc:
            fail(str(exc))

    def job(**kwargs: Any) -> Any:
        from slim.runtime.train.distill import distill

        return distill(teacher, student, out_dir=target, online=online, mix=mix, replace=force, **kwargs)

    run_training(job, target, store_source=f"distill:{student}", **options)
