"""The decoders slim supports (Llama and Qwen2 families) as a torch module, for training.

Parameter names are the Hugging Face checkpoint's own (model.layers.N.self_attn.q_proj.weight, ...),
so a checkpoint loads by name and saves back unchanged. The maths follows transformers: RMSNorm in
float32, rotary embeddings in HF's half-split layout (the GGUF's interleaved layout is the Q/K row
permutation slim.models undoes on export), grouped KV heads, SwiGLU, tied embeddings, Qwen2's q/k/v
biases. Tested against transformers on a random checkpoint (tests/test_distill.py).

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
# torch.nn.utils.parametrize keeps a parametrized weight as <module>.parametrizations.weight.original
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.n_head, self.n_head_kv, self.head_dim = arch.n_head, arch.n_head_kv, arch.head_dim
        bias = arch.attention_bias
        self.q_proj = nn.Linear(arch.hidden, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(arch.hidden, self.n_head_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(arch.hidden, self.n_head_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, arch.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, length, n, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x), self.n_head)
        k = heads(self.k_proj(x), self.n_head_kv)
        v = heads(self.v_proj(x), self.n_head_kv)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_head_kv)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden, arch.rms_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden, arch.rms_eps)
        self.mlp = MLP(arch.hidden, arch.ffn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden)
        self.layers = nn.ModuleList(Layer(arch) for _ in range(arch.n_layer))
        self.norm = RMSNorm(arch.hidden, arch.rms_eps)


class Decoder(nn.Module):
    """A causal LM: token ids (batch, length) -> logits (batch, length, vocab)."""

    inv_freq: torch.Tensor

    def __init__(self, arch: models.DecoderArchitecture):
        super().__init__()
        self.arch = arch
        self.model = Body(arch)
        # Tied embeddings have no lm_head of their own: the output projection reads embed_tokens.weight
        # (through any parametrization on it, such as QAT's rounding).
        self.lm_head = None if arch.tied_embeddings else nn.Linear(arch.hidden, arch.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(arch), persistent=False)
        self.position_scale = _linear_rope_factor(arch)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], dtype=torch.float32) / self.position_scale
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.model.embed_tokens.weight)

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The weights under their checkpoint names, as the forward pass uses them: a parametrized
        weight (slim.runtime.train.qat) gives its parametrized value."""
        state = {}
        for key, _ in self.named_parameters():
            name = _PARAMETRIZED.sub(r".\1", key)
            module, _, attr = name.rpartition(".")
            state[name] = getattr(self.get_submodule(module), attr)
        return state


def rope_inverse_frequencies(arch: models.DecoderArchitecture) -> torch.Tensor:
    """theta^(-2i/d) per rotated pair; Llama 3.1's per-frequency factors (the rope_freqs tensor
    slim writes into the GGUF) divide them."""
    exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    factors = arch.extra_tensors().get("rope_freqs.weight")
    if factors is not None:
        inv_freq = inv_freq / torch.from_numpy(factors)
    return inv_freq


def _linear_rope_factor(arch: models.DecoderArchitecture) -> float:
    arch.metadata()  # raises for a RoPE scaling slim does not support
    kind = arch.rope.get("rope_type", arch.rope.get("type"))
    return float(arch.rope["factor"]) if kind == "linear" else 1.0


def load(directory: str | os.PathLike[str]) -> Decoder:
    """A Hugging Face checkpoint folder as a float32 Decoder (every tensor must be present)."""
    checkpoint = Checkpoint(Path(directory))
    arch = models.for_hf_config(checkpoint.config)
    model = Decoder(arch)
    expected = model.hf_state()
    found = {}
    for ref in checkpoint:
        if ref.name in expected:
            found[ref.name] = torch.from_numpy(np.array(ref.load(), dtype=np.float32))
        elif arch.gguf_name(ref.name) is not None:  # raises for a tensor the architecture does not have
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
