"""Shared test helpers: llama.cpp (through llama-cpp-python) as the oracle, the factory for tiny
random-weight checkpoints, and the one way tests run the `slim` command."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from slim.runtime.formats.checkpoint import write_safetensors
from slim.runtime.formats.mixes import mix

# The split regexes as Llama 3, Qwen2.5 and Mistral Nemo ship them in tokenizer.json (written out independently
# of the module's table on purpose).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/NAME.py, loaded by path under a name of its own: benchmarks/ is not on sys.path, where
    its generic module names (kernels, serve, convert) would shadow installed packages."""
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"slim_benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pre_tokenizer_json(name: str) -> tuple[dict | None, dict]:
    """(normalizer, pre_tokenizer) as tokenizer.json spells them for the families' pre-tokenizers."""
    regex = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "tekken": TEKKEN_REGEX}[name]
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    normalizer = {"type": "NFC"} if name == "qwen2" else None
    return normalizer, {"type": "Sequence", "pretokenizers": [split, byte_level]}


def llama_quantize(source: Path, target: Path, type_name: str, threads: int = 2) -> None:
    """llama.cpp's own llama-quantize, through the library call it wraps."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = mix(type_name).ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (type name, ggml shape, raw bytes) for every tensor of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.asarray(t.data).tobytes())
        for t in reader.tensors
    }


def llama_logits(path: Path, tokens: list[int], n_ctx: int = 2048, exact: bool = False) -> np.ndarray:
    """llama.cpp's logits for every position of `tokens` (one sequence, from position 0).

    exact: keep the KV cache in F32 (llama.cpp's default is F16), to compare with float32 math."""
    import llama_cpp

    cache_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
    llm = llama_cpp.Llama(
        str(path), n_ctx=max(n_ctx, len(tokens)), logits_all=True, n_threads=2, n_batch=512, verbose=False, **cache_type
    )
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def tokenize(path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def make_llama_checkpoint(
    directory: Path,
    tokenizer_from: Path,
    *,
    hidden: int = 256,
    n_layer: int = 8,
    n_head: int = 4,
    n_head_kv: int = 2,
    ffn: int = 512,
    dtype: str = "F32",
    tied: bool = False,
    seed: int = 0,
) -> Path:
    """A random-weight Llama checkpoint with a real tokenizer: small, but every row length and
    layer count can be chosen so each quantization rule is exercised."""
    config = json.loads((tokenizer_from / "config.json").read_text())
    vocab = config["vocab_size"]
    config.update(
        hidden_size=hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        intermediate_size=ffn,
        head_dim=hidden // n_head,
        tie_word_embeddings=tied,
        torch_dtype={"F32": "float32", "BF16": "bfloat16"}[dtype],
    )
    directory.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, directory / name)
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    kv = hidden // n_head * n_head_kv
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)

    def tensors():
        for name, shape in shapes.items():
            if len(shape) == 1:
                yield name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                yield name, (rng.standard_t(5, size=shape) * 0.02).astype(np.float32)

    write_safetensors(directory / "model.safetensors", tensors(), {n: (s, dtype) for n, s in shapes.items()})
    return directory


def run_slim(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`slim ARGS` run in this process by click's test runner: the exit code, stdout and stderr that a
    subprocess gives, without starting an interpreter and importing numpy, llama.cpp and torch again.

    env: variables set for the run only (SLIM_HOME, read when a command runs). An exception the CLI
    does not turn into an exit code is raised here, where a subprocess would print a traceback.
    Tests about the process itself (signals, a terminal, a server, the installed entry point)
    start a real one instead."""
    from click.testing import CliRunner

    from slim.runtime.cli import main

    result = CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(["slim", *args], result.exit_code, result.stdout, result.stderr)


@contextmanager
def two_model_server(plain: Path, tools: Path, api_key: str | None = None) -> Iterator[str]:
    """A real `slim serve` on loopback with two models, "smollm2-135m" (its own template) and
    "tools-model" (a template that renders tools), two slots each; yields its base URL."""
    with serving({"smollm2-135m": plain, "tools-model": tools}, api_key=api_key, n_batch=64) as base:
        yield base


@contextmanager
def serving(models: dict[str, Path], api_key: str | None = None, **pool_options: Any) -> Iterator[str]:
    """A real `slim serve` on loopback over `models` (name: GGUF), the first loaded at start; by
    default two slots of 512 tokens each, one thread, nothing unloaded. Yields its base URL."""
    from slim.runtime import serve

    options = {"parallel": 2, "ctx": 512, "keep_alive": -1, "n_threads": 1, **pool_options}
    pool = serve.ModelPool([serve.ModelSpec([name], path) for name, path in models.items()], **options)
    server = serve.Server(pool, api_key=api_key)
    host, port = server.start("127.0.0.1", 0)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
