"""Llama: SmolLM2, TinyLlama, Llama 2 and 3.x, Mistral and Mistral Nemo (dense).

Llama 3.1+'s `llama3` RoPE scaling becomes llama.cpp's rope_freqs tensor (base.extra_tensors),
Llama 3.2's tied embeddings drop the output tensor, and Mistral Nemo's head_dim (not hidden / heads)
is written as key/value_length: all handled by the base class.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

from .base import DecoderArchitecture

# llama.cpp's converter turns BOS off for the 49152-token vocabularies (SmolLM, Granite).
NO_BOS_VOCAB_SIZE = 49152


class Llama(DecoderArchitecture):
    family = "Llama"
    gguf_arch = "llama"
    hf_architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_model_type = "llama"
    permute_qk = True

    def metadata(self) -> dict[str, Any]:
        """llama.cpp's LlamaModel adds the vocabulary size and the rotated dimensions."""
        return {
            **super().metadata(),
            f"{self.gguf_arch}.vocab_size": self.vocab_size,
            f"{self.gguf_arch}.rope.dimension_count": self.head_dim,
        }

    @classmethod
    def tokenizer_overrides(
        cls, config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """llama.cpp's LlamaModel converter: add_space_prefix from tokenizer_config's add_prefix_space,
        and no BOS for 49152-token vocabularies."""
        overrides: dict[str, Any] = {}
        if tokenizer_config is not None and tokenizer_config.get("add_prefix_space") is not None:
            overrides["add_space_prefix"] = bool(tokenizer_config["add_prefix_space"])
        if config.get("vocab_size") == NO_BOS_VOCAB_SIZE:
            overrides["add_bos"] = False
        return overrides


ARCHITECTURE = Llama
