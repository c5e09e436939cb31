"""What the Llama-family architectures share: hyperparameters, tensor names and their transforms.

An architecture module subclasses `DecoderArchitecture` and sets a few class attributes; the
conversion pipeline (slim.runtime.pipeline.convert) and export (slim.runtime.pipeline.export) only talk to this
interface, so adding an architecture touches one file in models/.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

# HF name (inside model.layers.N.) -> GGUF name (inside blk.N.), per llama.cpp's tensor_mapping.py.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Checkpoint entries that carry no weights llama.cpp needs (it recomputes RoPE frequencies).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class ArchitectureError(ValueError):
    """The checkpoint does not fit the architecture it claims."""


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends, as the torch student runs it: the RoPE base (None: no RoPE) and the
    linear RoPE factor positions are divided by, the sliding window in tokens (None: the whole
    context), the scale of q.k and its tanh soft-cap (None: none)."""

    rope_theta: float | None
    rope_factor: float
    window: int | None
    scale: float
    softcap: float | None


class DecoderArchitecture:
    """A Llama-style decoder: RMSNorm, rotary attention with grouped KV heads, gated FFN.

    A family says what sets it apart in class attributes (read by the converter, export, the torch
    student in slim.runtime.train.student and pruning) and, where its config has more to say, by
    overriding the methods below.
    """

    #: The family's name in summaries and `slim show` ("Qwen3").
    family: ClassVar[str]
    gguf_arch: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    hf_model_type: ClassVar[str]
    #: HF name inside model.layers.N. -> GGUF name inside blk.N.; the model-wide ones.
    layer_tensors: ClassVar[Mapping[str, str]] = LAYER_TENSORS
    global_tensors: ClassVar[Mapping[str, str]] = GLOBAL_TENSORS
    #: llama.cpp's `llama` rotates adjacent pairs, HF rotates halves: Q and K rows are permuted.
    permute_qk: ClassVar[bool] = False
    #: Qwen2 has q/k/v biases.
    attention_bias: ClassVar[bool] = False
    #: Qwen3 normalises each head of Q and K (RMSNorm over head_dim) before RoPE.
    qk_norm: ClassVar[bool] = False
    #: OLMo 2's Q/K norms span all heads at once (one RMSNorm over the projection, before the split).
    qk_norm_over_heads: ClassVar[bool] = False
    #: Whether llama.cpp runs this family's sliding-window layers (Gemma); elsewhere a config that
    #: asks for them is refused, since llama.cpp would attend to the whole context instead.
    sliding_window: ClassVar[bool] = False
    #: config.json lists that hold one entry per layer; pruning a layer drops its entry.
    per_layer_config: ClassVar[tuple[str, ...]] = ("layer_types",)
    #: Gemma: RMSNorm scales by (norm_offset + w), the embeddings are multiplied by sqrt(hidden),
    #: and the FFN gate is GELU (tanh). (Norms after attention and the FFN are named in layer_tensors.)
    norm_offset: ClassVar[float] = 0.0
    scale_embeddings: ClassVar[bool] = False
    ffn_activation: ClassVar[str] = "silu"
    #: tanh soft-cap of the output logits (Gemma 2), from the config.
    final_softcap: float | None = None
    #: Mixture-of-experts families (MixtureOfExperts below): the HF module under model.layers.N. that
    #: holds one module per expert, and each expert's tensors (HF name after the expert's index) ->
    #: the GGUF tensor that stacks that tensor of every expert.
    experts_module: ClassVar[str] = ""
    expert_tensors: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: dict[str, Any]):
        def need(*keys: str) -> Any:
            for key in keys:
                if key in config:
                    return config[key]
            raise ArchitectureError(f"config.json has no {keys[0]!r}, which {self.gguf_arch} needs")

        self.config = config
        self.n_layer = int(need("num_hidden_layers"))
        self.hidden = int(need("hidden_size"))
        self.ffn = int(need("intermediate_size"))
        self.n_head = int(need("num_attention_heads"))
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.n_head)
        #: Dimensions of each head that RoPE rotates (the first ones; Phi-4-mini rotates 3/4).
        self.rope_dim = self.head_dim
        #: Granite's multipliers: of the embeddings, of Q.K (instead of 1/sqrt(head_dim)), of each
        #: block's attention and FFN output before the residual sum, and the divisor of the logits.
        self.embedding_scale = 1.0
        self.attention_scale = self.head_dim**-0.5
        self.residual_scale = 1.0
        self.logit_scale = 1.0
        self.vocab_size = int(need("vocab_size"))
        self.context_length = int(config.get("max_position_embeddings", 2048))
        self.rms_eps = float(config.get("rms_norm_eps", 1e-6))
        # transformers v5 moved rope settings into rope_parameters; older configs use rope_theta/rope_scaling.
        self.rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        self.rope_theta = float(self.rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.tied_embeddings = bool(config.get("tie_word_embeddings", False))
        #: Experts per layer, those each token is routed to, and each expert's FFN width (0: dense).
        self.n_expert = 0
        self.n_expert_used = 0
        self.expert_ffn = 0
        self.shared_expert_ffn = 0  # the width of a shared expert every token runs through (Qwen2-MoE)
        asks_sliding = config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ())
        if asks_sliding and not self.sliding_window:
            raise ArchitectureError(
                f"config.json asks for sliding-window attention, which llama.cpp's {self.gguf_arch} does not run; "
                "set use_sliding_window to false if the model was trained without it"
            )

    # ---- HF -> GGUF ---------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a checkpoint tensor, or None for one llama.cpp does not use."""
        if IGNORED.search(hf_name) or (self.tied_embeddings and hf_name == "lm_head.weight"):
            return None
        if hf_name in self.global_tensors:
            return self.global_tensors[hf_name]
        slot = self.expert_slot(hf_name)
        if slot is not None:
            return slot[0]
        match = _LAYER.match(hf_name)
        if match and match.group(2) in self.layer_tensors:
            suffix = self.layer_tensors[match.group(2)]
            if suffix.endswith(".bias") and not self.attention_bias:
                raise ArchitectureError(f"{hf_name}: {self.gguf_arch} has no attention biases")
            return f"blk.{match.group(1)}.{suffix}"
        raise ArchitectureError(f"unexpected tensor {hf_name!r} for architecture {self.gguf_arch}")

    def expert_slot(self, hf_name: str) -> tuple[str, int] | None:
        """For one expert's tensor (model.layers.N.<experts_module>.E.<name>): the GGUF tensor that
        stacks it with the other experts' and its index E there; None for every other tensor."""
        return None

    def required_tensors(self) -> list[str]:
        """The GGUF tensors llama.cpp cannot load the model without (the output projection is
        optional: llama.cpp falls back to the embeddings)."""
        per_layer = [name for name in self.layer_tensors.values() if self.attention_bias or not name.endswith(".bias")]
        per_layer += list(self.expert_tensors.values())
        model_wide = [name for name in self.global_tensors.values() if name != "output.weight"]
        return model_wide + [f"blk.{i}.{name}" for i in range(self.n_layer) for name in per_layer]

    def rope_layers(self) -> list[bool]:
        """Per layer, whether attention rotates Q and K (SmolLM3 leaves every fourth layer without)."""
        return [True] * self.n_layer

    def layer_attention(self) -> list[LayerAttention]:
        """Per layer, how attention runs (for the torch student; Gemma's sliding layers differ)."""
        rope_type = self.rope.get("rope_type", self.rope.get("type"))
        factor = float(self.rope["factor"]) if rope_type == "linear" else 1.0
        return [
            LayerAttention(self.rope_theta if rotary else None, factor, None, self.attention_scale, None)
            for rotary in self.rope_layers()
        ]

    def rope_factors(self, length: int) -> np.ndarray | None:
        """What divides each rotated pair's frequency in transformers' forward pass over `length`
        tokens (Llama 3's rope_freqs; LongRoPE's short or long factors), None when nothing does."""
        return self.extra_tensors().get("rope_freqs.weight")

    def rope_attention_factor(self) -> float:
        """What transformers multiplies RoPE's cos and sin by (LongRoPE's attention factor)."""
        return 1.0

    @classmethod
    def tokenizer_overrides(
        cls, config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """tokenizer.* settings the family's llama.cpp converter decides itself, over what the
        tokenizer files say (fields of slim.runtime.formats.tokenizer.TokenizerSpec)."""
        return {}

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        """What a user should know about a GGUF of this family beyond its sizes (`slim show`)."""
        arch = cls.gguf_arch
        facts = {"family": cls.family}
        scaling = fields.get(f"{arch}.rope.scaling.type")
        if "rope_freqs.weight" in tensor_names:
            facts["rope scaling"] = "llama3 (per-frequency factors)"
        elif scaling not in (None, "none"):
            facts["rope scaling"] = f"{scaling} x{fields.get(f'{arch}.rope.scaling.factor', '?')}"
        if f"{arch}.rope.freq_base" in fields:
            facts["rope base"] = f"{fields[f'{arch}.rope.freq_base']:g}"
        if f"{arch}.attention.sliding_window" in fields:
            facts["sliding window"] = f"{fields[f'{arch}.attention.sliding_window']} tokens"
        heads, width = fields.get(f"{arch}.attention.head_count"), fields.get(f"{arch}.embedding_length")
        head_dim = fields.get(f"{arch}.attention.key_length")
        if head_dim is not None and heads and width and head_dim != width // heads:
            facts["head size"] = f"{head_dim} (not {width} / {heads})"
        facts["embeddings"] = "separate output" if "output.weight" in tensor_names else "tied to the output"
        return facts

    def used_gguf_name(self, hf_name: str) -> str:
        """The GGUF name of a tensor llama.cpp must use (a block's matrices); ArchitectureError otherwise."""
        name = self.gguf_name(hf_name)
        if name is None:
            raise ArchitectureError(f"{hf_name} has no GGUF name: llama.cpp does not use it")
        return name

    def gguf_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """HF name -> shape, renamed to GGUF name -> shape and without the tensors llama.cpp does not use
        (experts' tensors stacked: (experts, rows, columns))."""
        found: dict[str, tuple[int, ...]] = {}
        for hf_name, shape in shapes.items():
            gguf_name = self.gguf_name(hf_name)
            if gguf_name is None:
                continue
            if self.expert_slot(hf_name) is not None:
                shape = (found[gguf_name][0] + 1 if gguf_name in found else 1, *shape)
            found[gguf_name] = shape
        return found

    def to_gguf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """Transform a checkpoint tensor into llama.cpp's layout (the Q/K RoPE permutation)."""
        heads = self._qk_heads(gguf_name)
        if heads is None:
            return array
        return (
            array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        )

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3.1's RoPE factors);
        export turns them back into config (config_from_gguf)."""
        if self.rope.get("rope_type", self.rope.get("type", "")) != "llama3":
            return {}
        return {"rope_freqs.weight": llama3_rope_factors(self.rope, self.rope_theta, self.head_dim)}

    def metadata(self) -> dict[str, Any]:
        """The `{arch}.*` GGUF keys, as llama.cpp's converter (its TextModel) writes them."""
        arch = self.gguf_arch
        keys: dict[str, Any] = {
            f"{arch}.context_length": self.context_length,
            f"{arch}.embedding_length": self.hidden,
            f"{arch}.block_count": self.n_layer,
            f"{arch}.feed_forward_length": self.ffn,
            f"{arch}.attention.head_count": self.n_head,
            f"{arch}.attention.head_count_kv": self.n_head_kv,
            f"{arch}.rope.freq_base": self.rope_theta,
            f"{arch}.attention.layer_norm_rms_epsilon": self.rms_eps,
        }
        if self.config.get("head_dim") is not None:  # llama.cpp's converter writes it whenever config.json has it
            keys[f"{arch}.attention.key_length"] = self.head_dim
            keys[f"{arch}.attention.value_length"] = self.head_dim
        rope_type = self.rope.get("rope_type", self.rope.get("type"))
        if rope_type == "linear" and "factor" in self.rope:
            keys[f"{arch}.rope.scaling.type"] = "linear"
            keys[f"{arch}.rope.scaling.factor"] = float(self.rope["factor"])
        elif rope_type not in (None, "default", "llama3"):
            raise ArchitectureError(f"RoPE scaling {rope_type!r} is not supported yet for {arch}")
        return keys

    # ---- GGUF -> HF ---------------------------------------------------------------------------

    def hf_name(self, gguf_name: str) -> str:
        for hf, gguf_ in self.global_tensors.items():
            if gguf_ == gguf_name:
                return hf
        match = _BLOCK.match(gguf_name)
        if match:
            for hf, gguf_ in self.layer_tensors.items():
                if gguf_ == match.group(2):
                    return f"model.layers.{match.group(1)}.{hf}"
        raise ArchitectureError(f"GGUF tensor {gguf_name!r} has no Hugging Face name in {self.gguf_arch}")

    def hf_layout(self, gguf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """The checkpoint tensors a GGUF tensor of this (numpy-order) shape holds: one, or one per
        expert for a stack of experts' tensors."""
        return [(self.hf_name(gguf_name), shape)]

    def hf_tensors(self, gguf_name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The checkpoint tensors a GGUF tensor holds, in the checkpoint's layout (`hf_layout`'s order)."""
        return [(self.hf_name(gguf_name), self.to_hf(gguf_name, array))]

    def to_hf(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """Undo `to_gguf`."""
        heads = self._qk_heads(gguf_name)
        if heads is None:
            return array
        return (
            array.reshape(heads, array.shape[0] // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        )

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        """A transformers config.json for a GGUF of this architecture: `fields` holds its metadata and,
        under their names, the arrays of its model-wide tensors that have no checkpoint name (RoPE factors)."""
        arch = cls.gguf_arch

        def get(key: str, default: Any = None) -> Any:
            return fields.get(f"{arch}.{key}", default)

        n_head = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        config = {
            "architectures": [cls.hf_architectures[0]],
            "model_type": cls.hf_model_type,
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
            "max_position_embeddings": int(get("context_length", 2048)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "vocab_size": int(get("vocab_size", len(fields.get("tokenizer.ggml.tokens", [])))),
            "tie_word_embeddings": not has_output,
            "hidden_act": "silu",
            "attention_bias": cls.attention_bias,
            "torch_dtype": "float32",
        }
        if get("attention.key_length") is not None:
            config["head_dim"] = int(get("attention.key_length"))
        for key, hf_key in (
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ):
            if key in fields:
                config[hf_key] = int(fields[key])
        # Said even when the GGUF has none: a family's default (SmolLM3's, Phi-3's) may lie outside the vocabulary.
        config["pad_token_id"] = fields.get("tokenizer.ggml.padding_token_id")
        if get("rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        factors = fields.get("rope_freqs.weight")
        if factors is not None:
            head_dim = int(get("attention.key_length", hidden // n_head))
            theta = float(get("rope.freq_base", 10000.0))
            config["rope_scaling"] = llama3_rope_from_factors(factors, theta, head_dim)
        return config

    def _qk_heads(self, gguf_name: str) -> int | None:
        if not self.permute_qk:
            return None
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return self.n_head
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return self.n_head_kv
        return None


class MixtureOfExperts(DecoderArchitecture):
    """A decoder whose FFN is a set of experts and a router (Qwen3-MoE, Mixtral, Qwen2-MoE): per token
    the router's softmax picks the `n_expert_used` highest-scoring experts, whose outputs are summed
    weighted by those probabilities, renormalised to 1 where the family does (llama.cpp's
    build_moe_ffn with norm_w); a family with a shared expert adds its output, gated per token.

    The checkpoint keeps each expert's matrices apart (model.layers.N.<experts_module>.E.<name>, as
    the hub's checkpoints and transformers' save_pretrained write them); llama.cpp stacks them into
    one 3-D tensor per layer and matrix (ffn_gate_exps, ffn_up_exps, ffn_down_exps), expert E at
    index E, and keeps the router (ffn_gate_inp) in F32.
    """

    #: Whether the chosen experts' probabilities are renormalised to sum to 1 (llama.cpp's norm_w).
    normalizes_top_k: ClassVar[bool] = True
    #: config.json's names for the expert count (the first is the one export writes; transformers 5
    #: renamed some), and for an expert's FFN width.
    expert_count_keys: ClassVar[tuple[str, ...]]
    expert_ffn_key: ClassVar[str] = "intermediate_size"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        count_key = next((key for key in self.expert_count_keys if config.get(key)), None)
        if count_key is None or "num_experts_per_tok" not in config:
            raise ArchitectureError(
                f"config.json needs {self.expert_count_keys[0]!r} and 'num_experts_per_tok' for a {self.family} model"
            )
        self.n_expert = int(config[count_key])
        self.n_expert_used = int(config["num_experts_per_tok"])
        self.expert_ffn = int(config.get(self.expert_ffn_key) or self.ffn)
        if not 1 <= self.n_expert_used <= self.n_expert:
            raise ArchitectureError(
                f"num_experts_per_tok {self.n_expert_used} must be between 1 and the {self.n_expert} experts"
            )
        self._expert = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(self.experts_module)}\.(\d+)\.(.+)$")
        self._stacked = {gguf_: hf for hf, gguf_ in self.expert_tensors.items()}

    def expert_slot(self, hf_name: str) -> tuple[str, int] | None:
        match = self._expert.match(hf_name)
        if match is None:
            return None
        layer, expert, tensor = int(match.group(1)), int(match.group(2)), match.group(3)
        if tensor not in self.expert_tensors or expert >= self.n_expert or layer >= self.n_layer:
            raise ArchitectureError(
                f"unexpected tensor {hf_name!r}: a {self.family} of this config has {self.n_layer} layers of "
                f"{self.n_expert} experts, each with {', '.join(self.expert_tensors)}"
            )
        return f"blk.{layer}.{self.expert_tensors[tensor]}", expert

    def metadata(self) -> dict[str, Any]:
        arch = self.gguf_arch
        return {
            **super().metadata(),
            f"{arch}.expert_count": self.n_expert,
            f"{arch}.expert_used_count": self.n_expert_used,
        }

    def _expert_names(self, gguf_name: str) -> list[str] | None:
        match = _BLOCK.match(gguf_name)
        if match is None or match.group(2) not in self._stacked:
            return None
        prefix = f"model.layers.{match.group(1)}.{self.experts_module}"
        return [f"{prefix}.{e}.{self._stacked[match.group(2)]}" for e in range(self.n_expert)]

    def hf_layout(self, gguf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        names = self._expert_names(gguf_name)
        if names is None:
            return super().hf_layout(gguf_name, shape)
        return [(name, tuple(shape[1:])) for name in names]

    def hf_tensors(self, gguf_name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        names = self._expert_names(gguf_name)
        if names is None:
            return super().hf_tensors(gguf_name, array)
        return [(name, array[e]) for e, name in enumerate(names)]

    @classmethod
    def config_from_gguf(cls, fields: dict[str, Any], has_output: bool) -> dict[str, Any]:
        arch = cls.gguf_arch
        config = super().config_from_gguf(fields, has_output)
        config[cls.expert_count_keys[0]] = int(fields[f"{arch}.expert_count"])
        config["num_experts_per_tok"] = int(fields[f"{arch}.expert_used_count"])
        return config

    @classmethod
    def gguf_facts(cls, fields: Mapping[str, Any], tensor_names: Collection[str]) -> dict[str, str]:
        arch = cls.gguf_arch
        facts = super().gguf_facts(fields, tensor_names)
        facts["experts"] = f"{fields.get(f'{arch}.expert_count')}, {fields.get(f'{arch}.expert_used_count')} per token"
        return facts


def llama3_rope_factors(rope: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors (llama.cpp's rope_freqs tensor).

    Float32 arithmetic as llama.cpp's converter does it in torch, to the bit: the frequencies' power
    in float64 rounded once, and `scalar / tensor` as the reciprocal of the tensor times the scalar
    (torch's __rtruediv__)."""
    f32 = np.float32

    def scalar_over(scalar: float, value: np.float32) -> np.float32:
        return (f32(1) / value) * f32(scalar)

    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = f32(1) / (theta ** exponents.astype(np.float64)).astype(f32)
    factors = []
    for freq in freqs:
        wavelength = scalar_over(2 * math.pi, freq)
        if wavelength < old_context / high:
            factors.append(f32(1))
        elif wavelength > old_context / low:
            factors.append(f32(factor))
        else:
            smooth = (scalar_over(old_context, wavelength) - f32(low)) / f32(high - low)
            factors.append(scalar_over(1, (f32(1) - smooth) / f32(factor) + smooth))
    return np.array(factors, dtype=f32)


# The values Llama 3.x configs use, searched when export recovers the scaling from rope_freqs.
_LLAMA3_HIGH_FACTORS = (4.0, 2.0, 8.0)
_LLAMA3_CONTEXTS = tuple(2**n for n in range(5, 19))


def llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """The `llama3` rope_scaling whose factors are exactly `factors` (low_freq_factor 1, as every
    Llama 3.x ships; the factor is the largest divisor). The GGUF keeps only the factors, so the
    usual settings are tried in turn; ArchitectureError if none reproduces them bit for bit."""
    factor = float(np.max(factors))
    for high in _LLAMA3_HIGH_FACTORS:
        for context in _LLAMA3_CONTEXTS:
            rope = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": high,
                "original_max_position_embeddings": context,
            }
            if np.array_equal(llama3_rope_factors(rope, theta, head_dim), factors):
                return rope
    raise ArchitectureError(
        "the GGUF's rope_freqs tensor matches no llama3 RoPE scaling slim knows; it cannot be exported"
    )
