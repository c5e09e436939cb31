"""slim serve [MODEL]"""

from __future__ import annotations

import os

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import load_model


@click.command(name="serve")
@click.argument("model", metavar="[MODEL]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network.")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0 picks a free one).")
@click.option("--parallel", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Requests decoded together (KV-cache sequences).")
@click.option("--queue", "queue_size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a sequence; beyond that the server answers 503.")
@click.option("-c", "--ctx", type=click.IntRange(min=16), default=None,
              help="Context size in tokens per sequence  [default: the model's, at most 4096].")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for llama.cpp  [default: physical cores less one, left to the HTTP side].")
@click.option("--api-key", default=None, envvar="SLIM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health (or set SLIM_API_KEY).")
@click.option("--cors", "cors_origin", default=None, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN (e.g. http://localhost:3000) to call the server.")
@click.option("--max-body", type=click.IntRange(min=1024), default=4 * 1024 * 1024, show_default=True,
              help="Largest request body accepted, in bytes.")
def command(model: str | None, host: str, port: int, parallel: int, queue_size: int, ctx: int | None,
            threads: int | None, api_key: str | None, cors_origin: str | None, max_body: int) -> None:
    """Serve MODEL through an OpenAI-compatible API on http://HOST:PORT/v1.

    MODEL is a store name, a catalog name or a .gguf path (default smollm2-135m). Requests name it
    by its store name or its file name. Up to --parallel requests are decoded together in one batch.

    \b
    Examples:
      slim serve
      slim serve smollm2-135m --port 8000 --parallel 8 --api-key s3cret
    """
    from slim.runtime import store

    name = model or store.DEFAULT_MODEL
    try:
        path = store.resolve(name)
    except ValueError as exc:
        fail(str(exc))

    from slim.runtime import engine, server

    n_ctx_seq = ctx
    if n_ctx_seq is None:
        from slim.runtime.gguf_file import check_gguf

        try:
            metadata = check_gguf(path)
        except ValueError as exc:
            fail(str(exc))
        arch = metadata.get("general.architecture", "")
        trained = metadata.get(f"{arch}.context_length")
        n_ctx_seq = min(int(trained), engine.DEFAULT_MAX_CTX) if trained else engine.DEFAULT_MAX_CTX
    # llama.cpp's threads spin while they wait for work: leave a core to the HTTP threads and the
    # scheduler, or they starve each other (on 2 cores, 2 threads serve several times slower than 1)
    threads = threads or max(1, engine.physical_cores() - 1)
    llm = load_model(path, n_ctx=n_ctx_seq * parallel, n_threads=threads, n_seq_max=parallel)

    names = [name, path.name] if model is None or os.sep not in name else [path.name, path.stem]
    app = server.Server(llm, names, api_key=api_key, cors_origin=cors_origin, queue_size=queue_size,
                        max_body_bytes=max_body)
    try:
        bound_host, bound_port = app.bind(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    if llm.template_warning:
        click.echo(f"warning: {llm.template_warning}", err=True)
    click.echo(f"slim serve: {', '.join(app.model_names)} on http://{bound_host}:{bound_port}/v1 "
               f"({parallel} parallel, {llm.n_ctx} tokens each, {llm.n_threads} threads)"
               + ("" if api_key else "; no API key"), err=True)
    try:
        app.serve()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
        raise SystemExit(130) from None
