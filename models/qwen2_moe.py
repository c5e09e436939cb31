"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention with q/k/v biases, every FFN a
set of routed experts plus one shared expert that every token runs through.

The router is mlp.gate, the experts mlp.experts.E.{gate,up,down}_proj (moe_intermediate_size wide),
the shared expert mlp.shared_expert.{gate,up,down}_proj (shared_expert_intermediate_size wide),
scaled per token by sigmoid(mlp.shared_expert_gate x). llama.cpp's qwen2moe does not renormalise
the chosen experts' probabilities and runs every layer sparse, so configs asking otherwise are
refused.
"""

from typing import Any

import numpy as np

from .base import LAYER_TENSORS, ArchitectureError, MixtureOfExperts

DENSE_FFN = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class Qwen2Moe(MixtureOfExperts):
    family = "Qwen2-MoE"
    gguf_arch = "qwen2moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    hf_model_type = "qwen2_moe"
    attention_bias = True
    normalizes_top_k = False
    layer_tensors = {
        **{hf: gguf_ for hf, gguf_ in LAYER_TENSORS.items() if hf not in DENSE_FFN},
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    }
    experts_module = "mlp.experts"
    expert_tensors = {
        "gate_proj.weight": "ffn_gate_exps.weight",
        "up_proj.weight": "ffn_up_exps.weight",
        "down_proj.weight": "ffn_down_exps.weight",
    }
    expert_count_keys = ("num_experts", "num_local_experts")
    expert_ffn_key = "moe_intermediate_size"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        if config.get("norm_topk_prob", False):
            raise ArchitectureError(
                "config.json has norm_topk_prob true, and llama.cpp's qwen2moe never renormalises the chosen "
                "experts' weights: the GGUF would run a different model"
            )
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise ArchitectureError(
                "config.json makes some layers dense (mlp_only_layers, decoder_sparse_step), which llama.cpp's "
                "qwen2moe does not run; every layer must be a mixture of experts"
            )
        self.shared_expert_ffn = int(config.get("shared_expert_intermediate_size") or 0)
        if not self.shared_expert_ffn:
            raise ArchitectureError("config.json needs shared_expert_intermediate_size for a Qwen2-MoE model")

    # The shared expert's gate is one row, which llama-quantize writes as a 1-D tensor.
    def hf_layout(self, gguf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            return [(self.hf_name(gguf_name), (1, shape[-1]))]
        return super().hf_layout(gguf_name, shape)

    def to_hf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        return array.reshape(1, -1) if gguf_name.endswith("ffn_gate_inp_shexp.weight") else array

    def metadata(self) -> dict[str, Any]:
        arch = self.gguf_arch
        return {
            **super().metadata(),
            f"{arch}.expert_feed_forward_length": self.expert_ffn,
            f"{arch}.expert_shared_feed_forward_length": self.shared_expert_ffn,
        }

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        config = super().config_from_gguf(fields, has_output)
        arch = cls.gguf_arch
        config["moe_intermediate_size"] = int(fields[f"{arch}.expert_feed_forward_length"])
        config["shared_expert_intermediate_size"] = int(fields[f"{arch}.expert_shared_feed_forward_length"])
        config.update(norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
        return config


ARCHITECTURE = Qwen2Moe
