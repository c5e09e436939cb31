"""The pipelines as a Python API, without the CLI: prune_model, pull's input checks, a --type
resolved once (mixes.plan, convert's Mix), and the one hub repo id rule. No real model needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_llama_checkpoint

from slim.runtime.formats import mixes
from slim.runtime.pipeline.prune import PruneError, PruneOptions, prune_model
from slim.runtime.store.hub import is_repo_id


@pytest.fixture
def tiny_hf(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 64}))
    return make_llama_checkpoint(tmp_path / "hf", base, hidden=64, n_layer=2, n_head=4, n_head_kv=2, ffn=128)


def test_prune_model_reports_and_writes_a_folder(tiny_hf: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    out = tmp_path / "pruned"
    report = prune_model(
        str(tiny_hf),
        out,
        PruneOptions(method="magnitude", sparsity=0.5),
        progress=lambda stage, done, total, loss=None: seen.append((stage, done)),
    )
    assert report.zeroed == report.block_weights // 2
    assert report.output_bytes == (out / "model.safetensors").stat().st_size
    assert report.parameters_after == report.parameters_before
    assert {stage for stage, _ in seen} == {"pruning"} and [done for _, done in seen] == list(range(1, len(seen) + 1))
    shown = report.as_dict()
    assert "dry_run" not in shown and None not in shown.values() and shown["output"] == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left behind


def test_prune_model_dry_run_writes_nothing(tiny_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    report = prune_model(str(tiny_hf), out, PruneOptions(method="magnitude", pattern="2:4", dry_run=True))
    assert report.as_dict()["dry_run"] is True and report.expected_bytes and not out.exists()


@pytest.mark.parametrize(
    "options, output, words",
    [
        (PruneOptions(method="layers", remove=1), "out", "needs a calibration text"),
        (
            PruneOptions(method="magnitude", sparsity=0.5, mix=mixes.mix("Q8_0")),
            "out",
            "--type applies to a GGUF output",
        ),
        (PruneOptions(method="width", ffn=0.5, text="some text", imatrix="x.imatrix"), "out", "not both"),
        (PruneOptions(method="magnitude", sparsity=0.5), "missing/out", "does not exist"),
    ],
)
def test_prune_model_refuses_bad_options_before_any_work(
    tiny_hf: Path, tmp_path: Path, options: PruneOptions, output: str, words: str
) -> None:
    with pytest.raises(PruneError, match=words):
        prune_model(str(tiny_hf), tmp_path / output, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "hf"]


def test_pull_refuses_bad_input_without_the_hub() -> None:
    from slim.runtime.pipeline.pull import default_name, pull
    from slim.runtime.store import StoreError

    with pytest.raises(StoreError, match="neither a catalog model"):
        pull("not-a-model")
    with pytest.raises(StoreError, match="--type applies to hub repos"):
        pull("smollm2-135m", "Q8_0")
    with pytest.raises(StoreError, match="not a valid model name"):
        pull("acme/x", name="Bad Name")
    assert default_name("acme/SmolLM2-135M-GGUF", "Q8_0") == "smollm2-135m:q8_0"


def test_a_type_plan_is_in_llama_cpp_order_and_keeps_its_mix() -> None:
    shapes = {f"blk.{i}.ffn_down.weight": (64, 256) for i in range(12)}
    shapes.update({"token_embd.weight": (100, 256), "output_norm.weight": (256,)})
    plan = mixes.plan(shapes, mixes.mix("q4_k"), n_layer=12)
    assert plan.mix is mixes.MIXES["Q4_K_M"]
    assert list(plan.types)[:4] == [
        "output_norm.weight",
        "token_embd.weight",
        "blk.0.ffn_down.weight",
        "blk.1.ffn_down.weight",
    ]
    assert list(plan.types)[-3:] == ["blk.9.ffn_down.weight", "blk.10.ffn_down.weight", "blk.11.ffn_down.weight"]
    assert plan.types["output_norm.weight"] == "F32" and plan.types["token_embd.weight"] == "Q6_K"  # tied output


def test_convert_takes_a_parsed_mix(tiny_hf: Path, tmp_path: Path) -> None:
    from slim.runtime.pipeline.convert import convert

    with pytest.raises(TypeError, match=r"mixes\.mix"):
        convert(tiny_hf, tmp_path / "out.gguf", "Q8_0")  # type: ignore[arg-type]
    assert mixes.MIXES["Q4_K_M"].ftype == 15  # gguf-py's LlamaFileType, the number llama.cpp writes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("owner/name.v2", True),
        ("smollm2-135m", False),
        ("./owner/name", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("owner/model.gguf", False),
        ("owner/with space", False),
    ],
)
def test_one_rule_tells_a_hub_repo_id_from_a_path(text: str, expected: bool) -> None:
    assert is_repo_id(text) is expected
