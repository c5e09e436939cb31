"""slim serve [MODEL]..."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from slim.runtime.cli import fail
from slim.runtime.commands.options import cache_load_options, kv_cache_options, lookup_option

if TYPE_CHECKING:
    from slim.runtime.serve import ModelSpec


def model_spec(name: str, path: Path, keep_loaded: bool = False) -> ModelSpec:
    """A serve.ModelSpec: a store name and its file name, or a path's file name and stem."""
    from slim.runtime.serve import ModelSpec

    names = [name, path.name] if os.sep not in name and not name.endswith(".gguf") else [path.name, path.stem]
    return ModelSpec(list(dict.fromkeys(names)), path, keep_loaded)


def store_specs() -> list[ModelSpec]:
    """Every model in the store whose file is there, as asked for again when a name is unknown."""
    from slim.runtime import store

    return [model_spec(name, entry.path) for name, entry in store.entries().items() if entry.path.exists()]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


class MemorySize(click.ParamType):
    """Bytes: 8G, 512MiB, 1.5GB (powers of 1024) or a share of the RAM: 60%."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1])
            except ValueError:
                share = -1.0
            if not 0 < share <= 100:
                self.fail(f"{value!r} is not a percentage of the RAM between 0 and 100", param, ctx)
            from slim.runtime.serve import ram_bytes

            return int(ram_bytes() * share / 100)
        match = _SIZE.match(text)
        if not match:
            self.fail(f"{value!r} is not a size such as 8G, 512M or 60%", param, ctx)
        number, unit = float(match.group(1)), match.group(2).lower()
        size = int(number * 1024 ** "_kmgt".index(unit or "_"))
        if size <= 0:
            self.fail(f"{value!r} leaves no memory for any model", param, ctx)
        return size


@click.command(name="serve")
@click.argument("models", metavar="[MODEL]...", nargs=-1)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 exposes the server to the network.",
)
@click.option(
    "-p",
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (0 picks a free one).",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1, max=64),
    default=4,
    show_default=True,
    help="Requests decoded together per model (KV-cache sequences).",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests per model that may wait for a sequence; beyond that the server answers 503.",
)
@click.option(
    "-c",
    "--ctx",
    type=click.IntRange(min=16),
    default=None,
    help="Context size in tokens per sequence  [default: the model's, at most 4096].",
)
@click.option(
    "-t",
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for llama.cpp  [default: physical cores less one, left to the HTTP side].",
)
@kv_cache_options
@lookup_option
@click.option(
    "--cache-ram",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    metavar="MIB",
    help="RAM per model for the prompt cache across requests: conversations' KV states kept when their slot "
    "is taken, so a next turn starts from its own on any slot (least recently used out; counted in the "
    "memory budget; 0: off).",
)
@click.option(
    "--keep-alive",
    type=click.FloatRange(min=-1),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Unload a model this long after its last request; 0 unloads at once, -1 never. "
    "The first MODEL is loaded at start and stays loaded unless another model needs its memory. "
    "An Ollama request's keep_alive overrides it for its model.",
)
@click.option(
    "--memory-budget",
    type=MemorySize(),
    default=None,
    help="Memory the loaded models may take (8G, 512M, 60%); loading past it unloads idle models, "
    "least recently used first  [default: 75% of the RAM].",
)
@click.option(
    "--api-key",
    default=None,
    envvar="SLIM_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every route but /health (or set SLIM_API_KEY).",
)
@click.option(
    "--cors",
    "cors_origin",
    default=None,
    metavar="ORIGIN",
    help="Allow browser pages from ORIGIN (e.g. http://localhost:3000) to call the server.",
)
@click.option(
    "--no-ui",
    "ui",
    flag_value=False,
    default=True,
    help="Leave out the chat page at / (GET / then answers 'slim is running', as Ollama's does).",
)
@click.option("--open", "open_page", is_flag=True, help="Open the chat page in the default browser once serving.")
@click.option(
    "--allow-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Accept requests whose Host header is NAME besides localhost, 127.0.0.1 and [::1] (repeatable; "
    "'*': any), when listening on loopback; other Host names are refused against DNS rebinding.",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1024),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Largest request body accepted, in bytes.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="The log on stderr (a line per request, every internal error's traceback): text, or one JSON object per line.",
)
def command(
    models: tuple[str, ...],
    host: str,
    port: int,
    parallel: int,
    queue_size: int,
    ctx: int | None,
    threads: int | None,
    cache_type_k: str,
    cache_type_v: str,
    flash_attn: str,
    lookup: int,
    cache_ram: int,
    keep_alive: float,
    memory_budget: int | None,
    api_key: str | None,
    cors_origin: str | None,
    ui: bool,
    open_page: bool,
    allowed_hosts: tuple[str, ...],
    max_body: int,
    log_format: str,
) -> None:
    """Serve models through OpenAI's, Anthropic's and Ollama's APIs on http://HOST:PORT.

    \b
    OpenAI     /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models,
               /v1/responses (previous_response_id: the last 256 kept in memory)
    Anthropic  /v1/messages, /v1/messages/count_tokens (x-api-key or Bearer)
    Ollama     /api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps
    The schema of every route is at /openapi.json; /metrics is in Prometheus' format.
    A chat page for people is at / (--no-ui leaves it out, --open opens it in the browser).

    Each MODEL is a store name, a catalog name or a .gguf path. Requests pick one with "model" (its
    store name or its file name); it is loaded on its first request and unloaded after --keep-alive
    seconds idle. Without MODEL, every model in the store can be asked for, and the default one
    (smollm2-135m) is loaded at start. GET /v1/models lists them, with "state": loaded or unloaded.
    Up to --parallel requests per model are decoded together in one batch.

    Sampling: what a request leaves out takes the defaults of `slim run` (temperature 0.8, top_p
    0.95, top_k 40, min_p 0.05, no penalties), not OpenAI's (temperature 1, top_p 1), on every
    API. OpenAI requests may also give top_k, min_p and repeat_penalty; Ollama's options and
    keep_alive apply per request. A field the API does not have (a misspelt "temprature") is
    refused with a 400 that names it.

    Security: a local server is reached by every web page in the browser, so by default requests
    from a page (an Origin header) are refused unless --cors allows its origin, a Host header
    that does not name loopback is refused on a loopback address (--allow-host), a body must be
    JSON (application/json, none, or curl -d's form type; text/plain and multipart are refused),
    and slow or stalled clients are cut off (10 s for headers and for each part of a body, 30 s
    for a streamed answer nobody reads). Schemas, stop strings, messages and choices are bounded.
    Without --api-key anyone on this machine may use the models; bind beyond 127.0.0.1 only with one.

    \b
    Examples:
      slim serve
      slim serve smollm2-135m --port 8000 --parallel 8 --api-key s3cret
      slim serve small.gguf large.gguf --memory-budget 6G --keep-alive 600
    """
    from slim.runtime import serve, store
    from slim.runtime.formats.gguf_file import check_gguf
    from slim.runtime.inference import check_cache_types, physical_cores

    try:
        named = list(dict.fromkeys(models or [store.DEFAULT_MODEL]))
        specs = [model_spec(name, store.resolve(name), keep_loaded=i == 0) for i, name in enumerate(named)]
        if not models:
            specs += store_specs()
        cache = cache_load_options(dict(cache_type_k=cache_type_k, cache_type_v=cache_type_v, flash_attn=flash_attn))
        check_cache_types(check_gguf(specs[0].path), **cache)
    except ValueError as exc:  # StoreError, GGUFError, a cache the model cannot have
        fail(str(exc))
    ids = [spec.id for spec in specs[: len(named)]]
    twice = sorted({name for name in ids if ids.count(name) > 1})
    if twice:
        fail(f"two models would both be called {twice[0]!r}; give them different file names")

    # llama.cpp's threads spin while they wait for work: leave a core to the HTTP threads and the
    # scheduler, or they starve each other (on 2 cores, 2 threads serve several times slower than 1)
    threads = threads or max(1, physical_cores() - 1)
    serve.configure_logging(log_format)
    pool = serve.ModelPool(
        specs,
        parallel=parallel,
        ctx=ctx,
        memory_budget=memory_budget,
        keep_alive=keep_alive,
        queue_size=queue_size,
        discover=None if models else store_specs,
        n_threads=threads,
        prompt_cache_bytes=cache_ram << 20,
        lookup=lookup,
        **cache,
    )
    try:
        with pool.use(specs[0].id) as served:  # the default model is ready before the first request
            model = served.model
    except serve.APIError as error:
        pool.close()
        fail(error.message, 2 if error.status < 500 else 1)
    except KeyboardInterrupt:
        pool.close()
        fail("interrupted", 130)

    app = serve.Server(
        pool, api_key=api_key, cors_origin=cors_origin, max_body_bytes=max_body, allowed_hosts=allowed_hosts, ui=ui
    )
    try:
        bound_host, bound_port = app.bind(host, port)
    except OSError as exc:
        pool.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    if model.template_warning:
        click.echo(f"warning: {model.template_warning}", err=True)
    more = len(pool.listing()) - 1
    click.echo(
        f"slim serve: {specs[0].id}{f' (and {more} more on demand)' if more else ''} on "
        f"http://{bound_host}:{bound_port}/v1 ({parallel} parallel, {model.n_ctx} tokens each, "
        f"{model.n_threads} threads; memory budget {serve.format_bytes(pool.memory_budget)}, keep-alive "
        f"{'never' if keep_alive < 0 else f'{keep_alive:g} s'})" + ("" if api_key else "; no API key"),
        err=True,
    )
    if ui:
        page = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '::') else bound_host}:{bound_port}/"
        click.echo(f"chat page: {page}", err=True)
        if open_page:
            import webbrowser

            if not webbrowser.open(page):  # the socket listens already: the page's requests wait
                click.echo(f"no browser to open here; open {page} in one", err=True)
    try:
        app.serve()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
        raise SystemExit(130) from None
