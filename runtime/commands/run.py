"""slim run MODEL PROMPT"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import generation_options, load_model, sampling_params


@click.command(name="run")
@click.argument("model", metavar="MODEL")
@click.argument("prompt", metavar="PROMPT")
@click.option("-s", "--system", default=None, help="A system message to put before PROMPT.")
@generation_options
@click.option("--raw", is_flag=True, help="Plain completion of PROMPT, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON (text, token counts, timings).")
def command(
    model: str,
    prompt: str,
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
    text with --raw. PROMPT "-" reads it from stdin.

    \b
    Examples:
      slim run smollm2-135m "Why is the sky blue?"
      slim run smollm2-135m "Name three colours." --temperature 0 --max-tokens 40
      echo "Once upon a time" | slim run smollm2-135m - --raw --stop "."
    """
    from slim.runtime import store

    try:
        path = store.resolve(model)
    except ValueError as exc:
        fail(str(exc))
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        fail("the prompt is empty")
    if raw and system is not None:
        fail("--system needs the chat template; it cannot be combined with --raw")

    from slim.runtime import inference  # imports llama.cpp: only when a model is run

    try:
        params = sampling_params(sampling)
    except ValueError as exc:
        fail(str(exc))
    llm = load_model(path, n_ctx=ctx, n_threads=threads)
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
