"""Which GGUF type each tensor gets, for each `--type`: llama.cpp's rules, restated.

Float types follow convert_hf_to_gguf.py (norms and 1-D tensors stay F32). Quantized types follow
llama-quantize (src/llama-quant.cpp, llama_tensor_get_type) run on a lossless GGUF: the mix picks a
base type and bumps a few sensitive tensors (output, attn_v, ffn_down) to more bits, then a tensor
whose row length does not fit the chosen block size falls back to a 32-weight type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gguf import LlamaFileType

from slim.kernels import QTYPES


@dataclass(frozen=True)
class Mix:
    name: str
    ftype: LlamaFileType  # llama.cpp's LLAMA_FTYPE, written as general.file_type
    base: str  # the GGML type most weights get


MIXES: dict[str, Mix] = {
    mix.name: mix
    for mix in (
        Mix("F32", LlamaFileType.ALL_F32, "F32"),
        Mix("F16", LlamaFileType.MOSTLY_F16, "F16"),
        Mix("BF16", LlamaFileType.MOSTLY_BF16, "BF16"),
        Mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
        Mix("Q4_0", LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
        Mix("Q4_1", LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
        Mix("Q5_0", LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
        Mix("Q5_1", LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
        Mix("Q2_K", LlamaFileType.MOSTLY_Q2_K, "Q2_K"),
        Mix("Q2_K_S", LlamaFileType.MOSTLY_Q2_K_S, "Q2_K"),
        Mix("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, "Q3_K"),
        Mix("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, "Q3_K"),
        Mix("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, "Q3_K"),
        Mix("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, "Q4_K"),
        Mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, "Q4_K"),
        Mix("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, "Q5_K"),
        Mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, "Q5_K"),
        Mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
        Mix("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL, "IQ4_NL"),
        Mix("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS"),
        Mix("TQ1_0", LlamaFileType.MOSTLY_TQ1_0, "TQ1_0"),
        Mix("TQ2_0", LlamaFileType.MOSTLY_TQ2_0, "TQ2_0"),
        Mix("IQ3_XXS", LlamaFileType.MOSTLY_IQ3_XXS, "IQ3_XXS"),
        Mix("IQ3_XS", LlamaFileType.MOSTLY_IQ3_XS, "IQ3_S"),
        Mix("IQ3_S", LlamaFileType.MOSTLY_IQ3_S, "IQ3_S"),
        Mix("IQ3_M", LlamaFileType.MOSTLY_IQ3_M, "IQ3_S"),
        Mix("IQ2_XXS", LlamaFileType.MOSTLY_IQ2_XXS, "IQ2_XXS"),
        Mix("IQ2_XS", LlamaFileType.MOSTLY_IQ2_XS, "IQ2_XS"),
        Mix("IQ2_S", LlamaFileType.MOSTLY_IQ2_S, "IQ2_XS"),
        Mix("IQ2_M", LlamaFileType.MOSTLY_IQ2_M, "IQ2_S"),
        Mix("IQ1_S", LlamaFileType.MOSTLY_IQ1_S, "IQ1_S"),
        Mix("IQ1_M", LlamaFileType.MOSTLY_IQ1_M, "IQ1_M"),
    )
}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}  # as llama-quantize reads them
FLOAT_MIXES = ("F32", "F16", "BF16")

# A tensor that does not fit a 256-weight block falls back to this 32-weight type (tensor_type_fallback).
_FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
    **{lattice: "IQ4_NL" for lattice in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")},
}
# Types llama-quantize refuses to write without an importance matrix (tensor_requires_imatrix), but
# for the embeddings and the output; Q2_K is one of them in a Q2_K_S file only.
_NEED_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
# The mixes of llama-quantize's own branch of rules for the 1- and 2-bit lattices.
_VERY_LOW_BIT = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def mix(name: str) -> Mix:
    """The mix for a --type name (case-insensitive): the one place a name is parsed, at the edge
    (the CLI, a benchmark's arguments); everything below takes the Mix. ValueError lists the choices."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in MIXES:
        raise ValueError(f"unknown --type {name!r}; choose one of {', '.join(type_names())}")
    return MIXES[key]


def type_names() -> list[str]:
    return list(MIXES) + list(ALIASES)


def stays_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms, biases, every 1-D tensor and a mixture's routers (ffn_gate_inp, and a shared expert's
    one-row gate ffn_gate_inp_shexp) are kept in F32 by both of llama.cpp's tools."""
    routers = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
    return len(shape) < 2 or name.endswith(("_norm.weight", *routers)) or not name.endswith(".weight")


def ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A (numpy-order) shape as llama-quantize writes it: ggml counts a tensor's dimensions without
    its trailing ones (ggml_n_dims), so a single row (1, n) is written, and left unquantized, as 1-D."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quantize's pick of layers that get more bits: the first and last eighth, and every
    third layer between them."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


@dataclass(frozen=True)
class TypePlan:
    """A mix resolved for one model: the GGUF type name of every tensor, in llama.cpp's tensor order.
    Made once and handed on, so every step that needs the types (QAT's grids, convert) uses the same."""

    mix: Mix
    types: dict[str, str]


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor flags. tensor_types: (regex, TYPE) pairs, --tensor-type PATTERN=TYPE
    in the order given; the first pattern found in a tensor's name sets its type and skips the mix's
    rules. output_tensor_type, token_embedding_type: those two tensors' types, as given. pure: no
    per-tensor rules at all (every quantized tensor gets the base type). leave_output_tensor: the output
    projection stays F32, unquantized (llama-quantize leaves it in its source type: the lossless F32)."""

    tensor_types: tuple[tuple[str, str], ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    leave_output_tensor: bool = False


def overrides(
    tensor_types: Sequence[str] = (),
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    leave_output_tensor: bool = False,
) -> Overrides:
    """Overrides from llama-quantize's spellings (PATTERN=TYPE, type names in any case), checked:
    ValueError with one line for a malformed pair, a bad regex or a type slim does not write."""
    pairs = []
    for spec in tensor_types:
        pattern, sep, type_name = spec.partition("=")
        if not sep or not pattern or not type_name:
            raise ValueError(
                f"--tensor-type {spec!r} must read PATTERN=TYPE, e.g. attn_v=Q8_0 or 'blk\\.[0-3]\\.'=Q6_K"
            )
        pattern = pattern.lower()  # llama-quantize lowercases the pattern
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"--tensor-type {spec!r}: {pattern!r} is not a regular expression ({exc})") from None
        pairs.append((pattern, str(_type_name(type_name, "--tensor-type"))))
    return Overrides(
        tensor_types=tuple(pairs),
        output_tensor_type=_type_name(output_tensor_type, "--output-tensor-type") if output_tensor_type else None,
        token_embedding_type=_type_name(token_embedding_type, "--token-embedding-type")
        if token_embedding_type
        else None,
        pure=pure,
        leave_output_tensor=leave_output_tensor,
    )


def _type_name(name: str | None, flag: str) -> str | None:
    if name is None:
        return None
    key = name.strip().upper()
    if key not in QTYPES:
        raise ValueError(f"{flag}: unknown tensor type {name!r}; choose one of {', '.join(QTYPES)}")
    return key


def plan(
    shapes: Mapping[str, tuple[int, ...]],
    chosen: Mix,
    n_layer: int,
    has_imatrix: bool = False,
    tensor_overrides: Overrides | None = None,
) -> TypePlan:
    """The GGUF type of each tensor (GGUF name -> numpy shape) under the mix, as llama-quantize picks it.
    has_imatrix: quantizing with an importance matrix, which changes a few rules (Q4_0/Q5_0, IQ4_*)
    and is required by Q2_K_S. tensor_overrides: llama-quantize's per-tensor flags (Overrides).
    ValueError when the mix needs an imatrix that is not given, an override pattern matches no
    tensor, or an overridden type does not fit a tensor's rows."""
    given = tensor_overrides or Overrides()
    names = llama_order(list(shapes))
    state = _PlanState(
        mix=chosen.name,
        n_layer=n_layer,
        n_gqa=_n_gqa(shapes),
        n_expert=_n_expert(shapes),
        tied="output.weight" not in shapes,
        has_imatrix=has_imatrix,
        n_attn_v=sum(_category(name) in _ATTN_V_LIKE for name in names),
        output_type=given.output_tensor_type,
    )
    patterns = [(re.compile(pattern), type_name) for pattern, type_name in given.tensor_types]
    types: dict[str, str] = {}
    for name in names:
        shape, category = shapes[name], _category(name)
        one_row = chosen.name not in FLOAT_MIXES and len(ggml_shape(shape)) < 2  # llama-quantize leaves it
        if stays_f32(name, shape) or one_row or (given.leave_output_tensor and name == "output.weight"):
            types[name] = "F32"
        elif given.token_embedding_type and category == "token_embd":
            types[name] = _fitting(given.token_embedding_type, name, shape[-1], "--token-embedding-type")
        elif given.output_tensor_type and category == "output":
            types[name] = _fitting(given.output_tensor_type, name, shape[-1], "--output-tensor-type")
        elif chosen.name in FLOAT_MIXES:
            types[name] = chosen.base
        else:
            manual = next((type_name for pattern, type_name in patterns if pattern.search(name)), None)
            if manual is not None:
                qtype = manual
            elif given.pure:
                qtype = chosen.base
            else:
                qtype = state.bump(name, chosen.base, shape[-1])
            types[name] = fit_row_length(qtype, shape[-1])
    for pattern, type_name in given.tensor_types:
        if not any(re.search(pattern, name) for name in names):
            raise ValueError(
                f"--tensor-type {pattern}={type_name} matches no tensor of this model; names read like "
                f"blk.0.attn_v.weight, blk.3.ffn_down.weight, output.weight"
            )
    if not has_imatrix:
        _check_imatrix_not_needed(chosen, types)
    return TypePlan(chosen, types)


def _check_imatrix_not_needed(chosen: Mix, types: Mapping[str, str]) -> None:
    for name, qtype in types.items():
        needs = qtype in _NEED_IMATRIX or (qtype == "Q2_K" and chosen.name == "Q2_K_S")
        if needs and _category(name) not in ("output", "token_embd"):
            raise ValueError(
                f"--type {chosen.name} needs an importance matrix ({name} would be {qtype}), as llama-quantize "
                "does: run `slim calibrate` first and pass its file with --imatrix"
            )


def _fitting(qtype: str, name: str, n_per_row: int, flag: str) -> str:
    """An explicitly chosen type, which llama-quantize does not fall back from: it must fit the rows."""
    if n_per_row % QTYPES[qtype].block_size:
        raise ValueError(
            f"{flag} {qtype}: {name} has rows of {n_per_row}, not a multiple of {qtype}'s "
            f"{QTYPES[qtype].block_size}-weight blocks; choose a type with 32-weight blocks such as Q8_0"
        )
    return qtype


_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")  # the categories llama-quantize treats as attn_v
# The mixes whose attn_output llama-quantize raises to Q5_K in an 8-expert model.
_EIGHT_EXPERT_ATTN_OUTPUT_Q5_K = (
    "Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS",
)  # fmt: skip


def _category(name: str) -> str:
    """llama-quantize's tensor category (tensor_get_category): what the name contains, first match wins."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{part}.weight" in name:
            return part
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part
    return "other"


def _n_gqa(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Query heads per key/value head (llama.cpp's n_gqa), read off the first layer's attn_q and attn_k
    rows (query and key heads have one head size in every family slim writes); 1 without them."""
    q, k = shapes.get("blk.0.attn_q.weight"), shapes.get("blk.0.attn_k.weight")
    return q[0] // k[0] if q and k else 1


def _n_expert(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Experts per layer (llama.cpp's n_expert), the rows of the first layer's router; 0 for a dense model."""
    router = shapes.get("blk.0.ffn_gate_inp.weight")
    return router[0] if router else 0


@dataclass
class _PlanState:
    """llama_tensor_get_type's rules for one model, with its counters of attn_v and ffn_down
    tensors seen so far (the rules look at a tensor's position among them)."""

    mix: str
    n_layer: int
    n_gqa: int
    n_expert: int
    tied: bool
    has_imatrix: bool
    n_attn_v: int
    output_type: str | None = None  # --output-tensor-type, which a tied token_embd follows too
    i_attn_v: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    def bump(self, name: str, qtype: str, n_per_row: int) -> str:
        """The type llama-quantize gives a quantized tensor of this mix, before the row-length fallback.
        The rules for Falcon and 70B Llama are left out: slim writes neither."""
        mix, category = self.mix, _category(name)
        if category == "output" or (self.tied and category == "token_embd"):
            if self.output_type:
                return self.output_type
            # the output projection is the most sensitive tensor: Q6_K, or Q8_0 when 256 does not fit
            if n_per_row % QTYPES[qtype].block_size:
                return "Q8_0"
            if mix in _VERY_LOW_BIT or mix == "IQ3_XXS":
                return "Q5_K"
            return qtype if qtype == "Q8_0" else "Q6_K"
        if category == "token_embd":
            if mix in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return "Q2_K"
            if mix in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                return "IQ3_S"
            return "Q4_K" if mix in ("TQ1_0", "TQ2_0") else qtype
        if mix in _VERY_LOW_BIT:
            return self._very_low_bit(category, qtype)
        if category in _ATTN_V_LIKE:
            i, self.i_attn_v = self.i_attn_v, self.i_attn_v + 1
            # for 8-expert models llama-quantize gives attn_v Q8_0 whatever the mix ("trades just ~128MB")
            return "Q8_0" if self.n_expert == 8 else self._attn_v(qtype, i)
        if category == "ffn_down":
            i, self.i_ffn_down = self.i_ffn_down, self.i_ffn_down + 1
            return self._ffn_down(qtype, self._ffn_layer(name, i))
        if category == "attn_k" and self.n_expert == 8:
            return "Q8_0"
        if category in ("attn_k", "attn_q"):
            return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(mix, qtype)
        if category == "attn_output":
            if self.n_expert == 8:
                return "Q5_K" if mix in _EIGHT_EXPERT_ATTN_OUTPUT_Q5_K else qtype
            return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(
                mix, qtype
            )
        if category in ("ffn_gate", "ffn_up"):
            counter = f"i_{category}"
            i = self._ffn_layer(name, getattr(self, counter))
            setattr(self, counter, getattr(self, counter) + 1)
            if mix == "IQ3_XS" and self.n_layer // 8 <= i < 7 * self.n_layer // 8:
                return "IQ3_XXS"
        return qtype

    def _ffn_layer(self, name: str, seen: int) -> int:
        """The layer an FFN rule looks at: its count of such tensors so far, or in a mixture of experts
        the layer in the tensor's name (llama-quantize's layer_info: experts' tensors need not come in
        layer order)."""
        match = _LAYER.match(name)
        return int(match.group(1)) if self.n_expert > 1 and match else seen

    def _very_low_bit(self, category: str, qtype: str) -> str:
        """llama-quantize's branch for the 1- and 2-bit lattice mixes."""
        mix = self.mix
        more = "IQ3_S" if mix in ("IQ2_S", "IQ2_M") else "Q2_K"
        if category in _ATTN_V_LIKE:
            self.i_attn_v += 1
            return "Q4_K" if self.n_gqa >= 4 or self.n_expert >= 4 else more
        if category == "attn_k" and self.n_expert == 8:
            return "Q4_K"
        if category == "ffn_down":
            i, self.i_ffn_down = self.i_ffn_down, self.i_ffn_down + 1
            return more if i < self.n_layer // 8 else qtype
        if category == "attn_output":
            if self.n_expert == 8:
                return "Q5_K"
            return {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(mix, qtype)
        return qtype

    def _attn_v(self, qtype: str, i: int) -> str:
        mix, wide_gqa = self.mix, self.n_gqa >= 4
        if mix == "Q2_K":
            return "Q4_K" if wide_gqa else "Q3_K"
        if mix == "Q2_K_S" and wide_gqa:
            return "Q4_K"
        if mix == "IQ3_XXS":
            return "Q4_K" if wide_gqa else "IQ3_XXS" if self.has_imatrix else "IQ3_S"
        if mix in ("IQ3_XS", "IQ3_S") and wide_gqa:
            return "Q4_K"
        if mix == "IQ3_M":
            return "Q4_K"
        if mix == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("IQ4_NL", "IQ4_XS") and wide_gqa:
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.n_attn_v):
            return "Q6_K"
        if mix == "Q4_K_S" and i < 4:
            return "Q5_K"
        return qtype

    def _ffn_down(self, qtype: str, i: int) -> str:
        mix, first_eighth = self.mix, i < self.n_layer // 8
        if mix == "Q2_K":
            return "Q3_K"
        if mix == "Q2_K_S":
            return "Q4_K" if first_eighth else qtype
        if mix == "IQ3_XXS" and not self.has_imatrix:
            return "Q4_K" if first_eighth else "Q3_K"
        if mix == "Q3_K_M":
            return "Q5_K" if i < self.n_layer // 16 else "Q4_K"
        if mix == "IQ3_M" and (first_eighth or (self.n_expert == 8 and use_more_bits(i, self.n_layer))):
            return "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix == "Q4_K_M":
            return "Q6_K" if use_more_bits(i, self.n_layer) else qtype
        if mix in ("IQ4_NL", "IQ4_XS") and first_eighth and not self.has_imatrix:
            return "Q5_K"
        if mix == "Q5_K_M" and use_more_bits(i, self.n_layer):
            return "Q6_K"
        if mix == "Q4_K_S" and first_eighth:
            return "Q5_K"
        if mix in ("Q4_0", "Q5_0") and self.has_imatrix and first_eighth:
            # llama-quantize guards the first ffn_down layers, which an imatrix can make go wild
            return "Q4_1" if mix == "Q4_0" else "Q5_1"
        return qtype


def fit_row_length(qtype: str, n_per_row: int) -> str:
    """llama-quantize's fallback for a row length the block size does not divide."""
    if n_per_row % QTYPES[qtype].block_size == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if n_per_row % QTYPES[qtype].block_size == 0 else "F16"


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's tensor order (llama_model_loader's weight_name_comparer): non-layer tensors
    first, then by layer number, by name within a layer. llama-quantize writes in this order and
    counts attn_v/ffn_down layers in it."""

    def key(name: str) -> tuple[int, str]:
        match = _LAYER.match(name)
        return (int(match.group(1)) if match else -1, name)

    return sorted(names, key=key)
