"""Phi-3's own rules, beyond what test_architectures proves on the phi3 and phi4_mini fixtures:
the configs slim refuses (each in one line), the variant without LongRoPE against llama.cpp's
converter, and width pruning through the fused gate_up_proj."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import gguf_tensors, llama_logits, run_slim, tokenize
from test_architectures import PROMPT, build_from_config, convert_hf_to_gguf, metadata, transformers_logits

from slim import models
from slim.runtime.formats.checkpoint import Checkpoint
from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.calibrate import calibrate
from slim.runtime.pipeline.convert import convert
from slim.runtime.pipeline.prune import PruneError, check_amounts, plan_width, prune_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Phi-3-mini-4k's shape of config, small: no rope scaling, no sliding window.
BASE = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "vocab_size": 49152,
    "pad_token_id": None,
}


def phi3(**changes: Any) -> models.DecoderArchitecture:
    return models.for_hf_config({**BASE, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sliding_window": 2047}, "sliding_window 2047 is shorter than the context (4096)"),
        ({"head_dim": 32}, "head_dim 32 x 2 heads is not hidden_size 128"),
        ({"partial_rotary_factor": 0.3}, "whole, even number"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "RoPE scaling 'yarn' is not supported"),
        (
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 31, "long_factor": [1.0] * 32}},
            "short_factor and long_factor of 32 numbers each",
        ),
    ],
)
def test_configs_the_gguf_cannot_express_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(models.ArchitectureError, match="^[^\n]+$") as refused:
        phi3(**changes)
    assert message in str(refused.value)


def test_window_as_long_as_the_context_changes_nothing_and_is_written() -> None:
    """Phi-3.5 and Phi-4-mini carry a window longer than their context: every token is inside it."""
    keys = phi3(sliding_window=262144).metadata()
    assert keys["phi3.attention.sliding_window"] == 262144
    assert phi3().metadata()["phi3.attention.sliding_window"] == 0


def test_longrope_attention_factor_follows_transformers() -> None:
    """From the context's growth by default, as llama.cpp's converter computes it; transformers'
    explicit `factor` or `attention_factor` win, and slim writes what transformers runs."""
    factors = {"type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32}
    grown = phi3(max_position_embeddings=131072, rope_scaling=factors)
    assert grown.metadata()["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    assert phi3(rope_scaling={**factors, "attention_factor": 1.25}).rope_attention_factor() == 1.25
    short, long = grown.rope_factors(4096), grown.rope_factors(4097)  # up to the original context, and past it
    assert short is not None and long is not None and (short[0], long[0]) == (1.0, 2.0)


def build_checkpoint(directory: Path, tokenizer_from: Path | None, **changes: Any) -> Path:
    """A random Phi-3 checkpoint of BASE with `changes`; with SmolLM2's tokenizer declared as
    Phi-4-mini declares its own (GPT2Tokenizer), unless tokenizer_from is None."""
    config = {**BASE, **changes, "tokenizer_config": {"tokenizer_class": "GPT2Tokenizer"}}
    return build_from_config(config, directory, tokenizer_from)


@pytest.fixture(scope="module")
def plain_phi3(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phi-3-mini-4k-like: no LongRoPE, no window."""
    return build_checkpoint(tmp_path_factory.mktemp("phi3") / "checkpoint", smollm2_tokenizer)


def test_long_factors_past_the_original_context(smollm2_tokenizer: Path, tmp_path: Path) -> None:
    """Past original_max_position_embeddings transformers switches to the long factors; llama.cpp
    does for a context longer than that: on such a prompt and context the logits agree."""
    pairs = 32
    factors = {
        "type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
        "long_factor": [1.0 + 1.5 * i for i in range(pairs)],
    }
    checkpoint = build_checkpoint(
        tmp_path / "checkpoint",
        smollm2_tokenizer,
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
        rope_scaling=factors,
    )
    convert(checkpoint, tmp_path / "f32.gguf", mix("F32"))
    tokens = tokenize(tmp_path / "f32.gguf", PROMPT * 3)
    assert len(tokens) > 256
    ours = llama_logits(tmp_path / "f32.gguf", tokens, n_ctx=512, exact=True)
    assert np.abs(ours - transformers_logits(checkpoint, tokens)).max() < 1e-2


def test_without_longrope_is_llama_cpp_converters_file(
    plain_phi3: Path, llama_cpp_sources: Path, tmp_path: Path
) -> None:
    theirs = convert_hf_to_gguf(llama_cpp_sources, plain_phi3, "f32", tmp_path / "theirs.gguf")
    convert(plain_phi3, tmp_path / "ours.gguf", mix("F32"))
    assert metadata(tmp_path / "ours.gguf") == metadata(theirs)
    assert gguf_tensors(tmp_path / "ours.gguf") == gguf_tensors(theirs)
    assert not any(name.startswith("rope_factors") for name in gguf_tensors(theirs))


def test_width_pruning_cuts_the_fused_gate_up_and_refuses_heads(plain_phi3: Path, tmp_path: Path) -> None:
    """FFN neurons go from both halves of gate_up_proj: the smaller model is the original with
    those neurons' down_proj columns zeroed. Heads cannot go: llama.cpp's phi3 has no head size."""
    from slim.runtime.store import assets

    checkpoint = Checkpoint(plain_phi3)
    arch = models.for_hf_config(checkpoint.config)
    with pytest.raises(PruneError, match="cannot be pruned from this Phi-3: head_dim 64 x 1 heads"):
        check_amounts(arch, "width", heads=0.5)

    convert(plain_phi3, tmp_path / "f32.gguf", mix("F32"))
    text = assets.wiki_text("train").read_text(encoding="utf-8")[:3000]
    calibration = calibrate(tmp_path / "f32.gguf", text, ctx=128, chunks=2, threads=1)
    plan = plan_width(checkpoint, arch, calibration, ffn=0.5)
    prune_checkpoint(plain_phi3, tmp_path / "small", plan)
    assert json.loads((tmp_path / "small" / "config.json").read_text())["intermediate_size"] == 128

    tokens = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    small = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)
    full = transformers.AutoModelForCausalLM.from_pretrained(plain_phi3, dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(full.model.layers):
            dropped = np.setdiff1d(np.arange(256), plan.ffn_kept[i])
            layer.mlp.down_proj.weight[:, torch.from_numpy(dropped)] = 0
        assert (small(tokens).logits - full(tokens).logits).abs().max() < 1e-5


def test_prune_heads_is_refused_before_calibrating(plain_phi3: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("some calibration text " * 50)
    run = run_slim("prune", str(plain_phi3), "-o", str(tmp_path / "out"), "--method", "width", "--heads", "0.5",
                   "--text", str(text), "-q")  # fmt: skip
    assert run.returncode != 0 and not (tmp_path / "out").exists()
    assert "cannot be pruned from this Phi-3" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_facts_name_longrope_and_partial_rotary() -> None:
    factors = {"type": "longrope", "short_factor": [1.0] * 24, "long_factor": [2.0] * 24}
    arch = phi3(partial_rotary_factor=0.75, max_position_embeddings=8192, rope_scaling=factors)
    facts = type(arch).gguf_facts(arch.metadata(), set(arch.extra_tensors()))
    assert facts["rope scaling"] == "longrope, 4096 -> 8192 tokens"
    assert facts["rope"] == "rotates 48 of 64 dimensions per head"


def test_sentencepiece_vocabulary_is_llama_cpp_converters(llama_cpp_sources: Path, tmp_path: Path) -> None:
    """Phi-3 and Phi-3.5 ship a SentencePiece tokenizer.model, their chat markers as special added
    tokens, and an embedding larger than the vocabulary: llama.cpp's phi3 converter reads that
    layout its own way; slim's file says the same (every tokenizer.* key) and tokenizes alike."""
    from test_tokenizer import trained_sentencepiece

    markers = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|system|>", "<|end|>", "<|user|>"]
    checkpoint = build_checkpoint(
        tmp_path / "checkpoint", None, vocab_size=416, bos_token_id=1, eos_token_id=400, pad_token_id=400
    )
    (checkpoint / "tokenizer.model").write_bytes(trained_sentencepiece())
    (checkpoint / "added_tokens.json").write_text(json.dumps({text: 400 + i for i, text in enumerate(markers)}))
    decoder = {str(400 + i): {"content": text, "special": True, "rstrip": True} for i, text in enumerate(markers)}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "added_tokens_decoder": decoder,
        "chat_template": "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    }
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    theirs = convert_hf_to_gguf(llama_cpp_sources, checkpoint, "f32", tmp_path / "theirs.gguf")
    convert(checkpoint, tmp_path / "ours.gguf", mix("F32"))
    ours = metadata(tmp_path / "ours.gguf")
    assert {k: v for k, v in ours.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in metadata(theirs).items() if k.startswith("tokenizer.")
    }
    assert ours == metadata(theirs)
    text = "In 1984 the harbour counted 12345 ships; café naïve 我想<|end|>"
    assert tokenize(tmp_path / "ours.gguf", text) == tokenize(theirs, text)
