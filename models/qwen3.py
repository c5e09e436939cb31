"""Qwen3: Qwen2 without the q/k/v biases, with an RMSNorm over each head of Q and K before RoPE."""

from .base import LAYER_TENSORS, DecoderArchitecture


class Qwen3(DecoderArchitecture):
    family = "Qwen3"
    gguf_arch = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    hf_model_type = "qwen3"
    qk_norm = True
    layer_tensors = {
        **LAYER_TENSORS,
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
    }


ARCHITECTURE = Qwen3
