"""What several commands share: the sampling and model-loading flags of run and chat, one -t/--threads
with one default, -q/--quiet and --force, and the one rule for outputs (an existing one needs --force;
a folder given for a file means the default file name inside it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from slim.runtime.cli import fail

SAMPLING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens", "stop")

_OPTIONS = [
    click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        default=None,
        help="Sampling temperature; 0 is greedy (deterministic).  [default: 0.8]",
    ),
    click.option(
        "--top-p",
        type=click.FloatRange(0, 1, min_open=True),
        default=None,
        help="Nucleus sampling: keep the likeliest tokens up to this probability mass; 1 is off.  [default: 0.95]",
    ),
    click.option(
        "--top-k",
        type=click.IntRange(min=0),
        default=None,
        help="Keep the K likeliest tokens; 0 is off.  [default: 40]",
    ),
    click.option(
        "--min-p",
        type=click.FloatRange(0, 1),
        default=None,
        help="Drop tokens less likely than this fraction of the likeliest; 0 is off.  [default: 0.05]",
    ),
    click.option(
        "--repeat-penalty",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Penalise tokens of the last 64; 1 is off.  [default: 1.0]",
    ),
    click.option("--seed", type=click.IntRange(0, 0xFFFFFFFE), default=None, help="Sampling seed  [default: random]."),
    click.option(
        "-n",
        "--max-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="Most tokens to generate per reply.  [default: 512]",
    ),
    click.option(
        "--stop", multiple=True, metavar="TEXT", help="Stop before this text (repeatable); it is not printed."
    ),
    click.option(
        "-c",
        "--ctx",
        type=click.IntRange(min=16),
        default=None,
        help="Context size in tokens  [default: the model's, at most 4096].",
    ),
]

THREADS_HELP = "CPU threads  [default: the physical cores]."

threads_option = click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help=THREADS_HELP)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
force_option = click.option("--force", is_flag=True, help="Replace the output if it exists.")
name_option = click.option(
    "--name", default=None, metavar="NAME", help="Also add the GGUF to the store under NAME (`slim list` shows it)."
)


def default_threads(threads: int | None) -> int:
    """--threads, or the one default every command uses: the physical cores this process may run on."""
    from slim.runtime.inference import physical_cores

    return threads or physical_cores()


def output_file(output: str | None, default_name: str, force: bool) -> Path:
    """The file an -o names: a folder means `default_name` inside it, no -o means `default_name` here;
    an existing file is replaced only with --force. The folder must exist."""
    path = Path(output).expanduser() if output else Path(default_name)
    if output and output.endswith(("/", os.sep)) and not path.is_dir():
        fail(f"the folder {path} does not exist; create it first")
    if path.is_dir():
        path = path / default_name
    if not path.parent.is_dir():
        fail(f"the folder {path.parent} does not exist; create it first")
    if path.exists() and not force:
        fail(f"{path} already exists; add --force to replace it")
    return path


def output_folder(output: str, force: bool) -> Path:
    """A folder an -o names, for a checkpoint: a non-empty one is replaced only with --force."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        fail(f"{path} already exists and is a file; give a folder name for the checkpoint")
    if path.is_dir() and any(path.iterdir()) and not force:
        fail(f"{path} already exists and is not empty; add --force to replace it")
    if not path.parent.is_dir():
        fail(f"the folder {path.parent} does not exist; create it first")
    return path


def gguf_output(output: str | None, name: str | None, default_name: str, force: bool) -> Path:
    """Where a command writes its GGUF: -o (see output_file); with --name and no -o, straight into the
    store; with neither, `default_name` in the current folder."""
    if output is None and name is not None:
        from slim.runtime import store

        path = store.model_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    return output_file(output, default_name, force)


def source_stem(source: str) -> str:
    """The name part of a model folder, hub repo id or file, for default output names."""
    return Path(source.rstrip("/")).name.removesuffix(".gguf") or "model"


def add_to_store(name: str, path: Path, source: str, *, say: bool = True) -> None:
    """--name: register a GGUF just written, and say so (unless the output is JSON). source: how it was
    made, "convert:SRC" (a local SRC as an absolute path)."""
    from slim.runtime import store

    kind, _, origin = source.partition(":")
    if Path(origin).expanduser().exists():
        source = f"{kind}:{Path(origin).expanduser().resolve()}"
    try:
        entry = store.import_file(name, path, source, replace=True)
    except (ValueError, OSError) as exc:
        fail(f"{path} was written but not added to the store: {exc}", 1)
    if say:
        click.echo(f"added {entry.name} to the store (`slim run {entry.name} ...`)")


def check_store_name(name: str | None, force: bool) -> None:
    """Refuse a --name before any work: one that is not valid, or one the store holds, without --force."""
    from slim.runtime import store

    if name is None:
        return
    try:
        store.check_name(name)
        taken = name in store.entries()
    except ValueError as exc:
        fail(str(exc))
    if taken and not force:
        fail(f"the store already holds {name!r}; add --force to replace it, or choose another --name")


def read_text_file(path: str) -> str:
    """A UTF-8 text file given on the command line, or the CLI's one-line error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    raise AssertionError("unreachable: fail() exits")


def kv_cache_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --cache-type-k, --cache-type-v and --flash-attn (llama-server's flags) to a click command;
    `cache_load_options` turns what they gave into inference.load's options."""
    from slim.runtime.inference.kv_cache import KV_CACHE_TYPES  # no llama.cpp import: start-up stays fast

    for option in reversed(
        [
            click.option(
                "--cache-type-k",
                type=click.Choice(list(KV_CACHE_TYPES)),
                default="f16",
                show_default=True,
                help="Type of the KV cache's keys; q8_0 holds about twice the context in the same memory.",
            ),
            click.option(
                "--cache-type-v",
                type=click.Choice(list(KV_CACHE_TYPES)),
                default="f16",
                show_default=True,
                help="Type of the KV cache's values; a quantized one needs flash attention.",
            ),
            click.option(
                "--flash-attn",
                type=click.Choice(["auto", "on", "off"]),
                default="auto",
                show_default=True,
                help="llama.cpp's flash attention: auto lets llama.cpp decide.",
            ),
        ]
    ):
        command = option(command)
    return command


lookup_option = click.option(
    "--lookup",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Prompt lookup decoding: draft up to N tokens per step from where the last tokens occurred earlier in "
    "the context, checked in the same batch (same output, faster where replies repeat their input: rewriting, "
    "extraction, code edits); 0: off.",
)


def cache_load_options(options: dict[str, Any]) -> dict[str, Any]:
    """inference.load's cache_type_k, cache_type_v and flash_attn from the flags of kv_cache_options."""
    flash = options.get("flash_attn", "auto")
    return {
        "cache_type_k": options.get("cache_type_k", "f16"),
        "cache_type_v": options.get("cache_type_v", "f16"),
        "flash_attn": None if flash == "auto" else flash == "on",
    }


def generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the sampling flags plus --ctx, --threads, --lookup and the KV cache's flags to a click command."""
    for option in reversed([*_OPTIONS, threads_option, lookup_option]):
        command = option(command)
    return kv_cache_options(command)


def sampling_params(options: dict[str, Any]) -> Any:
    """SamplingParams from the flags the user gave (None means: the engine's default)."""
    from slim.runtime.inference import SamplingParams

    chosen = {name: options.get(name) for name in SAMPLING_NAMES}
    chosen["stop"] = tuple(chosen["stop"] or ()) or None
    return SamplingParams().with_options(**chosen)


def load_model(path: Any, **options: Any) -> Any:
    """inference.load with the CLI's way of failing: one line, exit 2 for a file or option that will
    not do, 1 when llama.cpp itself refuses, 130 on Ctrl-C."""
    from slim.runtime import inference

    try:
        return inference.load(path, **options)
    except inference.EngineError as exc:
        fail(str(exc), 1)
    except ValueError as exc:  # GGUFError and bad options
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
