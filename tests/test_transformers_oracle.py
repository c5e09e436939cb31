"""An independent oracle for tensor names and the Q/K permutation: transformers' logits on a
Hugging Face checkpoint equal llama.cpp's on slim's F32 GGUF of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import llama_logits, make_qwen2_checkpoint, tokenize

from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.convert import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def transformers_logits(directory: Path, tokens: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_real_model_logits_match_transformers(smollm2_hf: Path, smollm2_f32: Path, heldout_text: str) -> None:
    tokens = tokenize(smollm2_f32, heldout_text[:3000])[:256]
    ours = llama_logits(smollm2_f32, tokens, exact=True)
    theirs = transformers_logits(smollm2_hf, tokens)
    assert np.abs(ours - theirs).max() < 1e-3


def test_random_qwen2_logits_match_transformers(smollm2_tokenizer: Path, tmp_path: Path) -> None:
    hf = make_qwen2_checkpoint(tmp_path / "qwen2", smollm2_tokenizer, hidden=128, ffn=256, max_position_embeddings=512)
    gguf_path = tmp_path / "qwen2.gguf"
    convert(hf, gguf_path, mix("F32"))
    tokens = tokenize(gguf_path, "The quick brown fox jumps over the lazy dog. " * 8)
    ours = llama_logits(gguf_path, tokens, exact=True)
    theirs = transformers_logits(hf, tokens)
    assert np.abs(ours - theirs).max() < 1e-3
