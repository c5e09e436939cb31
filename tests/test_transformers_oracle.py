"""An independent oracle for tensor names and the Q/K permutation: transformers' logits on a
Hugging Face checkpoint equal llama.cpp's on slim's F32 GGUF of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import llama_logits, tokenize
from slim.runtime.pipeline.convert import convert
from slim.runtime.formats.mixes import mix

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def transformers_logits(directory: Path, tokens: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.slow
def test_real_model_logits_match_transformers(smollm2_hf: Path, heldout_text: str, tmp_path: Path) -> None:
    gguf_path = tmp_path / "f32.gguf"
    convert(smollm2_hf, gguf_path, mix("F32"))
    tokens = tokenize(gguf_path, heldout_text[:3000])[:256]
    ours = llama_logits(gguf_path, tokens, exact=True)
    theirs = transformers_logits(smollm2_hf, tokens)
    assert np.abs(ours - theirs).max() < 1e-3


def test_random_qwen2_logits_match_transformers(smollm2_hf: Path, tmp_path: Path) -> None:
    config = transformers.Qwen2Config(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so attention and biases matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif param.ndim == 2:
                param.normal_(0, 0.08)
    hf = tmp_path / "qwen2"
    model.save_pretrained(hf, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / name, hf / name)
    gguf_path = tmp_path / "qwen2.gguf"
    convert(hf, gguf_path, mix("F32"))
    tokens = tokenize(gguf_path, "The quick brown fox jumps over the lazy dog. " * 8)
    ours = llama_logits(gguf_path, tokens, exact=True)
    theirs = transformers_logits(hf, tokens)
    assert np.abs(ours - theirs).max() < 1e-3
