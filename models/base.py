"""What the Llama-family architectures share: hyperparameters, tensor names and their transforms.

An architecture module subclasses `DecoderArchitecture` and sets a few class attributes; the
conversion pipeline (slim.runtime.pipeline.convert) and export (slim.runtime.pipeline.export) only talk to this
interface, so adding an architecture touches one file in models/.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

# HF name (inside model.layers.N.) -> GGUF name (inside blk.N.), per llama.cpp's tensor_mapping.py.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Checkpoint entries that carry no weights llama.cpp needs (it recomputes RoPE frequencies).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class ArchitectureError(ValueError):
    """The checkpoint does not fit the architecture it claims."""


class DecoderArchitecture:
    """A Llama-style decoder: RMSNorm, rotary attention with grouped KV heads, gated FFN."""

    gguf_arch: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    hf_model_type: ClassVar[str]
    #: llama.cpp's `llama` rotates adjacent pairs, HF rotates halves: Q and K rows are permuted.
    permute_qk: ClassVar[bool] = False
    #: Qwen2 has q/k/v biases.
    attention_bias: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any]):
        def need(*keys: str) -> Any:
            for key in keys:
                if key in config:
                    return config[key]
            raise ArchitectureError(f"config.json has no {keys[0]!r}, which {self.gguf_arch} needs")

        self.config = config
        self.n_layer = int(need("num_hidden_layers"))
        self.hidden = int(need("hidden_size"))
        self.ffn = int(need("intermediate_size"))
        self.n_head = int(need("num_attention_heads"))
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.n_head)
        self.vocab_size = int(need("vocab_size"))
        self.context_length = int(config.get("max_position_embeddings", 2048))
        self.rms_eps = float(config.get("rms_norm_eps", 1e-6))
        # transformers v5 moved rope settings into rope_parameters; older configs use rope_theta/rope_scaling.
        self.rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        self.rope_theta = float(self.rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.tied_embeddings = bool(config.get("tie_word_embeddings", False))

    # ---- HF -> GGUF ---------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a checkpoint tensor, or None for one llama.cpp does not use."""
        if IGNORED.search(hf_name) or (self.tied_embeddings and hf_name == "lm_head.weight"):
            return None
        if hf_name in GLOBAL_TENSORS:
            return GLOBAL_TENSORS[hf_name]
        match = _LAYER.match(hf_name)
        if match and match.group(2) in LAYER_TENSORS:
            suffix = LAYER_TENSORS[match.group(2)]
            if suffix.endswith(".bias") and not self.attention_bias:
                raise ArchitectureError(f"{hf_name}: {self.gguf_arch} has no attention biases")
            return f"blk.{match.group(1)}.{suffix}"
        raise ArchitectureError(f"unexpected tensor {hf_name!r} for architecture {self.gguf_arch}")

    def used_gguf_name(self, hf_name: str) -> str:
        """The GGUF name of a tensor llama.cpp must use (a block's matrices); ArchitectureError otherwise."""
        name = self.gguf_name(hf_name)
        if name is None:
            raise ArchitectureError(f"{hf_name} has no GGUF name: llama.cpp does not use it")
        return name

    def gguf_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """HF name -> shape, renamed to GGUF name -> shape and without the tensors llama.cpp does not use."""
        return {
            gguf_name: shape for hf_name, shape in shapes.items() if (gguf_name := self.gguf_name(hf_name)) is not None
        }

    def to_gguf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """Transform a checkpoint tensor into llama.cpp's layout (the Q/K RoPE permutation)."""
        heads = self._qk_heads(gguf_name)
        if heads is None:
            return array
        return (
            array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        )

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3.1 RoPE factors)."""
        if self.rope.get("rope_type", self.rope.get("type", "")) != "llama3":
            return {}
        factor = float(self.rope.get("factor", 8.0))
        low = float(self.rope.get("low_freq_factor", 1.0))
        high = float(self.rope.get("high_freq_factor", 4.0))
        old_context = float(self.rope.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim))
        factors = []
        for freq in freqs:
            wavelength = 2 * math.pi / freq
            if wavelength < old_context / high:
                factors.append(1.0)
            elif wavelength > old_context / low:
                factors.append(factor)
            else:
                smooth = (old_context / wavelength - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": np.array(factors, dtype=np.float32)}

    def metadata(self) -> dict[str, Any]:
        """The `{arch}.*` GGUF keys, as llama.cpp's converter writes them."""
        arch = self.gguf_arch
        keys: dict[str, Any] = {
            f"{arch}.context_length": self.context_length,
            f"{arch}.embedding_length": self.hidden,
            f"{arch}.block_count": self.n_layer,
            f"{arch}.feed_forward_length": self.ffn,
            f"{arch}.attention.head_count": self.n_head,
            f"{arch}.attention.head_count_kv": self.n_head_kv,
            f"{arch}.rope.freq_base": self.rope_theta,
            f"{arch}.attention.layer_norm_rms_epsilon": self.rms_eps,
            f"{arch}.vocab_size": self.vocab_size,
            f"{arch}.rope.dimension_count": self.head_dim,
        }
        if self.head_dim != self.hidden // self.n_head:  # llama.cpp assumes hidden / heads otherwise
            keys[f"{arch}.attention.key_length"] = self.head_dim
            keys[f"{arch}.attention.value_length"] = self.head_dim
        rope_type = self.rope.get("rope_type", self.rope.get("type"))
        if rope_type == "linear" and "factor" in self.rope:
            keys[f"{arch}.rope.scaling.type"] = "linear"
            keys[f"{arch}.rope.scaling.factor"] = float(self.rope["factor"])
        elif rope_type not in (None, "default", "llama3"):
            raise ArchitectureError(f"RoPE scaling {rope_type!r} is not supported yet for {arch}")
        return keys

    # ---- GGUF -> HF ---------------------------------------------------------------------------

    def hf_name(self, gguf_name: str) -> str:
        for hf, gguf_ in GLOBAL_TENSORS.items():
            if gguf_ == gguf_name:
                return hf
        match = _BLOCK.match(gguf_name)
        if match:
            for hf, gguf_ in LAYER_TENSORS.items():
                if gguf_ == match.group(2):
                    return f"model.layers.{match.group(1)}.{hf}"
        raise ArchitectureError(f"GGUF tensor {gguf_name!r} has no Hugging Face name in {self.gguf_arch}")

    def to_hf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """Undo `to_gguf`."""
        heads = self._qk_heads(gguf_name)
        if heads is None:
            return array
        return (
            array.reshape(heads, array.shape[0] // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        )

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        """A transformers config.json for a GGUF of this architecture (its metadata as a dict)."""
        arch = cls.gguf_arch

        def get(key: str, default: Any = None) -> Any:
            return fields.get(f"{arch}.{key}", default)

        n_head = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        config = {
            "architectures": [cls.hf_architectures[0]],
            "model_type": cls.hf_model_type,
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
            "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // n_head))),
            "max_position_embeddings": int(get("context_length", 2048)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "vocab_size": int(get("vocab_size", len(fields.get("tokenizer.ggml.tokens", [])))),
            "tie_word_embeddings": not has_output,
            "hidden_act": "silu",
            "attention_bias": cls.attention_bias,
            "torch_dtype": "float32",
        }
        for key, hf_key in (
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ):
            if key in fields:
                config[hf_key] = int(fields[key])
        if get("rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        return config

    def _qk_heads(self, gguf_name: str) -> int | None:
        if not self.permute_qk:
            return None
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return self.n_head
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return self.n_head_kv
        return None
