"""Gemma 2: RMSNorms stored as w and applied as (1 + w), embeddings scaled by sqrt(hidden), a norm
before and after both attention and the FFN, a GELU-tanh gate, q.k scaled by query_pre_attn_scalar,
sliding-window layers on a pattern, and tanh soft-capping of attention scores and output logits.

llama.cpp's converter adds 1 to every norm when writing (so to_gguf does, and to_hf subtracts it).
llama.cpp fixes some things the config could vary: the output projection is the embeddings, q.k is
scaled by 1/sqrt(head_dim) (1/sqrt(hidden / heads) at 46 layers), and without a pattern in the file
it takes every second layer as sliding. A config that wants another scale or activation is refused;
a layer pattern other than llama.cpp's default is written as the per-layer list llama.cpp reads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import numpy as np

from .base import GLOBAL_TENSORS, LAYER_TENSORS, ArchitectureError, DecoderArchitecture, LayerAttention

SLIDING, FULL = "sliding_attention", "full_attention"


class Gemma2(DecoderArchitecture):
    family = "Gemma 2"
    gguf_arch = "gemma2"
    hf_architectures: ClassVar[tuple[str, ...]] = ("Gemma2ForCausalLM",)
    hf_model_type = "gemma2"
    layer_tensors = {
        **{hf: gguf for hf, gguf in LAYER_TENSORS.items() if not hf.endswith(".bias")},
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    }
    global_tensors = {hf: gguf for hf, gguf in GLOBAL_TENSORS.items() if hf != "lm_head.weight"}
    sliding_window = True
    norm_offset = 1.0
    scale_embeddings = True
    ffn_activation = "gelu_tanh"
    #: transformers' defaults for the keys a config.json may leave out.
    config_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    }
    #: llama.cpp's layer pattern when the file names none: every n-th layer attends to everything.
    swa_pattern: ClassVar[int] = 2
    #: llama.cpp's sliding window when the file names none (0: no sliding layers).
    gguf_default_window: ClassVar[int] = 4096
    #: the depth at which llama.cpp scales q.k by 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim).
    wide_scale_layers: ClassVar[int] = 46

    def __init__(self, config: dict[str, Any]):
        super().__init__({**self.config_defaults, **config})
        config = self.config
        self.layer_types = list(config.get("layer_types") or self._pattern(self.swa_pattern))
        if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ArchitectureError(
                f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {self.n_layer} layers"
            )
        self.window = config.get("sliding_window")
        if SLIDING in self.layer_types and not self.window:
            raise ArchitectureError("config.json has sliding-window layers but no sliding_window")
        if config.get("hidden_activation") != "gelu_pytorch_tanh":
            raise ArchitectureError(
                f"hidden_activation {config.get('hidden_activation')!r}: llama.cpp's {self.gguf_arch} runs "
                "gelu_pytorch_tanh only"
            )
        if config.get("use_bidirectional_attention"):
            raise ArchitectureError(
                f"llama.cpp's {self.gguf_arch} attends causally; bidirectional attention is not run"
            )
        if config.get("attention_bias"):
            raise ArchitectureError(f"llama.cpp's {self.gguf_arch} has no attention biases")
        scale_of = self.hidden // self.n_head if self.n_layer == self.wide_scale_layers else self.head_dim
        if float(config["query_pre_attn_scalar"]) != float(scale_of):
            raise ArchitectureError(
                f"query_pre_attn_scalar {config['query_pre_attn_scalar']}: llama.cpp's {self.gguf_arch} scales q.k "
                f"by 1/sqrt({scale_of}) at {self.n_layer} layers, which a GGUF cannot change"
            )
        self.attention_scale = float(config["query_pre_attn_scalar"]) ** -0.5
        self.attn_softcap: float | None = self._softcap("attn_logit_softcapping", required=True)
        self.final_softcap = self._softcap("final_logit_softcapping", required=True)

    def _softcap(self, key: str, required: bool) -> float | None:
        value = self.config.get(key)
        if not value and required:
            raise ArchitectureError(
                f"config.json's {key} is {value}, but llama.cpp's {self.gguf_arch} always soft-caps"
            )
        return float(value) if value else None

    def _pattern(self, every: int) -> list[str]:
        """HF's and llama.cpp's default: every `every`-th layer full, the others sliding."""
        return [SLIDING if (i + 1) % every else FULL for i in range(self.n_layer)]

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name == "lm_head.weight":
            if not self.tied_embeddings:
                raise ArchitectureError(
                    f"llama.cpp's {self.gguf_arch} takes the output projection from the embeddings; "
                    "an untied lm_head.weight cannot be kept"
                )
            return None
        return super().gguf_name(hf_name)

    def to_gguf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        return array + np.asarray(1, dtype=array.dtype) if gguf_name.endswith("norm.weight") else array

    def to_hf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        return array - np.asarray(1, dtype=array.dtype) if gguf_name.endswith("norm.weight") else array

    def local_rope_theta(self) -> float:
        return self.rope_theta

    def layer_attention(self) -> list[LayerAttention]:
        full = super().layer_attention()[0]
        return [
            LayerAttention(self.local_rope_theta(), 1.0, self.window, self.attention_scale, self.attn_softcap)
            if kind == SLIDING
            else LayerAttention(full.rope_theta, full.rope_factor, None, self.attention_scale, self.attn_softcap)
            for kind in self.layer_types
        ]

    @classmethod
    def tokenizer_overrides(
        cls, config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        return {"add_space_prefix": False}

    def metadata(self) -> dict[str, Any]:
        """As llama.cpp's Gemma2Model writes them; the RoPE base only where it is not llama.cpp's
        default 10000 (the converter leaves it out, llama.cpp then assumes 10000)."""
        arch = self.gguf_arch
        keys = super().metadata()
        if self.rope_theta == 10000.0:
            del keys[f"{arch}.rope.freq_base"]
        keys[f"{arch}.attention.key_length"] = self.head_dim
        keys[f"{arch}.attention.value_length"] = self.head_dim
        keys[f"{arch}.attn_logit_softcapping"] = self.attn_softcap
        keys[f"{arch}.final_logit_softcapping"] = self.final_softcap
        keys[f"{arch}.attention.sliding_window"] = int(self.window or 0)
        keys.update(self._pattern_metadata())
        return keys

    def _pattern_metadata(self) -> dict[str, Any]:
        """Nothing when the layers follow llama.cpp's default pattern (as its converter writes),
        else the per-layer list of sliding layers that llama.cpp reads instead."""
        if self.layer_types == self._pattern(self.swa_pattern):
            return {}
        return {f"{self.gguf_arch}.attention.sliding_window_pattern": [kind == SLIDING for kind in self.layer_types]}

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        facts = super().gguf_facts(fields, tensor_names)
        if fields.get(f"{cls.gguf_arch}.final_logit_softcapping"):
            facts["logit soft-cap"] = f"{fields[f'{cls.gguf_arch}.final_logit_softcapping']:g}"
        return facts

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        arch = cls.gguf_arch
        config = super().config_from_gguf(fields, has_output)
        n_layer = config["num_hidden_layers"]
        window = fields.get(f"{arch}.attention.sliding_window", cls.gguf_default_window)
        # llama.cpp reads a per-layer list, or a period n (every n-th layer full, 0: all sliding)
        pattern = fields.get(f"{arch}.attention.sliding_window_pattern", cls.swa_pattern)
        if isinstance(pattern, int):
            pattern = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer)]
        sliding = [bool(flag) for flag in pattern]
        if not window:
            sliding = [False] * n_layer
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        wide = n_layer == cls.wide_scale_layers
        config.update(
            head_dim=head_dim,
            hidden_activation="gelu_pytorch_tanh",
            hidden_act="gelu_pytorch_tanh",
            query_pre_attn_scalar=config["hidden_size"] // config["num_attention_heads"] if wide else head_dim,
            sliding_window=int(window) if window else None,
            layer_types=[SLIDING if flag else FULL for flag in sliding],
            # llama.cpp's defaults where the file has no soft-caps
            final_logit_softcapping=fields.get(
                f"{arch}.final_logit_softcapping", cls.config_defaults["final_logit_softcapping"]
            ),
            attn_logit_softcapping=fields.get(
                f"{arch}.attn_logit_softcapping", cls.config_defaults["attn_logit_softcapping"]
            ),
        )
        return config


ARCHITECTURE = Gemma2
