"""Mixtral (8x7B, 8x22B and smaller kin): Mistral's attention, every FFN eight experts of which
two run per token.

The router is block_sparse_moe.gate, the experts block_sparse_moe.experts.E.w1 (gate), w3 (up)
and w2 (down). llama.cpp runs it as its `llama` architecture with experts, so Q and K rows get
Llama's RoPE permutation and the vocabulary rules of the Llama converter.
"""

from typing import Any, ClassVar

from .base import LAYER_TENSORS, MixtureOfExperts
from .llama import Llama

DENSE_FFN = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class Mixtral(MixtureOfExperts, Llama):
    family = "Mixtral"
    hf_architectures: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM",)
    hf_model_type = "mixtral"
    layer_tensors = {
        **{hf: gguf_ for hf, gguf_ in LAYER_TENSORS.items() if hf not in DENSE_FFN},
        "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    }
    experts_module = "block_sparse_moe.experts"
    expert_tensors = {
        "w1.weight": "ffn_gate_exps.weight",
        "w3.weight": "ffn_up_exps.weight",
        "w2.weight": "ffn_down_exps.weight",
    }
    expert_count_keys = ("num_local_experts",)

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        return {**super().config_from_gguf(fields, has_output), "sliding_window": None}


ARCHITECTURE = Mixtral
