"""An independent oracle for tensor names and the Q/K permutation: transformers' logits on the
real model's Hugging Face checkpoint equal llama.cpp's on slim's F32 GGUF of it. Every family's
random-weight fixture goes through the same check in test_architectures.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import llama_logits, tokenize

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
