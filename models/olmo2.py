"""OLMo 2: no norms before attention and FFN but one after each, and Q/K normalised across all heads.

Each block adds RMSNorm(attention(x)) and then RMSNorm(FFN(x)) to the residual stream (llama.cpp's
post_attention_norm and post_ffw_norm); q_norm and k_norm are one RMSNorm over the whole Q and K
projections, before they are split into heads. RoPE is NEOX-style, so no Q/K permutation.
llama.cpp's olmo2 needs its own output matrix and a head size of hidden / heads: configs with
tied embeddings or another head_dim are refused.
"""

from collections.abc import Collection, Mapping
from typing import Any

from .base import ArchitectureError, DecoderArchitecture


class Olmo2(DecoderArchitecture):
    family = "OLMo 2"
    gguf_arch = "olmo2"
    hf_architectures = ("Olmo2ForCausalLM",)
    hf_model_type = "olmo2"
    qk_norm = True
    qk_norm_over_heads = True
    layer_tensors = {
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        if self.tied_embeddings:
            raise ArchitectureError("llama.cpp's olmo2 needs an output matrix of its own; tied embeddings are refused")
        if self.head_dim * self.n_head != self.hidden:
            raise ArchitectureError(
                f"head_dim {self.head_dim} x {self.n_head} heads is not hidden_size {self.hidden}, "
                "which llama.cpp's olmo2 requires"
            )
        if config.get("attention_bias"):
            raise ArchitectureError("OLMo 2 with attention_bias is not supported (llama.cpp's olmo2 has no biases)")

    def required_tensors(self) -> list[str]:
        return [*super().required_tensors(), "output.weight"]

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        return {**super().gguf_facts(fields, tensor_names), "norms": "after attention and FFN; Q/K across all heads"}


ARCHITECTURE = Olmo2
