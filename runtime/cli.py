"""The `slim` command. Each subcommand lives in its own module under slim.runtime.commands and is
imported only when it runs, so `slim --help` and start-up stay fast.

Exit codes: 0 success, 1 failure while working, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import click

COMMANDS = {
    "convert": "Convert a Hugging Face model to one quantized GGUF.",
    "export": "Export a GGUF back to a Hugging Face checkpoint.",
    "run": "Generate one reply from a model, streamed to stdout.",
    "chat": "Talk with a model in the terminal (or answer lines from a pipe).",
    "serve": "Serve models through an OpenAI-compatible HTTP API, loaded on demand.",
    "eval": "Measure perplexity and divergence from a reference.",
    "calibrate": "Measure activations on a text: the importance matrix for quantization.",
    "pull": "Fetch a model into the store from the catalog or the hub.",
    "list": "List the models in the store.",
    "show": "Describe a model: architecture, size, tensor types, template.",
    "rm": "Remove models from the store.",
    "prune": "Prune a model: zero unused weights, or remove blocks, neurons and heads.",
    "distill": "Train a student on a teacher's next-token distribution.",
    "qat": "Quantization-aware training: a GGUF whose 4-bit weights were trained.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"slim.runtime.commands.{name}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slim-llm", prog_name="slim")
def main() -> None:
    """slim shrinks a Hugging Face language model to one quantized GGUF and runs it on a laptop.

    \b
    Start with:
      slim convert ./SmolLM2-135M-Instruct -o smollm2.gguf --type Q4_K_M
    """


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line and exit: the CLI's only way of reporting a problem."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
