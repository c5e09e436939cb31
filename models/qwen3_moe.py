"""Qwen3-MoE (Qwen3-30B-A3B and its kin): Qwen3's attention, every FFN a set of experts.

The router is mlp.gate, the experts mlp.experts.E.{gate,up,down}_proj, each moe_intermediate_size
wide. llama.cpp's qwen3moe always renormalises the chosen experts' probabilities and runs every
layer sparse, so a config that asks otherwise (norm_topk_prob false, dense mlp_only_layers, a
decoder_sparse_step above 1) is refused rather than converted into a model that runs differently.
"""

from typing import Any

from .base import LAYER_TENSORS, ArchitectureError, MixtureOfExperts

DENSE_FFN = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class Qwen3Moe(MixtureOfExperts):
    family = "Qwen3-MoE"
    gguf_arch = "qwen3moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_model_type = "qwen3_moe"
    qk_norm = True
    layer_tensors = {
        **{hf: gguf_ for hf, gguf_ in LAYER_TENSORS.items() if hf not in DENSE_FFN},
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
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
        if config.get("norm_topk_prob", False) is not True:
            raise ArchitectureError(
                "config.json has norm_topk_prob false, and llama.cpp's qwen3moe always renormalises the chosen "
                "experts' weights: the GGUF would run a different model"
            )
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise ArchitectureError(
                "config.json makes some layers dense (mlp_only_layers, decoder_sparse_step), which llama.cpp's "
                "qwen3moe does not run; every layer must be a mixture of experts"
            )

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), f"{self.gguf_arch}.expert_feed_forward_length": self.expert_ffn}

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        config = super().config_from_gguf(fields, has_output)
        config["moe_intermediate_size"] = int(fields[f"{cls.gguf_arch}.expert_feed_forward_length"])
        config.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        return config


ARCHITECTURE = Qwen3Moe
