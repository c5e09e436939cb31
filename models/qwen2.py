"""Qwen2 and Qwen2.5: q/k/v biases, and NEOX-style RoPE in llama.cpp, so no Q/K permutation."""

from .base import DecoderArchitecture


class Qwen2(DecoderArchitecture):
    family = "Qwen2"
    gguf_arch = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_type = "qwen2"
    attention_bias = True


ARCHITECTURE = Qwen2
