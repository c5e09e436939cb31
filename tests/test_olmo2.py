"""OLMo 2's own rules, beyond what test_architectures proves on the olmo2 fixture: what llama.cpp's
olmo2 cannot run is refused in one line, and pruning keeps to what it can."""

from __future__ import annotations

from typing import Any

import pytest

from slim import models
from slim.runtime.pipeline.prune import PruneError, check_amounts

BASE = {
    "architectures": ["Olmo2ForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tie_word_embeddings": True}, "needs an output matrix of its own"),
        ({"head_dim": 32}, "head_dim 32 x 2 heads is not hidden_size 128"),
        ({"attention_bias": True}, "llama.cpp's olmo2 has no biases"),
    ],
)
def test_configs_llama_cpp_cannot_run_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(models.ArchitectureError, match="^[^\n]+$") as refused:
        models.for_hf_config({**BASE, **changes})
    assert message in str(refused.value)


def test_the_output_matrix_is_required_and_heads_stay() -> None:
    arch = models.for_hf_config(BASE)
    assert "output.weight" in arch.required_tensors()
    assert type(arch).gguf_facts(arch.metadata(), set())["norms"] == "after attention and FFN; Q/K across all heads"
    with pytest.raises(PruneError, match="cannot be pruned from this OLMo 2: head_dim 64 x 1 heads"):
        check_amounts(arch, "width", heads=0.5)
    check_amounts(arch, "width", ffn=0.5)  # FFN neurons can go
