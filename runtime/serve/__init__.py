"""slim serve: the HTTP server (OpenAI's, Anthropic's and Ollama's APIs) over a pool of models
loaded on demand.

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
"required" or a named function enforced by a grammar; n choices, up to 8, each its own
generation), POST /v1/embeddings (mean-pooled,
L2-normalised, from a second context made on first use), GET /v1/models, GET /health, GET /metrics
(Prometheus' text format), and the OpenAPI schema at GET /openapi.json. Errors use OpenAI's error
shape {"error": {"message", "type", "param", "code"}}, bad fields named in "param". With an API
key, every route but /health needs `Authorization: Bearer KEY` (or `x-api-key: KEY`, as
Anthropic's clients send it). Against web pages and slow clients (routes.py says how): a foreign
Host on a loopback address, an Origin that is not allowed, and bodies that are not JSON are
refused; headers, bodies and unread answers have timeouts; JSON schemas become bounded grammars
(grammars.py); the messages' own text never becomes control tokens (inference's chat_tokens).

OpenAI's Responses API: POST /v1/responses (text or items in: messages, function calls and their
outputs; function tools; text.format; streamed as its events), chained by previous_response_id
through the last 256 stored responses (in memory), GET and DELETE /v1/responses/{id}.

Anthropic's Messages API: POST /v1/messages (system, multi-turn, stop_sequences, tools as
tool_use and tool_result blocks, output_config.format, streamed as its events) and POST
/v1/messages/count_tokens, with errors in its shape {"type": "error", "error": {"type", "message"}}.

Ollama's API: POST /api/chat and /api/generate (NDJSON streams by default), POST /api/embed and
/api/embeddings, GET /api/tags, POST /api/show, GET /api/ps, GET /api/version, GET / ("slim is
running", to all but browsers); `options` map onto the sampling parameters, `keep_alive` sets how
long the model stays loaded after the request; errors {"error": "message"}.

The chat page: GET / to a browser, and its files under /ui/ (web/: HTML, CSS, ES modules, nothing
from elsewhere), unless Server(ui=False); it uses the OpenAI routes like any app (web_ui.py).

Thinking templates (those that know <think> and </think>): each reply's thought goes apart from
its answer, whole and streamed: reasoning_content (OpenAI chat), thinking blocks (Anthropic),
thinking (Ollama), a reasoning item (Responses). Generation.events cuts the pieces with
inference's ThinkingSplitter (Piece.thinking), so each surface only routes them; the requests'
switches (enable_thinking through chat_template_kwargs, reasoning_effort, Anthropic's thinking,
Ollama's think) become ChatRequest.thinking and the template's variables; a thinking budget
(thinking_budget, Anthropic's budget_tokens) is SamplingParams.thinking_budget, which the batcher
enforces by writing </think> once the thought has that many tokens.

What lives where:

    requests.py   what the surfaces share: APIError, the strict pydantic base of the bodies and
                  their validation errors as one APIError naming the field, and the typed requests
                  (CompletionRequest, ChatRequest, EmbeddingRequest, with the engine's
                  SamplingParams) the pool turns into jobs; needs no model
    openai_api.py OpenAI's API: its body models, what they become, its routes and answers
    responses_api.py  OpenAI's Responses API, and the responses kept for previous_response_id
    anthropic_api.py  Anthropic's Messages API, mapped onto the same ChatRequest
    ollama_api.py Ollama's API: chat, generate, embed, tags, show, ps, version; options and keep_alive
    tools.py      the grammar that forces a tool call, and tool calls parsed out of a reply
    grammars.py   JSON schemas into GBNF, bounded (counted repetitions, depth) before llama.cpp parses them
    scheduler.py  Scheduler: per model, a thread that runs inference.Batcher over Jobs; each job's
                  events (inference's Piece, Done, Failed) go to its request through an EventSink
    pool.py       ModelSpec, ModelPool (on demand, within a memory budget, keep-alive),
                  MemoryEstimate, estimate_memory, and Served (one loaded model: scheduler,
                  embedder, requests into jobs)
    jobs.py       one generation for one HTTP request on the event loop: the model and job made
                  on a worker thread, events onto the loop, the client watched (one that goes
                  away cancels its job); JSON and streamed answers; the request log's fields
    routes.py     Server (uvicorn on a socket) and the FastAPI app: the surfaces' routers, API
                  key, CORS, body limit, error shapes, the request log line
    logs.py       the log: one line per request and every internal error's traceback, text or JSON
    metrics.py    the counters and histograms GET /metrics answers with
    web_ui.py     the chat page's files (web/), with a Content-Security-Policy that keeps it local

Models. A request's "model" picks one of the pool's models. A model is loaded by its first
request, on that request's thread (requests for it wait; the others go on), and gets its own
Scheduler and Embedder; it is unloaded `keep_alive` seconds after its last request. Each model's
memory is estimated before loading (file + KV cache + compute buffers); a load that would pass the
budget unloads idle models, least recently used first, or is refused (503 while the others are
busy, 400 if the model alone is larger than the budget). A file that fails to load is a 500 for
the requests that asked for it, and nothing else.

Bodies are strict: a field the API does not have is a 400 naming it (fields real clients send
that change nothing here are accepted). Sampling takes the engine's defaults, those of `slim run`
(SamplingParams: temperature 0.8, top_p 0.95, top_k 40, min_p 0.05), for what a request leaves
out, and top_k, min_p and repeat_penalty beside OpenAI's fields; temperature 0 is greedy.
presence_penalty and frequency_penalty count the generated tokens; max_tokens (or
max_completion_tokens) defaults to the rest of the sequence's context. Each of the `parallel`
KV-cache sequences keeps the tokens it holds after a request ends, so a later request with the
same prefix (the next turn of a chat) is only evaluated from where the two differ; with a prompt
cache (prompt_cache_bytes, `--cache-ram`), a sequence about to be cut back for another
conversation is saved in RAM first, and a request that continues a saved one further than any
free sequence does starts from it (inference's PromptCache). Usage reports the tokens so reused.

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
