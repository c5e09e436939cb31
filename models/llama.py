"""Llama: SmolLM2, TinyLlama, Llama 2 and 3, Mistral (dense)."""

from .base import DecoderArchitecture


class Llama(DecoderArchitecture):
    gguf_arch = "llama"
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_model_type = "llama"
    permute_qk = True


ARCHITECTURE = Llama
