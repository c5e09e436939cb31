"""Phi-3, Phi-3.5 and Phi-4-mini: fused projections, LongRoPE and partial rotary.

The checkpoint keeps Q, K and V in one qkv_proj and the FFN's gate and up halves in one
gate_up_proj; llama.cpp's phi3 reads them fused as they are (attn_qkv, and ffn_up holding the gate
rows first). RoPE is NEOX-style, so no Q/K permutation; it may rotate only the first
partial_rotary_factor of each head (Phi-4-mini: 3/4). LongRoPE's per-frequency short and long
factors become the rope_factors_short/long tensors and its attention factor a metadata key:
transformers takes the short ones for sequences up to original_max_position_embeddings, llama.cpp
for a context of at most that many tokens.

llama.cpp switches Phi-3's sliding window off and attends to the whole context, so a window
shorter than the context is refused: past it, the GGUF would not run the model transformers runs.
"""

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from .base import ArchitectureError, DecoderArchitecture

# Phi3Config's default, which transformers (and so llama.cpp's converter) uses when config.json has none.
DEFAULT_ORIGINAL_CONTEXT = 4096
LONG_FACTORS, SHORT_FACTORS = "rope_factors_long.weight", "rope_factors_short.weight"


class Phi3(DecoderArchitecture):
    family = "Phi-3"
    gguf_arch = "phi3"
    hf_architectures = ("Phi3ForCausalLM",)
    hf_model_type = "phi3"
    layer_tensors = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        arch = self.gguf_arch
        if self.head_dim * self.n_head != self.hidden:
            raise ArchitectureError(
                f"head_dim {self.head_dim} x {self.n_head} heads is not hidden_size {self.hidden}, "
                f"which llama.cpp's {arch} requires (it has no head size of its own)"
            )
        partial = float(self.rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        self.rope_dim = int(partial * self.hidden) // self.n_head
        if self.rope_dim != int(partial * self.head_dim) or self.rope_dim % 2:
            raise ArchitectureError(
                f"partial_rotary_factor {partial} rotates {partial * self.head_dim} of {self.head_dim} dimensions "
                "per head; llama.cpp needs a whole, even number"
            )
        self.original_context = int(config.get("original_max_position_embeddings") or DEFAULT_ORIGINAL_CONTEXT)
        window = config.get("sliding_window")
        if window is not None and int(window) < self.context_length:
            raise ArchitectureError(
                f"sliding_window {window} is shorter than the context ({self.context_length}), and llama.cpp's "
                f"{arch} attends to the whole context; set sliding_window to null in config.json to convert "
                "with full attention"
            )
        self.window = int(window or 0)
        rope_type = self.rope.get("rope_type", self.rope.get("type")) or "default"
        self.longrope = rope_type in ("longrope", "su")
        if not self.longrope and rope_type != "default":
            raise ArchitectureError(
                f"RoPE scaling {rope_type!r} is not supported for {arch}: transformers runs Phi-3 with "
                "longrope only, and llama.cpp's converter scales yarn's attention differently"
            )
        if self.longrope:
            short, long = self.rope.get("short_factor"), self.rope.get("long_factor")
            if not short or not long or len(short) != self.rope_dim // 2 or len(long) != self.rope_dim // 2:
                raise ArchitectureError(
                    f"longrope needs short_factor and long_factor of {self.rope_dim // 2} numbers each "
                    f"(one per rotated pair), config.json has {len(short or ())} and {len(long or ())}"
                )

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """LongRoPE's factors, one per rotated pair, as llama.cpp's converter writes them."""
        if not self.longrope:
            return {}
        return {
            LONG_FACTORS: np.array(self.rope["long_factor"], dtype=np.float32),
            SHORT_FACTORS: np.array(self.rope["short_factor"], dtype=np.float32),
        }

    def rope_factors(self, length: int) -> np.ndarray | None:
        if not self.longrope:
            return None
        return self.extra_tensors()[LONG_FACTORS if length > self.original_context else SHORT_FACTORS]

    def rope_attention_factor(self) -> float:
        """transformers' LongRoPE attention factor: config's, or from the context's growth (its
        `factor`, else max_position_embeddings / original_max_position_embeddings)."""
        if not self.longrope:
            return 1.0
        if self.rope.get("attention_factor") is not None:
            return float(self.rope["attention_factor"])
        scale = float(self.rope.get("factor") or self.context_length / self.original_context)
        return math.sqrt(1 + math.log(scale) / math.log(self.original_context)) if scale > 1 else 1.0

    def metadata(self) -> dict[str, Any]:
        """llama.cpp's Phi3MiniModel keys: the rotated dimensions, the original context, the sliding
        window (0 for none) and, with LongRoPE, the attention factor."""
        arch = self.gguf_arch
        keys: dict[str, Any] = {
            f"{arch}.context_length": self.context_length,
            f"{arch}.rope.scaling.original_context_length": self.original_context,
            f"{arch}.embedding_length": self.hidden,
            f"{arch}.feed_forward_length": self.ffn,
            f"{arch}.block_count": self.n_layer,
            f"{arch}.attention.head_count": self.n_head,
            f"{arch}.attention.head_count_kv": self.n_head_kv,
            f"{arch}.attention.layer_norm_rms_epsilon": self.rms_eps,
            f"{arch}.rope.dimension_count": self.rope_dim,
            f"{arch}.rope.freq_base": self.rope_theta,
            f"{arch}.attention.sliding_window": self.window,
        }
        if self.longrope:
            keys[f"{arch}.rope.scaling.attn_factor"] = self.rope_attention_factor()
        return keys

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        """The base config plus what Phi3Config reads: the original context, the rotated fraction,
        the window, and LongRoPE's factors from the GGUF's tensors (export passes them in `fields`)."""
        config = super().config_from_gguf(fields, has_output)
        arch = cls.gguf_arch
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        rope_dim = int(fields.get(f"{arch}.rope.dimension_count", head_dim))
        window = int(fields.get(f"{arch}.attention.sliding_window", 0))
        config.update(
            original_max_position_embeddings=int(
                fields.get(f"{arch}.rope.scaling.original_context_length", DEFAULT_ORIGINAL_CONTEXT)
            ),
            partial_rotary_factor=rope_dim / head_dim,
            sliding_window=window or None,
        )
        if LONG_FACTORS in fields and SHORT_FACTORS in fields:
            config["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": [float(x) for x in fields[LONG_FACTORS]],
                "short_factor": [float(x) for x in fields[SHORT_FACTORS]],
            }
            stored = fields.get(f"{arch}.rope.scaling.attn_factor")
            if stored is not None and not math.isclose(cls(config).rope_attention_factor(), stored, rel_tol=1e-6):
                config["rope_scaling"]["attention_factor"] = float(stored)
        return config

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        facts = super().gguf_facts(fields, tensor_names)
        arch = cls.gguf_arch
        if LONG_FACTORS in tensor_names:
            original = fields.get(f"{arch}.rope.scaling.original_context_length", DEFAULT_ORIGINAL_CONTEXT)
            facts["rope scaling"] = f"longrope, {original} -> {fields.get(f'{arch}.context_length')} tokens"
        head_dim = fields[f"{arch}.embedding_length"] // fields[f"{arch}.attention.head_count"]
        rope_dim = fields.get(f"{arch}.rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            facts["rope"] = f"rotates {rope_dim} of {head_dim} dimensions per head"
        return facts


ARCHITECTURE = Phi3
