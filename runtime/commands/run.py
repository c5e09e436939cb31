"""slim run MODEL PROMPT"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import cache_load_options, generation_options, load_model, sampling_params


@click.command(name="run")
@click.argument("model", metavar="MODEL")
@click.argument("prompt", metavar="[PROMPT]", required=False)
@click.option("-s", "--system", default=None, help="A system message to put before PROMPT.")
@generation_options
@click.option("--raw", is_flag=True, help="Plain completion of PROMPT, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON (text, token counts, timings).")
def command(
    model: str,
    prompt: str | None,
    system: str | None,
    ctx: int | None,
    threads: int | None,
    raw: bool,
    as_json: bool,
    **sampling: Any,
) -> None:
    """Generate one reply from MODEL to PROMPT and stream it to stdout.

    MODEL is a store name, a catalog name (smollm2-135m is fetched on first use) or a .gguf path.

    PROMPT is sent as a user message through the model's chat template, or continued as plain
    text with --raw. Without PROMPT (or with "-") it is read from stdin, when stdin is a pipe or a
    file; to talk with a model at the terminal, use `slim chat`.

    \b
    Examples:
      slim run smollm2-135m "Why is the sky blue?"
      slim run smollm2-135m "Name three colours." --temperature 0 --max-tokens 40
      echo "What is 2+2?" | slim run smollm2-135m
      slim run smollm2-135m --raw --stop "." < story-start.txt
    """
    from slim.runtime import store

    if prompt is None and sys.stdin.isatty():
        fail(f'give a prompt (slim run {model} "Hi"), pipe one on stdin, or talk with `slim chat {model}`')
    try:
        path = store.resolve(model)
    except ValueError as exc:
        fail(str(exc))
    from_stdin = False
    if prompt is None or prompt == "-":
        prompt, from_stdin = sys.stdin.read(), True
    if not prompt.strip():
        fail("the prompt is empty" + (": stdin gave no text" if from_stdin else ""))
    if raw and system is not None:
        fail("--system needs the chat template; it cannot be combined with --raw")

    from slim.runtime import inference  # imports llama.cpp: only when a model is run

    try:
        params = sampling_params(sampling)
    except ValueError as exc:
        fail(str(exc))
    llm = load_model(path, n_ctx=ctx, n_threads=threads, lookup=sampling["lookup"], **cache_load_options(sampling))
    if not raw and llm.template_warning:
        click.echo(f"warning: {llm.template_warning}", err=True)

    try:
        if raw:
            stream = llm.complete(prompt, stream=True, params=params)
        else:
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages.append({"role": "user", "content": prompt})
            stream = llm.chat(messages, stream=True, params=params)
    except inference.ContextError as exc:
        fail(f"{exc} (see --ctx and --max-tokens)")
    except (inference.TemplateError, ValueError) as exc:
        fail(str(exc))

    out = sys.stdout
    last = "\n"
    try:
        if as_json:
            result = stream.collect()
            document = {"model": str(path), **result.to_dict()}
            if not raw and llm.template_warning:
                document["warning"] = llm.template_warning
            out.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
        else:
            for piece in stream:
                out.write(piece)
                out.flush()
                last = piece
            if not last.endswith("\n"):
                out.write("\n")
        out.flush()
    except KeyboardInterrupt:
        stream.close()
        if not as_json and not last.endswith("\n"):
            out.write("\n")
        fail("interrupted", 130)
    except BrokenPipeError:  # e.g. `slim run ... | head -1`: stop quietly
        stream.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        sys.exit(0)
    except inference.EngineError as exc:
        fail(str(exc), 1)
