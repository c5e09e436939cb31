"""slim serve: the OpenAI-compatible HTTP server over a pool of models loaded on demand.

    from slim.runtime import inference, serve

    model = inference.load("smollm2.gguf", n_ctx=4 * 2048, n_seq_max=4)
    app = serve.Server(model, model_names=["smollm2-135m", "smollm2.gguf"], api_key=None)
    app.serve("127.0.0.1", 8080)            # or app.start(...) for a background thread

    pool = serve.ModelPool([serve.ModelSpec(["small"], Path("small.gguf")),     # several models,
                            serve.ModelSpec(["large"], Path("large.gguf"))],    # loaded on demand
                           parallel=4, memory_budget=8 << 30, keep_alive=300)
    serve.Server(pool).serve()

Routes: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events ending in
`data: [DONE]`, or whole; response_format json_object / json_schema enforced by a grammar;
logprobs; `tools` for chat templates that render them, returning `tool_calls`, with tool_choice
"required" or a named function enforced by a grammar), POST /v1/embeddings (mean-pooled,
L2-normalised, from a second context made on first use), GET /v1/models, GET /health.
Errors use OpenAI's error shape {"error": {"message", "type", "param", "code"}}. With an API key,
every route but /health needs `Authorization: Bearer KEY`.

What lives where:

    requests.py   request bodies into typed, validated requests (CompletionRequest, ChatRequest,
                  EmbeddingRequest, with the engine's SamplingParams) and APIError; needs no model
    tools.py      the grammar that forces a tool call, and tool calls parsed out of a reply
    scheduler.py  Scheduler: per model, a thread that runs inference.Batcher over Jobs; each job's
                  events (inference's Piece, Done, Failed) go to its HTTP thread through a queue
    pool.py       ModelSpec, ModelPool (on demand, within a memory budget, keep-alive),
                  MemoryEstimate, estimate_memory, and Served (one loaded model: scheduler,
                  embedder, requests into jobs)
    routes.py     everything HTTP: Server, the handler, auth, CORS, streaming, error bodies, the
                  request log line (the only module an ASGI stack would replace)
    logs.py       the log: one line per request and every internal error's traceback, text or JSON

Models. A request's "model" picks one of the pool's models. A model is loaded by its first
request, on that request's thread (requests for it wait; the others go on), and gets its own
Scheduler and Embedder; it is unloaded `keep_alive` seconds after its last request. Each model's
memory is estimated before loading (file + KV cache + compute buffers); a load that would pass the
budget unloads idle models, least recently used first, or is refused (503 while the others are
busy, 400 if the model alone is larger than the budget). A file that fails to load is a 500 for
the requests that asked for it, and nothing else.

Sampling follows OpenAI's defaults (temperature 1, top_p 1, no top-k or min-p); temperature 0 is
greedy. presence_penalty and frequency_penalty count the generated tokens; max_tokens (or
max_completion_tokens) defaults to the rest of the sequence's context. Each of the `parallel`
KV-cache sequences keeps the tokens it holds after a request ends, so a later request with the
same prefix (the next turn of a chat) is only evaluated from where the two differ.

Imports: inference's public API, formats and store; never an underscore name of an engine object.
"""

from slim.runtime.serve.logs import LOG_FORMATS, configure_logging
from slim.runtime.serve.pool import (
    MemoryEstimate,
    ModelPool,
    ModelSpec,
    Served,
    default_memory_budget,
    estimate_memory,
    format_bytes,
    ram_bytes,
)
from slim.runtime.serve.requests import APIError
from slim.runtime.serve.routes import MAX_BODY_BYTES, Server
from slim.runtime.serve.tools import parse_tool_calls

__all__ = [
    "LOG_FORMATS",
    "MAX_BODY_BYTES",
    "APIError",
    "MemoryEstimate",
    "ModelPool",
    "ModelSpec",
    "Served",
    "Server",
    "configure_logging",
    "default_memory_budget",
    "estimate_memory",
    "format_bytes",
    "parse_tool_calls",
    "ram_bytes",
]
