"""Options shared by the commands that generate text (run, chat): sampling and model loading."""

from __future__ import annotations

from collections.abc import Callable
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
    click.option(
        "-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads  [default: physical cores]."
    ),
]


def read_text_file(path: str) -> str:
    """A UTF-8 text file given on the command line, or the CLI's one-line error."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    raise AssertionError("unreachable: fail() exits")


def generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the sampling flags plus --ctx and --threads to a click command."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


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
