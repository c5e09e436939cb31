"""Granite's own rules, beyond what test_architectures proves on the granite fixture: what a GGUF
cannot say is refused in one line, and the multipliers survive the way back from a GGUF."""

from __future__ import annotations

from typing import Any

import pytest

from slim import models

BASE = {
    "architectures": ["GraniteForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 49155,
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.0078125,
    "residual_multiplier": 0.22,
    "logits_scaling": 8.0,
}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"head_dim": 32}, "head_dim 32 x 2 heads is not hidden_size 128"),
        ({"attention_bias": True}, "attention_bias or mlp_bias is not supported"),
        ({"mlp_bias": True}, "attention_bias or mlp_bias is not supported"),
        ({"residual_multiplier": 0}, "multipliers must not be 0"),
    ],
)
def test_configs_the_gguf_cannot_express_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(models.ArchitectureError, match="^[^\n]+$") as refused:
        models.for_hf_config({**BASE, **changes})
    assert message in str(refused.value)


def test_multipliers_are_written_and_read_back() -> None:
    arch = models.for_hf_config(BASE)
    keys = arch.metadata()
    assert (keys["granite.embedding_scale"], keys["granite.attention.scale"]) == (12.0, 0.0078125)
    assert (keys["granite.residual_scale"], keys["granite.logit_scale"]) == (0.22, 8.0)
    assert "granite.attention.key_length" not in models.for_hf_config({**BASE, "head_dim": 64}).metadata()
    config = models.for_gguf_arch("granite").config_from_gguf(keys, has_output=False)
    assert {key: config[key] for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling")} == {
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "logits_scaling": 8.0,
    }
    assert type(arch).gguf_facts(keys, set())["multipliers"] == (
        "embedding_multiplier 12, attention_multiplier 0.0078125, residual_multiplier 0.22, logits_scaling 8"
    )
