"""Gemma 3 (text): Gemma 2 with an RMSNorm over each head of Q and K, without attention soft-capping,
with its own RoPE base for the sliding layers (rope_local_base_freq, linear scaling only on the full
ones) and five sliding layers to one full by default.

Gemma3ForConditionalGeneration's text part converts too: its config's text_config is read as the
model's and the vision tower and projector are left out, as llama.cpp's converter does (the
vision part is a separate mmproj file there).

A trap: llama.cpp's converter writes no layer pattern, so llama.cpp takes five sliding layers to one
full whatever layer_types says (for three sliding then one full its file's logits are off by ~1).
slim writes the per-layer list llama.cpp reads wherever layer_types is not that default.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from .base import ArchitectureError
from .gemma2 import SLIDING, Gemma2

# Where Gemma3ForConditionalGeneration keeps its language model, and the parts llama.cpp's text model skips.
_TEXT_PREFIX = re.compile(r"^(?:language_model\.model\.|model\.language_model\.)")
_VISION = re.compile(r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.")


class Gemma3(Gemma2):
    family = "Gemma 3"
    gguf_arch = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    hf_model_type = "gemma3_text"
    qk_norm = True
    layer_tensors = {
        **Gemma2.layer_tensors,
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
    }
    global_tensors = {**Gemma2.global_tensors, "lm_head.weight": "output.weight"}
    config_defaults: ClassVar[dict[str, Any]] = {
        **Gemma2.config_defaults,
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }
    swa_pattern = 6
    gguf_default_window = 0
    wide_scale_layers = 62

    def __init__(self, config: dict[str, Any]):
        text = config.get("text_config")
        if isinstance(text, dict):
            # Gemma3ForConditionalGeneration: its text model's config over its own, as llama.cpp reads it,
            # naming the text model (what a student trained on it saves)
            outer = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
            config = {**outer, **text, "architectures": ["Gemma3ForCausalLM"], "model_type": self.hf_model_type}
        if "layer_types" not in config:
            sliding_every = int(config.get("sliding_window_pattern") or self.swa_pattern)
            n_layer = int(config.get("num_hidden_layers", self.config_defaults["num_hidden_layers"]))
            config = {**config, "layer_types": [SLIDING if (i + 1) % sliding_every else "full_attention"
                                                for i in range(n_layer)]}  # fmt: skip
        super().__init__(config)
        rope = self.config.get("rope_parameters") or {}
        full = dict(rope.get("full_attention") or self.config.get("rope_scaling") or {})
        local = dict(rope.get("sliding_attention") or {})
        self.rope = full
        self.rope_theta = float(full.get("rope_theta", self.config.get("rope_theta", 1_000_000.0)))
        self.rope_local_theta = float(local.get("rope_theta", self.config.get("rope_local_base_freq", 10_000.0)))
        if local.get("rope_type", "default") != "default":
            raise ArchitectureError(
                f"RoPE scaling {local['rope_type']!r} on the sliding layers: "
                "llama.cpp's gemma3 scales only the full ones"
            )

    def _softcap(self, key: str, required: bool) -> float | None:
        if key == "attn_logit_softcapping" and self.config.get(key):
            raise ArchitectureError("attn_logit_softcapping is set, but llama.cpp's gemma3 does not soft-cap attention")
        return super()._softcap(key, required=False)

    def gguf_name(self, hf_name: str) -> str | None:
        if _VISION.match(hf_name):
            return None
        hf_name = _TEXT_PREFIX.sub("model.", hf_name).replace("language_model.lm_head.", "lm_head.")
        if hf_name == "lm_head.weight" and self.tied_embeddings:
            return None
        return super(Gemma2, self).gguf_name(hf_name)

    def local_rope_theta(self) -> float:
        return self.rope_local_theta

    def metadata(self) -> dict[str, Any]:
        """As llama.cpp's Gemma3Model writes them (its TextModel's keys, the local RoPE base, the
        final soft-cap where there is one)."""
        arch = self.gguf_arch
        keys = super(Gemma2, self).metadata()
        keys[f"{arch}.attention.key_length"] = self.head_dim
        keys[f"{arch}.attention.value_length"] = self.head_dim
        keys[f"{arch}.rope.freq_base_swa"] = self.rope_local_theta
        if self.final_softcap:
            keys[f"{arch}.final_logit_softcapping"] = self.final_softcap
        keys[f"{arch}.attention.sliding_window"] = int(self.window or 0)
        keys.update(self._pattern_metadata())
        return keys

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        facts = super().gguf_facts(fields, tensor_names)
        arch = cls.gguf_arch
        if f"{arch}.rope.freq_base_swa" in fields:
            full = fields.get(f"{arch}.rope.freq_base", 10000.0)
            facts["rope base"] = f"{full:g} full, {fields[f'{arch}.rope.freq_base_swa']:g} sliding"
        return facts

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        config = super().config_from_gguf(fields, has_output)
        arch = cls.gguf_arch
        rope_scaling = config.pop("rope_scaling", None) or {"rope_type": "default"}
        config.pop("rope_theta")
        config["rope_parameters"] = {
            "full_attention": {**rope_scaling, "rope_theta": float(fields.get(f"{arch}.rope.freq_base", 10000.0))},
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": float(fields.get(f"{arch}.rope.freq_base_swa", 10000.0)),
            },
        }
        config["attn_logit_softcapping"] = None
        return config


ARCHITECTURE = Gemma3
