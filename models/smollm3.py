"""SmolLM3: Llama whose every fourth layer attends without RoPE ("NoPE" layers).

llama.cpp's smollm3 fixes that pattern (no RoPE where (layer + 1) % 4 == 0) rather than reading it
from the file, so a config whose no_rope_layers differ is refused: the GGUF could not say so.
"""

from collections.abc import Collection, Mapping
from typing import Any

from .base import ArchitectureError
from .llama import Llama

# llama.cpp's n_no_rope_layer_step for smollm3.
NO_ROPE_STEP = 4


class SmolLM3(Llama):
    family = "SmolLM3"
    gguf_arch = "smollm3"
    hf_architectures = ("SmolLM3ForCausalLM",)
    hf_model_type = "smollm3"
    per_layer_config = ("layer_types", "no_rope_layers")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        fixed = [(i + 1) % NO_ROPE_STEP != 0 for i in range(self.n_layer)]
        given = [bool(flag) for flag in config.get("no_rope_layers", [int(f) for f in fixed])]
        if given != fixed:
            raise ArchitectureError(
                f"no_rope_layers {config.get('no_rope_layers')} is not llama.cpp's smollm3 pattern "
                f"(RoPE off in every {NO_ROPE_STEP}th layer), which a GGUF cannot change; "
                "pruning a SmolLM3 by whole layers breaks it too"
            )

    def rope_layers(self) -> list[bool]:
        return [(i + 1) % NO_ROPE_STEP != 0 for i in range(self.n_layer)]

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        config = super().config_from_gguf(fields, has_output)
        n_layer = config["num_hidden_layers"]
        config.update(
            no_rope_layers=[int((i + 1) % NO_ROPE_STEP != 0) for i in range(n_layer)],
            no_rope_layer_interval=NO_ROPE_STEP,
        )
        return config

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        return {**super().gguf_facts(fields, tensor_names), "layers without RoPE": f"every {NO_ROPE_STEP}th"}


ARCHITECTURE = SmolLM3
