"""Shared test helpers: llama.cpp (through llama-cpp-python) as the oracle, the factory for tiny
random-weight checkpoints, and the one way tests run the `slim` command."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from slim.runtime.formats.checkpoint import write_safetensors
from slim.runtime.formats.mixes import mix


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


def make_qwen2_checkpoint(
    directory: Path,
    tokenizer_from: Path,
    *,
    hidden: int,
    ffn: int,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    **config: object,
) -> Path:
    """A random-weight Qwen2 checkpoint saved by transformers itself, with a real tokenizer; weights
    and biases larger than transformers' default init, so attention and biases matter."""
    import torch
    import transformers

    model_config = transformers.Qwen2Config(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        **config,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(model_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif param.ndim == 2:
                param.normal_(0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, directory / name)
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
