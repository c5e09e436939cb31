"""slim convert --type for the 2-, 3-bit, non-linear 4-bit and ternary mixes against llama-quantize.

The oracle is test_convert.py's: slim's F32 GGUF of a random fixture quantized by llama-quantize;
slim's one-step file must hold the same tensor names, types and bytes. Two fixtures: 2 query heads
per key/value head, and 4, where llama-quantize bumps attn_v further for Q2_K and IQ4_*. With an
imatrix the oracle is the llama-quantize binary given the same file.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import gguf_tensors, llama_quantize, make_llama_checkpoint, run_slim
from test_convert import assert_clean_failure

from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.calibrate import Calibration
from slim.runtime.pipeline.convert import convert

LOW_BIT = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "IQ3_M"]


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 layers, rows of 256 and 512, 4 heads over 2 key/value heads: (HF folder, its F32 GGUF)."""
    hf = make_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", smollm2_tokenizer)
    f32 = hf.parent / "f32.gguf"
    convert(hf, f32, mix("F32"))
    return hf, f32


@pytest.fixture(scope="module")
def tiny_gqa4(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """As `tiny` with 4 query heads per key/value head, and tied embeddings."""
    hf = make_llama_checkpoint(
        tmp_path_factory.mktemp("gqa4") / "hf", smollm2_tokenizer, n_head=4, n_head_kv=1, tied=True, seed=1
    )
    f32 = hf.parent / "f32.gguf"
    convert(hf, f32, mix("F32"))
    return hf, f32


def assert_same_file(ours: Path, theirs: Path) -> None:
    expected, got = gguf_tensors(theirs), gguf_tensors(ours)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name][:2] == expected[name][:2], (name, got[name][0], expected[name][0])
        assert got[name][2] == expected[name][2], f"{name} ({got[name][0]}): bytes differ"


@pytest.mark.parametrize("type_name", LOW_BIT)
def test_tiny_model_matches_llama_quantize(tiny: tuple[Path, Path], type_name: str, tmp_path: Path) -> None:
    hf, f32 = tiny
    convert(hf, tmp_path / "slim.gguf", mix(type_name))
    llama_quantize(f32, tmp_path / "llama.gguf", type_name)
    assert_same_file(tmp_path / "slim.gguf", tmp_path / "llama.gguf")


@pytest.mark.parametrize("type_name", ["Q2_K", "IQ4_XS"])
def test_wide_gqa_and_tied_model_matches_llama_quantize(
    tiny_gqa4: tuple[Path, Path], type_name: str, tmp_path: Path
) -> None:
    hf, f32 = tiny_gqa4
    convert(hf, tmp_path / "slim.gguf", mix(type_name))
    llama_quantize(f32, tmp_path / "llama.gguf", type_name)
    assert_same_file(tmp_path / "slim.gguf", tmp_path / "llama.gguf")
    types = {name: t for name, (t, _, _) in gguf_tensors(tmp_path / "slim.gguf").items()}
    assert types["blk.0.attn_v.weight"] == {"Q2_K": "Q4_K", "IQ4_XS": "Q5_K"}[type_name]
    assert types["token_embd.weight"] == "Q6_K"  # tied: the output's type


def test_q3_k_m_bumps_as_llama_quantize_documents(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    convert(tiny[0], tmp_path / "m.gguf", mix("Q3_K_M"))
    types = {name: t for name, (t, _, _) in gguf_tensors(tmp_path / "m.gguf").items()}
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q3_K"
    assert types["blk.1.attn_v.weight"] == "Q5_K" and types["blk.2.attn_v.weight"] == "Q4_K"
    assert types["blk.0.attn_output.weight"] == "Q4_K" and types["blk.5.ffn_down.weight"] == "Q4_K"


@pytest.fixture(scope="module")
def tiny_imatrix(tiny: tuple[Path, Path]) -> Path:
    """A random importance matrix covering every weight of `tiny` but the embeddings and output."""
    rng = np.random.default_rng(5)
    sums, counts = {}, {}
    for name, (_, shape, _) in gguf_tensors(tiny[1]).items():
        if name.startswith("blk.") and name.endswith(".weight") and len(shape) == 2:
            sums[name] = (rng.lognormal(0, 1.5, shape[0]) * 10).astype(np.float32)
            counts[name] = 10
    path = tiny[1].parent / "tiny.imatrix.gguf"
    Calibration(sums=sums, counts=counts, chunk_size=512, chunk_count=10).save(path)
    return path


@pytest.mark.parametrize("type_name", ["Q2_K_S", "Q3_K_M", "IQ4_XS", "IQ3_XS", "IQ2_M", "IQ1_S"])
def test_with_imatrix_matches_llama_quantize(
    tiny: tuple[Path, Path], tiny_imatrix: Path, llama_tool: Callable[[str], Path], type_name: str, tmp_path: Path
) -> None:
    hf, f32 = tiny
    theirs = tmp_path / "llama.gguf"
    binary = llama_tool("llama-quantize")
    subprocess.run(
        [str(binary), "--imatrix", str(tiny_imatrix), str(f32), str(theirs), type_name, "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    convert(hf, tmp_path / "slim.gguf", mix(type_name), imatrix=tiny_imatrix)
    assert_same_file(tmp_path / "slim.gguf", theirs)


@pytest.mark.parametrize("type_name", ["Q2_K_S", "IQ3_XXS", "IQ2_XXS", "IQ1_M"])
def test_without_an_imatrix_is_refused(tiny: tuple[Path, Path], type_name: str, tmp_path: Path) -> None:
    """As llama-quantize: the 1- and 2-bit lattices, IQ3_XXS, and Q2_K in a Q2_K_S file need one."""
    result = run_slim("convert", str(tiny[0]), "-o", str(tmp_path / "m.gguf"), "-q", "--type", type_name)
    assert_clean_failure(result, tmp_path / "m.gguf", f"--type {type_name} needs an importance matrix")
    assert "slim calibrate" in result.stderr


# ---- llama-quantize's per-tensor flags ---------------------------------------------------------------

OVERRIDE_RUNS = {
    "patterns": (
        "Q3_K_M",
        ["--tensor-type", "ffn_down=Q5_K", "--tensor-type", r"blk\.[0-3]\.attn_k=q8_0"]
        + ["--output-tensor-type", "Q4_K", "--token-embedding-type", "q5_0"],
    ),
    "pure": ("Q4_K_M", ["--pure", "--leave-output-tensor"]),
}


@pytest.mark.parametrize("run", list(OVERRIDE_RUNS))
def test_overrides_match_llama_quantize(
    tiny: tuple[Path, Path], llama_tool: Callable[[str], Path], run: str, tmp_path: Path
) -> None:
    type_name, flags = OVERRIDE_RUNS[run]
    hf, f32 = tiny
    theirs = tmp_path / "llama.gguf"
    binary = llama_tool("llama-quantize")
    subprocess.run([str(binary), *flags, str(f32), str(theirs), type_name, "1"], capture_output=True, check=True)
    result = run_slim("convert", str(hf), "-o", str(tmp_path / "slim.gguf"), "--type", type_name, "-q", *flags)
    assert result.returncode == 0, result.stderr
    assert_same_file(tmp_path / "slim.gguf", theirs)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--tensor-type", "attn_v"], "must read PATTERN=TYPE"),
        (["--tensor-type", "attn_v=Q9_K"], "unknown tensor type 'Q9_K'"),
        (["--output-tensor-type", "nope"], "--output-tensor-type: unknown tensor type"),
        (["--tensor-type", "attn_(v=Q8_0"], "is not a regular expression"),
        (["--tensor-type", "attn_vv=Q8_0"], "matches no tensor of this model"),
        (["--token-embedding-type", "Q2_K", "--type", "Q4_0"], None),
    ],
)
def test_bad_overrides_fail_in_one_line(
    tiny: tuple[Path, Path], flags: list[str], words: str | None, tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    result = run_slim("convert", str(tiny[0]), "-o", str(out), "-q", *flags)
    if words is None:  # a valid override: the embeddings' rows of 256 fit Q2_K
        assert result.returncode == 0, result.stderr
        return
    assert_clean_failure(result, out, words)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K_M", "TQ2_0"])
def test_real_model_matches_llama_quantize(
    smollm2_converted: Callable[[str], Path], smollm2_f32: Path, type_name: str, tmp_path: Path
) -> None:
    """SmolLM2's rows of 576 do not fit 256-weight blocks: the Q4_0 fallback carries most of it."""
    llama_quantize(smollm2_f32, tmp_path / "llama.gguf", type_name)
    assert_same_file(smollm2_converted(type_name), tmp_path / "llama.gguf")
