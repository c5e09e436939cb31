"""Peak memory of converting a mixture of experts: it must stay near one layer's experts.

Builds (once, under SLIM_HOME) a random-weight Qwen3-MoE checkpoint in bf16, one safetensors shard
per layer as the hub's are, large enough that its experts dwarf everything else: 12 layers of 32
experts (hidden 512, expert FFN 768), about 0.9 GB. Then converts it with slim (Q4_K_M and F16,
one thread: one tensor in flight) and with llama.cpp's convert_hf_to_gguf.py (F16), each in its own
process, and prints wall time and peak resident memory against the size of one layer's experts
(the three stacked matrices, as float32 and as in the file) and of the whole checkpoint.

    python benchmarks/moe_convert.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from convert import measure
from llama_cpp_source import source_dir

from slim.runtime.store import assets

LAYERS, EXPERTS, USED, HIDDEN, EXPERT_FFN, HEADS, KV_HEADS, HEAD_DIM = 12, 32, 4, 512, 768, 8, 2, 64


def bf16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (truncated: these are random weights)."""
    return (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of bf16 tensors, written by hand (numpy has no bfloat16 dtype)."""
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def checkpoint() -> Path:
    target = assets.slim_home() / "bench" / "qwen3-moe-random-bf16"
    if (target / "model.safetensors.index.json").exists():
        return target
    from slim.runtime.pipeline.export import export

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    export(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), partial / "tokenizer-source", "BF16")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (partial / "tokenizer-source" / name).exists():
            shutil.copy(partial / "tokenizer-source" / name, partial / name)
    shutil.rmtree(partial / "tokenizer-source")
    rng = np.random.default_rng(0)
    vocab = 49152  # SmolLM2's tokenizer

    def weights(*shape: int) -> np.ndarray:
        return bf16(rng.standard_normal(shape, dtype=np.float32) * 0.05)

    index: dict[str, str] = {}
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": weights(vocab, HIDDEN),
                                          "model.norm.weight": bf16(np.ones(HIDDEN, np.float32))}}  # fmt: skip
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        tensors = {
            prefix + "input_layernorm.weight": bf16(np.ones(HIDDEN, np.float32)),
            prefix + "post_attention_layernorm.weight": bf16(np.ones(HIDDEN, np.float32)),
            prefix + "self_attn.q_proj.weight": weights(HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.k_proj.weight": weights(KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.v_proj.weight": weights(KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.o_proj.weight": weights(HIDDEN, HEADS * HEAD_DIM),
            prefix + "self_attn.q_norm.weight": bf16(np.ones(HEAD_DIM, np.float32)),
            prefix + "self_attn.k_norm.weight": bf16(np.ones(HEAD_DIM, np.float32)),
            prefix + "mlp.gate.weight": weights(EXPERTS, HIDDEN),
        }
        for e in range(EXPERTS):
            tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = weights(EXPERT_FFN, HIDDEN)
            tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = weights(EXPERT_FFN, HIDDEN)
            tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = weights(HIDDEN, EXPERT_FFN)
        shards[f"model-{layer:05d}.safetensors"] = tensors
    for file, tensors in shards.items():
        write_shard(partial / file, tensors)
        index.update(dict.fromkeys(tensors, file))
    (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN, "moe_intermediate_size": EXPERT_FFN, "num_experts": EXPERTS,
        "num_experts_per_tok": USED, "norm_topk_prob": True, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "vocab_size": vocab,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "decoder_sparse_step": 1, "mlp_only_layers": [],
    }  # fmt: skip
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        checkpoint()
        return
    # Built in a process of its own: a child forked from a parent holding the weights would start with
    # the parent's resident pages, and the kernel's peak (ru_maxrss) survives the exec.
    subprocess.run([sys.executable, __file__, "--build"], check=True)
    source = checkpoint()
    out = assets.slim_home() / "bench" / "moe-out"
    out.mkdir(parents=True, exist_ok=True)
    layer_f32 = 3 * EXPERTS * EXPERT_FFN * HIDDEN * 4 / 1e6
    total = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e6
    print(f"checkpoint: {total:.0f} MB bf16; one layer's experts: {layer_f32:.0f} MB as float32, "
          f"{layer_f32 / 2:.0f} MB as bf16 or F16, one stacked matrix {layer_f32 / 3:.0f} MB as float32")  # fmt: skip
    slim = [sys.executable, "-m", "slim.runtime.cli", "convert", str(source), "--threads", str(args.threads), "-q",
            "--force"]  # fmt: skip
    runs = {
        "slim convert Q4_K_M": slim + ["-o", str(out / "slim-q4_k_m.gguf"), "--type", "Q4_K_M"],
        "slim convert F16": slim + ["-o", str(out / "slim-f16.gguf"), "--type", "F16"],
        "convert_hf_to_gguf.py F16": [sys.executable, str(source_dir() / "convert_hf_to_gguf.py"), str(source),
                                      "--outtype", "f16", "--outfile", str(out / "theirs-f16.gguf")],
    }  # fmt: skip
    print(f"{'run':<28}{'wall s':>9}{'peak MB':>9}{'peak / layer f32':>18}")
    for name, command in runs.items():
        wall, peak = measure(command)
        print(f"{name:<28}{wall:>9.1f}{peak:>9.0f}{peak / layer_f32:>18.2f}")


if __name__ == "__main__":
    main()
