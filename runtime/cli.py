"""The `slim` command. Each subcommand lives in its own module under slim.runtime.commands and is
imported only when it runs, so `slim --help` and start-up stay fast.

Exit codes: 0 success, 1 failure while working, 2 bad input or usage, 130 interrupted. Every error,
Click's usage errors included, is one line on stderr that says what to do.
"""

from __future__ import annotations

import errno
import importlib
import re
import sys
from typing import Any, NoReturn

import click

COMMANDS = {
    "run": "Generate one reply from a model, streamed to stdout.",
    "chat": "Talk with a model in the terminal (or answer lines from a pipe).",
    "serve": "Serve models through an OpenAI-compatible HTTP API, loaded on demand.",
    "pull": "Add a model to the store: from the catalog, the hub, or a local .gguf.",
    "list": "List the models in the store (alias: ls).",
    "show": "Describe a model: architecture, size, tensor types, template.",
    "rm": "Remove models from the store, and the files no other entry uses.",
    "convert": "Convert a Hugging Face model to one quantized GGUF.",
    "export": "Export a GGUF back to a Hugging Face checkpoint.",
    "eval": "Measure perplexity and divergence from a reference.",
    "calibrate": "Measure activations on a text: the importance matrix for quantization.",
    "prune": "Prune a model: zero unused weights, or remove blocks, neurons and heads.",
    "distill": "Train a student on a teacher's next-token distribution.",
    "qat": "Quantization-aware training: a GGUF whose 4-bit weights were trained.",
}
ALIASES = {"ls": "list"}
# A write that fails for want of space: the disk (or a quota, or the file-size limit) is full.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# numpy's tofile (gguf-py writes tensors with it) reports a short write as a bare OSError in its own words
_NUMPY_SHORT_WRITE = re.compile(r"^(Not enough free space to write|\d+ requested and \d+ written)")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line and exit: the CLI's only way of reporting a problem."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def plural(count: int, noun: str) -> str:
    """ "1 chunk", "2 chunks": a count with its noun."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def size_text(n_bytes: int) -> str:
    """A file size as people read it: 512 B, 6.7 kB, 98.4 MB, 1.7 GB (powers of 1000, as ls -lh --si)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def _usage_failure(exc: click.ClickException) -> NoReturn:
    """Click's usage error (a missing option, a value out of range, an unknown command) as slim's
    one line, pointing at the help of the command it concerns."""
    message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = "slim" if ctx is None or ctx.parent is None else f"slim {ctx.info_name}"
    fail(f"{message.rstrip('.')} (`{command} --help` shows the usage)", exc.exit_code)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "help":
            return help_command
        name = ALIASES.get(name, name)
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"slim.runtime.commands.{name}").command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0]
        if self.get_command(ctx, name) is None and not name.startswith("-"):
            import difflib

            known = [*COMMANDS, *ALIASES, "help"]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean `slim {close[0]}`?" if close else "`slim --help` lists the commands"
            fail(f"unknown command {name!r}; {hint}")
        return super().resolve_command(ctx, args)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            _usage_failure(exc)

    def invoke(self, ctx: click.Context) -> Any:
        """Every command, with a usage error or a full disk reported as one line: outputs are written
        to temporary files that are removed on the way out, so nothing partial is left where the
        output belongs."""
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # a subcommand's arguments (parsed as it is invoked)
            _usage_failure(exc)
        except OSError as exc:
            if exc.errno not in _NO_SPACE and not (exc.errno is None and _NUMPY_SHORT_WRITE.match(str(exc))):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            reason = exc.strerror or str(exc)
            fail(f"no space left{where} ({reason}); nothing was written: free some space and run it again", 1)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([*COMMANDS.items(), ("help", "Show the help of slim, or of one command.")])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slim-llm", prog_name="slim")
def main() -> None:
    """slim shrinks a Hugging Face language model to one quantized GGUF and runs it on a laptop.

    \b
    Start here (the 98 MB SmolLM2-135M model is fetched on first use):
      slim run smollm2-135m "Hi"          one streamed reply
      slim chat                           talk with it; /help in the chat
      slim list                           the models in the store
    \b
    Then shrink a model of your own and use it by name:
      slim convert ./SmolLM2-135M-Instruct --type Q8_0 --name smol-q8
      slim run smol-q8 "Hi"
    """


@click.command(name="help")
@click.argument("command", required=False, metavar="[COMMAND]")
@click.pass_context
def help_command(ctx: click.Context, command: str | None) -> None:
    """Show the help of slim, or of one command (`slim help run` is `slim run --help`)."""
    group = ctx.find_root()
    if command is None:
        click.echo(group.get_help())
        return
    found = main.get_command(group, command)
    if found is None or found is help_command:
        fail(f"unknown command {command!r}; `slim --help` lists the commands")
    click.echo(found.get_help(click.Context(found, info_name=command, parent=group)))


if __name__ == "__main__":
    main()
