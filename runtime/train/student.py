"""The decoders slim supports (every family in slim.models) as a torch module, for training.

Parameter names are the Hugging Face checkpoint's own (model.layers.N.self_attn.q_proj.weight, ...),
so a checkpoint loads by name and saves back unchanged. The maths follows transformers: RMSNorm in
float32, rotary embeddings in HF's half-split layout (the GGUF's interleaved layout is the Q/K row
permutation slim.models undoes on export), grouped KV heads, SwiGLU, tied embeddings, and what a
family's module in slim.models declares (Qwen2's q/k/v biases, Qwen3's Q/K norms, SmolLM3's layers
without RoPE, Gemma's (1 + w) norms, scaled embeddings, norms around attention and the FFN, GELU gate,
per-layer sliding windows, RoPE bases and attention scale, soft-capping, Phi-3's fused qkv_proj and
gate_up_proj, partial rotary and LongRoPE, Granite's multipliers, OLMo 2's norms after attention and
FFN, a mixture of experts' router, top-k routing and shared expert). Tested against transformers on a
random checkpoint of every family (tests/test_architectures.py).

torch is optional (`pip install 'slim-llm[train]'`): only the training modules import this one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slim import models
from slim.runtime.files import atomic_folder
from slim.runtime.formats.checkpoint import Checkpoint, write_safetensors

# Files copied from the source folder so the result is a complete model (tokenizer, template).
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# The norms a block may have, by llama.cpp's name: before and after attention, before and after the FFN.
_BLOCK_NORMS = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
# torch.nn.utils.parametrize keeps a parametrized weight as <module>.parametrizations.weight.original
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")


class RMSNorm(nn.Module):
    """Scales by (offset + weight): Gemma stores its norms as w around 0 and applies 1 + w."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), 1.0 - offset))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * (self.weight + self.offset) if self.offset else self.weight * normed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dimensions of each head; the rest pass (partial rotary)."""
    dim = cos.shape[-1]
    rotated = x[..., :dim] * cos + rotate_half(x[..., :dim]) * sin
    return rotated if dim == x.shape[-1] else torch.cat((rotated, x[..., dim:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: models.DecoderArchitecture, how: models.LayerAttention):
        super().__init__()
        self.n_head, self.n_head_kv, self.head_dim = arch.n_head, arch.n_head_kv, arch.head_dim
        self.how = how
        bias = arch.attention_bias
        self.widths = [self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.n_head_kv * self.head_dim]
        if "self_attn.qkv_proj.weight" in arch.layer_tensors:  # Q, K and V rows in one matrix
            self.qkv_proj = nn.Linear(arch.hidden, sum(self.widths), bias=bias)
        else:
            self.q_proj = nn.Linear(arch.hidden, self.widths[0], bias=bias)
            self.k_proj = nn.Linear(arch.hidden, self.widths[1], bias=bias)
            self.v_proj = nn.Linear(arch.hidden, self.widths[2], bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, arch.hidden, bias=False)
        self.norm_over_heads = arch.qk_norm_over_heads
        if arch.qk_norm:
            q_size, k_size = (self.widths[0], self.widths[1]) if self.norm_over_heads else (self.head_dim,) * 2
            self.q_norm = RMSNorm(q_size, arch.rms_eps, arch.norm_offset)
            self.k_norm = RMSNorm(k_size, arch.rms_eps, arch.norm_offset)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, length, n, self.head_dim).transpose(1, 2)

        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm") and self.norm_over_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = heads(q, self.n_head), heads(k, self.n_head_kv), heads(v, self.n_head_kv)
        if hasattr(self, "q_norm") and not self.norm_over_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(self.attend(q, k, v).transpose(1, 2).reshape(batch, length, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention, within the sliding window and soft-capped where the layer says so."""
        how, length = self.how, q.shape[2]
        if how.softcap is None and how.window is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=how.scale, enable_gqa=self.n_head != self.n_head_kv
            )
        positions = torch.arange(length)
        distance = positions[:, None] - positions[None, :]
        allowed = distance >= 0
        if how.window is not None:
            allowed &= distance < how.window
        if how.softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=how.scale, enable_gqa=self.n_head != self.n_head_kv
            )
        group = self.n_head // self.n_head_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.tanh(q @ k.transpose(2, 3) * how.scale / how.softcap) * how.softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class MLP(nn.Module):
    """The gated FFN; `width` other than the config's for a mixture's shared expert."""

    def __init__(self, arch: models.DecoderArchitecture, width: int | None = None):
        super().__init__()
        ffn = width or arch.ffn
        if "mlp.gate_up_proj.weight" in arch.layer_tensors:  # the gate's rows, then up's, in one matrix
            self.gate_up_proj = nn.Linear(arch.hidden, 2 * ffn, bias=False)
        else:
            self.gate_proj = nn.Linear(arch.hidden, ffn, bias=False)
            self.up_proj = nn.Linear(arch.hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, arch.hidden, bias=False)
        self.activation = arch.ffn_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(gate)
        return self.down_proj(gate * up)


class Expert(nn.Module):
    """One expert of a mixture: a SwiGLU FFN under the family's names (gate_proj or w1, ...)."""

    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.roles = {}  # GGUF role (gate, up, down) -> the checkpoint's module name
        for hf_name, gguf_name in arch.expert_tensors.items():
            name, role = hf_name.removesuffix(".weight"), gguf_name.removeprefix("ffn_").partition("_exps")[0]
            shape = (arch.hidden, arch.expert_ffn) if role == "down" else (arch.expert_ffn, arch.hidden)
            self.add_module(name, nn.Linear(shape[1], shape[0], bias=False))
            self.roles[role] = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (self.get_submodule(self.roles[role]) for role in ("gate", "up", "down"))
        return down(F.silu(gate(x)) * up(x))


class MixtureOfExperts(nn.Module):
    """The router (`gate`) and the experts: each token goes to the n_expert_used experts of highest
    softmax probability, whose outputs are summed weighted by those probabilities renormalised to 1."""

    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.gate = nn.Linear(arch.hidden, arch.n_expert, bias=False)
        self.experts = nn.ModuleList(Expert(arch) for _ in range(arch.n_expert))
        self.top_k = arch.n_expert_used
        self.normalize = isinstance(arch, models.MixtureOfExperts) and arch.normalizes_top_k
        if arch.shared_expert_ffn:  # Qwen2-MoE: every token also runs through one expert, gated by a sigmoid
            self.shared_expert = MLP(arch, arch.shared_expert_ffn)
            self.shared_expert_gate = nn.Linear(arch.hidden, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token (rows of x): the chosen experts' weights and indices, (tokens, top_k) each."""
        probabilities = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True) if self.normalize else weights), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(rows)
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts):
            tokens, slot = torch.where(chosen == e)
            if len(tokens):
                out.index_add_(0, tokens, expert(rows[tokens]) * weights[tokens, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return out.reshape(x.shape)


class Layer(nn.Module):
    """Attention then FFN, each with the norms the family has around it: before (llama.cpp's
    attn_norm, ffn_norm) and after (post_attention_norm, post_ffw_norm; Gemma, OLMo 2), under the
    checkpoint's names."""

    def __init__(self, arch: models.DecoderArchitecture, how: models.LayerAttention):
        super().__init__()
        self.norm_names: dict[str, str] = {}  # llama.cpp's role -> the checkpoint's module name
        for hf_name, gguf_name in arch.layer_tensors.items():
            role, name = gguf_name.removesuffix(".weight"), hf_name.removesuffix(".weight")
            if role in _BLOCK_NORMS:
                self.add_module(name, RMSNorm(arch.hidden, arch.rms_eps, arch.norm_offset))
                self.norm_names[role] = name
        self.self_attn = Attention(arch, how)
        # the FFN under the checkpoint's name: mlp, or the module that holds the experts and their router
        self.ffn_name = arch.experts_module.rpartition(".")[0] if arch.n_expert else "mlp"
        self.add_module(self.ffn_name, MixtureOfExperts(arch) if arch.n_expert else MLP(arch))
        self.residual_scale = arch.residual_scale

    def norm(self, role: str, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_names.get(role)
        return x if name is None else self.get_submodule(name)(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        attention = self.norm("post_attention_norm", self.self_attn(self.norm("attn_norm", x), rope))
        x = x + attention * self.residual_scale
        ffn = self.get_submodule(self.ffn_name)
        return x + self.norm("post_ffw_norm", ffn(self.norm("ffn_norm", x))) * self.residual_scale


class Body(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden)
        self.layers = nn.ModuleList(Layer(arch, how) for how in arch.layer_attention())
        self.norm = RMSNorm(arch.hidden, arch.rms_eps, arch.norm_offset)


class Decoder(nn.Module):
    """A causal LM: token ids (batch, length) -> logits (batch, length, vocab)."""

    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        arch.metadata()  # raises for a RoPE scaling slim does not support
        self.arch = arch
        self.model = Body(arch)
        # Tied embeddings have no lm_head of their own: the output projection reads embed_tokens.weight
        # (through any parametrization on it, such as QAT's rounding).
        self.lm_head = None if arch.tied_embeddings else nn.Linear(arch.hidden, arch.vocab_size, bias=False)
        self.attention = arch.layer_attention()
        # transformers multiplies the embeddings by sqrt(hidden) rounded to the weights' dtype (Gemma),
        # or by Granite's multiplier
        scale = arch.hidden**0.5 if arch.scale_embeddings else arch.embedding_scale
        self.embed_scale = None if scale == 1.0 else torch.tensor(scale, dtype=torch.float32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        ropes: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}

        def rope(how: models.LayerAttention) -> tuple[torch.Tensor, torch.Tensor] | None:
            if how.rope_theta is None:
                return None
            key = (how.rope_theta, how.rope_factor)
            if key not in ropes:
                positions = torch.arange(length, dtype=torch.float32) / how.rope_factor
                angles = torch.outer(positions, rope_inverse_frequencies(self.arch, how.rope_theta, length))
                angles = torch.cat((angles, angles), dim=-1)
                scale = self.arch.rope_attention_factor()
                ropes[key] = angles.cos() * scale, angles.sin() * scale
            return ropes[key]

        x = self.model.embed_tokens(tokens)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for layer, how in zip(self.model.layers, self.attention, strict=True):
            x = layer(x, rope(how))
        x = self.model.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.model.embed_tokens.weight)
        if self.arch.logit_scale != 1.0:
            logits = logits / self.arch.logit_scale
        if self.arch.final_softcap:
            logits = torch.tanh(logits / self.arch.final_softcap) * self.arch.final_softcap
        return logits

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The weights under their checkpoint names, as the forward pass uses them: a parametrized
        weight (slim.runtime.train.qat) gives its parametrized value."""
        state = {}
        for key, _ in self.named_parameters():
            name = _PARAMETRIZED.sub(r".\1", key)
            module, _, attr = name.rpartition(".")
            state[name] = getattr(self.get_submodule(module), attr)
        return state


def rope_inverse_frequencies(arch: models.DecoderArchitecture, theta: float, length: int) -> torch.Tensor:
    """theta^(-2i/d) per rotated pair (d: the rotated dimensions) for a sequence of `length` tokens;
    the family's per-frequency factors (Llama 3.1's rope_freqs, LongRoPE's short or long ones) divide them."""
    exponents = torch.arange(0, arch.rope_dim, 2, dtype=torch.int64).float() / arch.rope_dim
    factors = arch.rope_factors(length)
    if factors is None:
        return 1.0 / (theta**exponents)
    return 1.0 / (torch.from_numpy(factors) * theta**exponents)


def load(directory: str | os.PathLike[str]) -> Decoder:
    """A Hugging Face checkpoint folder as a float32 Decoder (every tensor must be present)."""
    checkpoint = Checkpoint(Path(directory))
    arch = models.for_hf_config(checkpoint.config)
    model = Decoder(arch)
    expected = model.hf_state()
    found = {}
    for ref in checkpoint:
        gguf_name = arch.gguf_name(ref.name)  # raises for a tensor the architecture does not have
        # A language model inside a multimodal checkpoint (Gemma 3) keeps its tensors under another prefix.
        name = ref.name if ref.name in expected or gguf_name is None else arch.hf_name(gguf_name)
        if name in expected:
            found[name] = torch.from_numpy(np.array(ref.load(), dtype=np.float32))
        elif gguf_name is not None:
            raise models.ArchitectureError(f"{ref.name} does not fit a {arch.gguf_arch} of this config")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise models.ArchitectureError(f"{directory} lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, tensor in found.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise models.ArchitectureError(
                f"{name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(found, strict=False)
    return model


def save(model: Decoder, source: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Write `model` as an F32 HF checkpoint folder: config and tokenizer files from `source`
    (the checkpoint it was loaded from), weights from the model. Assembled under a temporary
    name and renamed into place."""
    source, output = Path(source), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output, replace=True) as partial:
        config = dict(model.arch.config, torch_dtype="float32")
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _SIDE_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, partial / name)
        state = model.hf_state()
        write_safetensors(
            partial / "model.safetensors",
            ((name, tensor.detach().numpy()) for name, tensor in state.items()),
            {name: (tuple(tensor.shape), "F32") for name, tensor in state.items()},
        )
