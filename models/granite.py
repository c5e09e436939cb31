"""Granite 3 (dense): Llama with four multipliers, written as llama.cpp's granite keys.

transformers scales the embeddings by embedding_multiplier, Q.K by attention_multiplier (in place
of 1/sqrt(head_dim)), each block's attention and FFN output by residual_multiplier before the
residual sum, and divides the logits by logits_scaling. llama.cpp's converter is its Llama
converter plus those keys, and ignores head_dim, so a head size other than hidden / heads is refused.
"""

from collections.abc import Collection, Mapping
from typing import Any

from .base import ArchitectureError
from .llama import Llama

# config.json key -> llama.cpp key (after "granite."); transformers' GraniteConfig defaults each to 1.
MULTIPLIERS = {
    "embedding_multiplier": "embedding_scale",
    "attention_multiplier": "attention.scale",
    "residual_multiplier": "residual_scale",
    "logits_scaling": "logit_scale",
}


class Granite(Llama):
    family = "Granite"
    gguf_arch = "granite"
    hf_architectures = ("GraniteForCausalLM",)
    hf_model_type = "granite"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ArchitectureError("Granite with attention_bias or mlp_bias is not supported (Granite 3 has neither)")
        if self.head_dim * self.n_head != self.hidden:
            raise ArchitectureError(
                f"head_dim {self.head_dim} x {self.n_head} heads is not hidden_size {self.hidden}; "
                "llama.cpp's granite converter ignores head_dim"
            )
        self.multipliers = {key: float(config.get(key, 1.0)) for key in MULTIPLIERS}
        self.embedding_scale = self.multipliers["embedding_multiplier"]
        self.attention_scale = self.multipliers["attention_multiplier"]
        self.residual_scale = self.multipliers["residual_multiplier"]
        self.logit_scale = self.multipliers["logits_scaling"]
        if not all(self.multipliers.values()):
            raise ArchitectureError(f"Granite's multipliers must not be 0 (llama.cpp drops them): {self.multipliers}")

    def metadata(self) -> dict[str, Any]:
        """Llama's keys without the head size (the converter drops head_dim), plus the multipliers."""
        arch = self.gguf_arch
        keys = {
            key: value
            for key, value in super().metadata().items()
            if key not in (f"{arch}.attention.key_length", f"{arch}.attention.value_length")
        }
        keys.update({f"{arch}.{name}": self.multipliers[key] for key, name in MULTIPLIERS.items()})
        return keys

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        config = super().config_from_gguf(fields, has_output)
        config.update(
            {key: float(fields.get(f"{cls.gguf_arch}.{name}", 1.0)) for key, name in MULTIPLIERS.items()},
            attention_bias=False,
            mlp_bias=False,
        )
        return config

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        facts = super().gguf_facts(fields, tensor_names)
        scales = {key: fields.get(f"{cls.gguf_arch}.{name}", 1.0) for key, name in MULTIPLIERS.items()}
        listed = ", ".join(f"{key} {value:g}" for key, value in scales.items() if value != 1)
        return {**facts, **({"multipliers": listed} if listed else {})}


ARCHITECTURE = Granite
