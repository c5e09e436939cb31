"""Inference on llama.cpp's C API: load a GGUF, generate (one request, a chat, or many sequences
batched together), render chat templates, embed; and evaluation (perplexity, KL divergence).

    from slim.runtime import inference

    model = inference.load("smollm2.gguf")                    # threads and context chosen for the machine
    reply = model.chat([{"role": "user", "content": "Hi!"}], temperature=0)
    print(reply.text, reply.finish_reason, reply.timings.generation_tokens_per_s)

    stream = model.complete("Once upon a time", stream=True, max_tokens=64)
    for piece in stream:                                       # text pieces as they are generated
        print(piece, end="", flush=True)
    print(stream.result.completion_tokens)

    chat = model.session(system="You are terse.")              # multi-turn, reuses the KV cache
    chat.send("Name a colour.")
    chat.send("Another one?")                                  # evaluates only the new tokens

What lives where (the layers above import only the names below, from this package):

    model.py          load, Model, Result, Timings, Stream, DEFAULT_MAX_CTX
    session.py        ChatSession (multi-turn, one KV-cache sequence)
    batching.py       Batcher (continuous batching) and its events Piece, Done, Failed; Sequence,
                      Batch (a llama_batch), Slot (a KV-cache sequence), common_prefix
    sampling.py       SamplingParams, Sampler (llama.cpp's C sampler chain), GrammarError
    chat_template.py  render_chat, compile_template, sandboxed_environment, mask_markers, FALLBACK_TEMPLATE/_STOPS
    text.py           TextAssembler (UTF-8 joins across tokens, stop strings that never leak)
    embedding.py      Embedder (mean-pooled sentence embeddings, a second context)
    llama.py          llama_bindings, silence_logs, physical_cores
    kv_cache.py       KV_CACHE_TYPES, kv_cache_bytes (the cache's memory), check_cache_types
    reasoning.py      ThinkingSplitter, split_thinking (<think> blocks told apart from the answer),
                      template_thinks, prompt_opens_thinking, thinking_variables, effort_enables
    prompt_cache.py   PromptCache: sequences' KV states kept in RAM across requests (the server's --cache-ram)
    errors.py         EngineError (llama.cpp refused), ContextError (the prompt does not fit),
                      TemplateError; GGUFError (not a usable GGUF) comes from formats
    evaluate.py       perplexity and KL divergence (import slim.runtime.inference.evaluate itself:
                      it needs numpy, which generation does not load)

Design. One Model holds one llama.cpp model and one context whose KV cache has n_seq_max
sequences (slots). Each slot records exactly which tokens its KV cache holds; every generation
finds the common prefix of its prompt with those tokens, removes the rest from the cache and
evaluates only the new suffix. That is what makes a chat's next turn cheap, and what keeps the
cache consistent after an interrupted generation: whatever was not recorded is removed when the
generation ends. All generation runs through Batcher.step (Model.complete and chat drive it with
one sequence; the server with many); sampling is llama.cpp's C sampler chain.

Imports: formats, store and runtime.files. The modules here share Model's llama.cpp handles;
no module outside this package touches an underscore name of its objects (tests/test_private_names.py).
"""

from slim.runtime.inference.batching import (
    PROMPT_BUDGET,
    Batch,
    Batcher,
    Done,
    Event,
    Failed,
    Piece,
    Sequence,
    Slot,
    common_prefix,
)
from slim.runtime.inference.chat_template import (
    FALLBACK_STOPS,
    FALLBACK_TEMPLATE,
    compile_template,
    mask_markers,
    render_chat,
    sandboxed_environment,
)
from slim.runtime.inference.embedding import Embedder
from slim.runtime.inference.errors import ContextError, EngineError, GGUFError, TemplateError
from slim.runtime.inference.kv_cache import KV_CACHE_TYPES, check_cache_types, kv_cache_bytes
from slim.runtime.inference.llama import llama_bindings, physical_cores, silence_logs
from slim.runtime.inference.model import DEFAULT_MAX_CTX, Model, Result, Stream, Timings, load
from slim.runtime.inference.reasoning import (
    ThinkingSplitter,
    effort_enables,
    prompt_opens_thinking,
    split_thinking,
    template_thinks,
    thinking_variables,
)
from slim.runtime.inference.sampling import REPEAT_LAST_N, GrammarError, Sampler, SamplingParams
from slim.runtime.inference.session import ChatSession
from slim.runtime.inference.text import TextAssembler

__all__ = [
    "DEFAULT_MAX_CTX",
    "FALLBACK_STOPS",
    "FALLBACK_TEMPLATE",
    "KV_CACHE_TYPES",
    "PROMPT_BUDGET",
    "REPEAT_LAST_N",
    "Batch",
    "Batcher",
    "ChatSession",
    "ContextError",
    "Done",
    "Embedder",
    "EngineError",
    "Event",
    "Failed",
    "GGUFError",
    "GrammarError",
    "Model",
    "Piece",
    "Result",
    "Sampler",
    "SamplingParams",
    "Sequence",
    "Slot",
    "Stream",
    "TemplateError",
    "TextAssembler",
    "ThinkingSplitter",
    "Timings",
    "check_cache_types",
    "common_prefix",
    "compile_template",
    "effort_enables",
    "kv_cache_bytes",
    "llama_bindings",
    "load",
    "mask_markers",
    "physical_cores",
    "prompt_opens_thinking",
    "render_chat",
    "sandboxed_environment",
    "silence_logs",
    "split_thinking",
    "template_thinks",
    "thinking_variables",
]
