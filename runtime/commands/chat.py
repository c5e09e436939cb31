"""slim chat [MODEL]"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import cache_load_options, generation_options, load_model, sampling_params
from slim.runtime.files import atomic_open

HELP = """\
/reset          forget the conversation (the system message stays)
/system TEXT    set the system message
/think on|off   let a thinking model think before it answers, or not (shown dimmed)
/save FILE      save the conversation as JSON
/load FILE      load a conversation saved with /save
/help           this list
/bye            leave (Ctrl-D too); Ctrl-C stops a reply and keeps the session"""


@click.command(name="chat")
@click.argument("model", required=False)
@click.option("-s", "--system", default=None, help="The system message.")
@click.option(
    "--on-overflow",
    type=click.Choice(["drop-oldest", "stop"]),
    default="drop-oldest",
    show_default=True,
    help="When the conversation outgrows the context: drop the oldest turns (and say so), or stop with an error.",
)
@click.option(
    "--web",
    is_flag=True,
    help="Chat in the browser instead: serve MODEL with its chat page on http://127.0.0.1:8080/ and open it "
    "(slim serve --open, with serve's defaults; the sampling settings are the page's).",
)
@generation_options
@click.pass_context
def command(
    click_context: click.Context,
    model: str | None,
    system: str | None,
    on_overflow: str,
    web: bool,
    ctx: int | None,
    threads: int | None,
    **sampling: Any,
) -> None:
    """Talk with a model, with streaming replies and memory of the conversation.

    MODEL is a store name, a catalog name or a .gguf path [default: smollm2-135m, fetched on
    first use]. Each turn evaluates only the tokens it adds; the earlier ones stay in llama.cpp's
    KV cache. Read from a pipe, slim chat answers each input line in turn, so scripts can use it.
    """
    from slim.runtime import store

    if web:
        from slim.runtime.commands import serve

        if system is not None:
            fail("with --web, the system message is set in the page's Settings; leave out --system")
        shared = {name: value for name, value in sampling.items() if name in {p.name for p in serve.command.params}}
        click_context.invoke(
            serve.command, models=(model,) if model else (), ctx=ctx, threads=threads, open_page=True, **shared
        )
        return
    try:
        path = store.resolve(model)
        params = sampling_params(sampling)
    except ValueError as exc:
        fail(str(exc))
    llm = load_model(path, n_ctx=ctx, n_threads=threads, lookup=sampling["lookup"], **cache_load_options(sampling))
    interactive = sys.stdin.isatty()
    if llm.template_warning:
        click.echo(f"warning: {llm.template_warning}", err=True)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        click.echo(f"slim chat: {path.name}, {llm.n_ctx}-token context. /help for commands, Ctrl-D or /bye to leave.")
    Chat(llm, system, on_overflow, params, interactive).loop()


# The docstring is dedented before the command list joins it, so that click rewraps its paragraph
# as one and prints the list (after \b, unwrapped) with one indent.
command.help = (
    inspect.cleandoc(command.help or "")
    + "\n\n\b\nIn the chat:\n"
    + "\n".join(f"  {line}" for line in HELP.splitlines())
)


class Chat:
    def __init__(self, llm: Any, system: str | None, policy: str, params: Any, interactive: bool) -> None:
        self.llm, self.policy, self.params, self.interactive = llm, policy, params, interactive
        self.session = llm.session(system, context_policy=policy, params=params)

    def loop(self) -> None:
        while True:
            try:
                line = input(">>> " if self.interactive else "")
            except EOFError:
                if self.interactive:
                    click.echo()
                return
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /bye leaves)")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.reply(line)

    def reply(self, text: str) -> None:
        from slim.runtime.inference import ContextError, EngineError

        stream = shown = None
        try:
            stream = self.session.send(text, stream=True)
            shown = _Shown(self.session.opens_thinking if self.session.thinks else None, sys.stdout.isatty())
            for piece in stream:
                shown.write(piece)
            shown.end()
        except ContextError as exc:
            self.say(f"{exc}; /reset to start over, or restart with a larger --ctx")
        except KeyboardInterrupt:
            if shown is not None:
                shown.stop()
            sys.stdout.write(" [stopped]\n")
        except EngineError as exc:
            self.say(str(exc))
        finally:
            if stream is not None:
                stream.close()
        sys.stdout.flush()
        result = self.session.last_result
        if result is not None and result.dropped_messages:
            self.say(f"dropped the {result.dropped_messages} oldest messages to fit the {self.llm.n_ctx}-token context")

    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name == "/help":
            click.echo(HELP)
        elif name == "/reset":
            system, thinking = self.system, self.session.thinking
            self.session = self.llm.session(system, context_policy=self.policy, params=self.params)
            self.session.thinking = thinking
            self.say("conversation cleared")
        elif name == "/system":
            if not argument:
                self.say(
                    f"system message: {self.system!r}" if self.system else "no system message; /system TEXT sets one"
                )
            else:
                self.set_messages([{"role": "system", "content": argument}] + self.turns)
                self.say("system message set")
        elif name == "/save" and argument:
            self.save(Path(argument).expanduser())
        elif name == "/load" and argument:
            self.load(Path(argument).expanduser())
        elif name == "/think":
            self.think(argument)
        elif name in ("/save", "/load"):
            self.say(f"{name} needs a file name: {name} FILE")
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def think(self, argument: str) -> None:
        session = self.session
        if not session.thinks:
            self.say("this model's chat template has no thinking to switch")
        elif argument in ("on", "off"):
            session.thinking = argument == "on"
            self.say(f"thinking {argument}")
        else:
            state = {None: "the template's default", True: "on", False: "off"}[session.thinking]
            self.say(f"thinking: {state}; /think on or /think off switches it")

    @property
    def system(self) -> str | None:
        messages = self.session.messages
        return messages[0]["content"] if messages and messages[0]["role"] == "system" else None

    @property
    def turns(self) -> list[dict[str, str]]:
        return [m for m in self.session.messages if m["role"] != "system"]

    def set_messages(self, messages: list[dict[str, str]]) -> None:
        self.session.messages[:] = messages

    def save(self, path: Path) -> None:
        document = {"model": str(self.llm.path), "messages": self.session.messages}
        try:
            with atomic_open(path, "w", encoding="utf-8") as file:
                file.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
        except OSError as exc:
            self.say(f"could not save to {path}: {exc.strerror}")
            return
        self.say(f"saved {len(self.session.messages)} messages to {path}")

    def load(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            messages = document["messages"]
            if not all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise ValueError
        except OSError as exc:
            self.say(f"could not read {path}: {exc.strerror}")
            return
        except (ValueError, KeyError, TypeError):
            self.say(f"{path} is not a conversation saved by /save")
            return
        self.set_messages([{"role": m["role"], "content": m["content"]} for m in messages])
        self.say(f"loaded {len(messages)} messages from {path}")

    def say(self, message: str) -> None:
        """A note from slim itself, not the model: on stderr, so piped replies stay clean."""
        click.echo(f"({message})", err=True)


class _Shown:
    """A reply written as it streams: a thinking model's thought dimmed on a terminal (left out
    when the output is piped, so that scripts read the answer only), then the answer."""

    DIM, NORMAL = "\x1b[2m", "\x1b[22m"

    def __init__(self, inside: bool | None, terminal: bool) -> None:
        from slim.runtime.inference import ThinkingSplitter

        self.splitter = None if inside is None else ThinkingSplitter(inside)
        self.terminal = terminal
        self.thought = False  # a thought is being shown

    def write(self, piece: str) -> None:
        parts = [(False, piece)] if self.splitter is None else self.splitter.feed(piece)
        self._show(parts)

    def end(self) -> None:
        if self.splitter is not None:
            self._show(self.splitter.flush())
        self._close_thought()
        sys.stdout.write("\n")
        sys.stdout.flush()

    def stop(self) -> None:
        """Cut short: the terminal's text back to normal."""
        if self.thought:
            sys.stdout.write(self.NORMAL)
            self.thought = False

    def _show(self, parts: list[tuple[bool, str]]) -> None:
        for thought, text in parts:
            if thought and not self.terminal:
                continue
            if thought and not self.thought:
                sys.stdout.write(self.DIM)
                self.thought = True
            elif not thought:
                self._close_thought()
            sys.stdout.write(text)
        sys.stdout.flush()

    def _close_thought(self) -> None:
        if self.thought:
            sys.stdout.write(self.NORMAL + "\n\n")
            self.thought = False
