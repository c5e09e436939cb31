"""Gemma beyond the per-family proofs of test_architectures.py: a layer pattern llama.cpp would not
assume (the trap where llama.cpp's own converter writes a model that runs wrong), the text part of
Gemma3ForConditionalGeneration, and the configs slim refuses because llama.cpp would run them otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import gguf_tensors, llama_logits, run_slim, tokenize
from test_architectures import FIXTURES, PROMPT, build_from_config, convert_hf_to_gguf, metadata, transformers_logits

from slim import models
from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.convert import convert
from slim.runtime.pipeline.export import export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GEMMA2 = json.loads((FIXTURES / "gemma2.json").read_text())
GEMMA3 = json.loads((FIXTURES / "gemma3.json").read_text())
SLIDING, FULL = "sliding_attention", "full_attention"
PATTERN_KEY = "gemma3.attention.sliding_window_pattern"


def max_diff(gguf_path: Path, tokens: list[int], truth: np.ndarray) -> float:
    return float(np.abs(llama_logits(gguf_path, tokens, exact=True) - truth).max())


@pytest.fixture(scope="module")
def three_sliding_one_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trap of issue #13: four layers, three sliding then one full (llama.cpp assumes 5:1)."""
    config = {**GEMMA3, "num_hidden_layers": 4, "layer_types": [SLIDING, SLIDING, SLIDING, FULL]}
    return build_from_config(config, tmp_path_factory.mktemp("gemma3-3-1"), None)


def test_a_layer_pattern_llama_cpp_would_not_assume_is_written_out(
    three_sliding_one_full: Path, llama_cpp_sources: Path, tmp_path: Path
) -> None:
    checkpoint = three_sliding_one_full
    ours = convert(checkpoint, tmp_path / "ours.gguf", mix("F32")).output
    theirs = convert_hf_to_gguf(llama_cpp_sources, checkpoint, "f32", tmp_path / "theirs.gguf")
    written = metadata(Path(ours))
    assert written.pop(PATTERN_KEY)[1] == [True, True, True, False]
    assert written == metadata(theirs) and gguf_tensors(Path(ours)) == gguf_tensors(theirs)

    tokens = tokenize(Path(ours), PROMPT)
    truth = transformers_logits(checkpoint, tokens)
    slim_diff, reference_diff = max_diff(Path(ours), tokens, truth), max_diff(theirs, tokens, truth)
    print(f"3 sliding + 1 full: max |logit diff| {slim_diff:.2e} (slim), {reference_diff:.2e} (llama.cpp's converter)")
    assert slim_diff < 1e-2 and reference_diff > 0.1

    export(ours, tmp_path / "exported", "F32")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["layer_types"] == [SLIDING] * 3 + [FULL]
    assert np.abs(transformers_logits(tmp_path / "exported", tokens) - truth).max() < 1e-2


def test_the_student_runs_the_layer_pattern(three_sliding_one_full: Path) -> None:
    from slim.runtime.train import student

    ours = student.load(three_sliding_one_full)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(three_sliding_one_full, dtype=torch.float32)
    tokens = torch.randint(0, ours.arch.vocab_size, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max() < 1e-5


def test_pruning_a_layer_keeps_the_pattern(three_sliding_one_full: Path, tmp_path: Path) -> None:
    """Removing a block drops its layer_types entry; the pruned model's GGUF runs as transformers does."""
    from slim.runtime.store import assets

    text = tmp_path / "train.txt"
    text.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    pruned = tmp_path / "pruned"
    run = run_slim("prune", str(three_sliding_one_full), "-o", str(pruned), "--method", "layers", "--remove", "1",
                   "--ctx", "128", "--chunks", "2", "--text", str(text), "--threads", "1", "-q")  # fmt: skip
    assert run.returncode == 0, run.stderr
    layer_types = json.loads((pruned / "config.json").read_text())["layer_types"]
    assert len(layer_types) == 3 and layer_types.count(FULL) <= 1
    gguf_path = convert(pruned, tmp_path / "pruned.gguf", mix("F32")).output
    tokens = tokenize(Path(gguf_path), PROMPT)
    assert max_diff(Path(gguf_path), tokens, transformers_logits(pruned, tokens)) < 1e-2


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Gemma3ForConditionalGeneration: the gemma3 fixture as its text model, a one-layer vision tower."""
    text_config = {k: v for k, v in GEMMA3.items() if k not in ("architectures", "model_type", "tokenizer")}
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text_config,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4,
        "tokenizer": GEMMA3["tokenizer"],
    }  # fmt: skip
    return build_from_config(config, tmp_path_factory.mktemp("gemma3-multimodal"), None)


def test_the_text_part_of_gemma3_for_conditional_generation(
    multimodal: Path, llama_cpp_sources: Path, tmp_path: Path
) -> None:
    ours = Path(convert(multimodal, tmp_path / "ours.gguf", mix("F32")).output)
    theirs = convert_hf_to_gguf(llama_cpp_sources, multimodal, "f32", tmp_path / "theirs.gguf")
    assert metadata(ours) == metadata(theirs)
    assert gguf_tensors(ours) == gguf_tensors(theirs)
    tokens = tokenize(ours, PROMPT)
    diff = max_diff(ours, tokens, transformers_logits(multimodal, tokens))
    print(f"Gemma3ForConditionalGeneration: max |logit diff| {diff:.2e}")
    assert diff < 1e-2


def test_the_student_of_a_multimodal_checkpoint_is_its_text_model(multimodal: Path, tmp_path: Path) -> None:
    """The student loads the language model out of the multimodal checkpoint and saves it as a
    Gemma3ForCausalLM that transformers runs with the same logits."""
    from slim.runtime.train import student

    ours = student.load(multimodal)
    tokens = torch.randint(0, ours.arch.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(multimodal, dtype=torch.float32)
    with torch.no_grad():
        logits = ours(tokens)
        assert (logits - theirs(tokens).logits).abs().max() < 1e-5
    student.save(ours, multimodal, tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32)
    with torch.no_grad():
        assert (saved(tokens).logits - logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("base", "change", "message"),
    [
        (GEMMA3, {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256: llama.cpp's gemma3 scales q.k by 1/sqrt"),
        (GEMMA3, {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        (GEMMA3, {"attn_logit_softcapping": 50.0}, "does not soft-cap attention"),
        (GEMMA3, {"use_bidirectional_attention": True}, "attends causally"),
        (
            GEMMA3,
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                }
            },
            "on the sliding layers",
        ),  # fmt: skip
        (GEMMA3, {"layer_types": [SLIDING] * 5}, "for each of the 6 layers"),
        (GEMMA3, {"sliding_window": None}, "no sliding_window"),
        (GEMMA2, {"final_logit_softcapping": None}, "is None, but llama.cpp's gemma2 always soft-caps"),
        (GEMMA2, {"attn_logit_softcapping": 0.0}, "is 0.0, but llama.cpp's gemma2 always soft-caps"),
    ],
)
def test_configs_llama_cpp_would_run_otherwise_are_refused(
    base: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(models.ArchitectureError, match=message):
        models.for_hf_config({**base, **change})


def test_gemma2_with_its_own_lm_head_is_refused() -> None:
    arch = models.for_hf_config({**GEMMA2, "tie_word_embeddings": False})
    with pytest.raises(models.ArchitectureError, match="untied lm_head.weight cannot be kept"):
        arch.gguf_name("lm_head.weight")


def test_convert_refuses_in_one_line(three_sliding_one_full: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "hf"
    shutil.copytree(three_sliding_one_full, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 100}))
    run = run_slim("convert", str(checkpoint), "-o", str(tmp_path / "out.gguf"))
    assert run.returncode == 2 and not (tmp_path / "out.gguf").exists()
    assert run.stderr.count("\n") == 1 and "query_pre_attn_scalar 100" in run.stderr


def test_pruning_a_multimodal_checkpoint_is_refused(multimodal: Path, tmp_path: Path) -> None:
    """Its tensors live under language_model.: pruning them in place would write a broken model."""
    run = run_slim("prune", str(multimodal), "-o", str(tmp_path / "out"), "--method", "magnitude", "--sparsity", "0.5")
    assert run.returncode == 2 and not (tmp_path / "out").exists()
    assert run.stderr.count("\n") == 1 and "Gemma3ForConditionalGeneration" in run.stderr


def test_the_chat_template_renders_gemma_turns(three_sliding_one_full: Path, tmp_path: Path) -> None:
    """The GGUF carries tokenizer_config's template; rendered, its turn markers are single special tokens."""
    import gguf
    import llama_cpp

    from slim.runtime.inference.chat_template import render_chat

    gguf_path = tmp_path / "model.gguf"
    convert(three_sliding_one_full, gguf_path, mix("Q8_0"))
    template = gguf.GGUFReader(gguf_path).get_field("tokenizer.chat_template").contents()
    assert template == json.loads((three_sliding_one_full / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Où est Köln? "},
        {"role": "assistant", "content": "In Germany."},
        {"role": "user", "content": "東京は?"},
    ]
    rendered = render_chat(template, messages, bos_token="<bos>")
    assert rendered == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nOù est Köln?<end_of_turn>\n"
        "<start_of_turn>model\nIn Germany.<end_of_turn>\n"
        "<start_of_turn>user\n東京は?<end_of_turn>\n<start_of_turn>model\n"
    )
    tokens = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False).tokenize(
        rendered.encode(), add_bos=False, special=True
    )
    assert tokens[0] == 2 and tokens.count(4) == 4 and tokens.count(5) == 3  # <bos>, <start_of_turn>, <end_of_turn>


# Configs laid out as the Hub's (written before layer_types existed; Gemma 3 4B's text_config leaves
# most keys to transformers' defaults).
HUB_CONFIGS = {
    "gemma-2-2b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304,
                   "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                   "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "vocab_size": 256000},
    "gemma-3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
                   "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
                   "sliding_window_pattern": 6, "rope_theta": 1000000, "rope_local_base_freq": 10000,
                   "rope_scaling": None, "max_position_embeddings": 32768, "vocab_size": 262144},
    "gemma-3-4b": {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                   "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                                   "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                   "sliding_window": 1024},
                   "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                                     "model_type": "siglip_vision_model", "num_attention_heads": 16,
                                     "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_configs_read_as_transformers_reads_them(name: str, tmp_path: Path) -> None:
    """Sizes, layer pattern, window and RoPE per layer equal what transformers makes of the same config.json."""
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[name]))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    theirs = getattr(theirs, "text_config", theirs)
    arch = models.for_hf_config(HUB_CONFIGS[name])
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
    assert (arch.hidden, arch.n_layer, arch.n_head, arch.n_head_kv, arch.head_dim, arch.vocab_size) == tuple(
        getattr(theirs, key) for key in sizes
    )
    assert arch.layer_types == theirs.layer_types and arch.window == theirs.sliding_window
    rope = theirs.rope_parameters
    for kind, how in zip(theirs.layer_types, arch.layer_attention(), strict=True):
        expected = rope.get(kind, rope)
        assert how.rope_theta == expected["rope_theta"] and how.rope_factor == expected.get("factor", 1.0)
        assert how.window == (theirs.sliding_window if kind == SLIDING else None)
    assert not any(key.endswith("sliding_window_pattern") for key in arch.metadata())  # llama.cpp's default pattern


@pytest.mark.parametrize(
    ("arch", "keys", "layer_types"),
    [
        ("gemma3", {"attention.sliding_window": 16, "attention.sliding_window_pattern": 2}, "SFSF"),
        ("gemma3", {"attention.sliding_window": 16, "attention.sliding_window_pattern": [True, False] * 2}, "SFSF"),
        ("gemma3", {"attention.sliding_window": 16}, "SSSS"),  # llama.cpp's default: 5 sliding to 1 full
        ("gemma3", {}, "FFFF"),  # no window: llama.cpp's gemma3 slides nowhere
        ("gemma2", {}, "SFSF"),  # llama.cpp's gemma2: a 4096 window on every other layer
    ],
)
def test_exported_layer_types_are_what_llama_cpp_runs(arch: str, keys: dict[str, Any], layer_types: str) -> None:
    fields = {f"{arch}.{key}": value for key, value in {
        "block_count": 4, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 2,
        "attention.key_length": 32, "vocab_size": 300, **keys}.items()}  # fmt: skip
    config = models.for_gguf_arch(arch).config_from_gguf(fields, has_output=False)
    assert config["layer_types"] == [SLIDING if kind == "S" else FULL for kind in layer_types]
    assert models.for_hf_config(config).layer_types == config["layer_types"]
