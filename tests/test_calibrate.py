"""slim calibrate: the importance matrix equals llama-imatrix's, in a file llama.cpp's tools read."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import run_slim as slim

from slim.runtime.pipeline.calibrate import Calibration, CalibrationError, calibrate

CTX = 128
CHUNKS = 3


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slim.runtime.store import assets

    path = tmp_path_factory.mktemp("calibrate") / "train.txt"
    path.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ours(smollm2_gguf: Path, calibration_text: Path) -> Calibration:
    return calibrate(
        smollm2_gguf,
        calibration_text.read_text(encoding="utf-8"),
        ctx=CTX,
        chunks=CHUNKS,
        threads=1,
        hidden_states=True,
    )


def test_equals_llama_imatrix(
    smollm2_gguf: Path, calibration_text: Path, ours: Calibration, llama_tool: Callable[[str], Path], tmp_path: Path
) -> None:
    """llama-imatrix (built once from the vendored sources) on the same model, text and chunking."""
    binary = llama_tool("llama-imatrix")
    theirs_path = tmp_path / "theirs.imatrix.gguf"
    subprocess.run(
        [
            str(binary),
            "-m",
            str(smollm2_gguf),
            "-f",
            str(calibration_text),
            "-o",
            str(theirs_path),
            "-c",
            str(CTX),
            "-b",
            str(CTX),
            "--chunks",
            str(CHUNKS),
            "-t",
            "1",
            "--no-ppl",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = Calibration.load(theirs_path)
    assert sorted(theirs.sums) == sorted(ours.sums)
    assert len(ours.sums) == 210  # SmolLM2's 30 blocks x 7 matmul weights; output.weight is not asked for
    assert theirs.counts == ours.counts == {name: CTX * CHUNKS for name in ours.sums}
    assert (theirs.chunk_count, theirs.chunk_size) == (ours.chunk_count, ours.chunk_size) == (CHUNKS, CTX)
    for name in ours.sums:
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=1e-3, err_msg=name)


def test_equals_llama_imatrix_at_its_defaults_with_a_short_last_group(
    smollm2_gguf: Path, calibration_text: Path, llama_tool: Callable[[str], Path], tmp_path: Path
) -> None:
    """llama-imatrix at its own batch sizes (-b 2048 -ub 512: 4 chunks of 512 per decode) over 3 chunks,
    fewer than a whole group: llama.cpp splits each 512-row compute pass evenly over the 3 sequences,
    the last pass holds 2 rows of each, and llama-imatrix skips passes under 16 rows. slim keeps the
    same layout, so the counts, the chunk count it derives from them and the sums agree."""
    theirs_path = tmp_path / "theirs.imatrix.gguf"
    command = [str(llama_tool("llama-imatrix")), "-m", str(smollm2_gguf), "-f", str(calibration_text)]
    command += ["-o", str(theirs_path), "-c", "512", "--chunks", "3", "-t", "1", "--no-ppl"]
    subprocess.run(command, capture_output=True, text=True, check=True)
    theirs = Calibration.load(theirs_path)
    ours = calibrate(smollm2_gguf, calibration_text.read_text(encoding="utf-8"), ctx=512, chunks=3, threads=1)
    assert set(theirs.counts.values()) == set(ours.counts.values()) == {3 * 512 - 6}
    assert theirs.chunk_count == ours.chunk_count == 2  # whole chunks' worth of counted rows
    for name in ours.sums:
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=1e-3, err_msg=name)


def test_file_round_trip(ours: Calibration, tmp_path: Path) -> None:
    path = tmp_path / "m.imatrix.gguf"
    ours.save(path)
    loaded = Calibration.load(path)
    assert loaded.counts == ours.counts and loaded.chunk_count == CHUNKS and loaded.chunk_size == CTX
    for name, sums in ours.sums.items():
        np.testing.assert_array_equal(loaded.sums[name], sums.astype(np.float32))
        # llama-quantize's importance: float32 sum / float32 count
        np.testing.assert_array_equal(loaded.mean_squares(name), sums.astype(np.float32) / np.float32(CTX * CHUNKS))
    assert not list(tmp_path.glob(".*partial"))


def test_statistics_are_what_wanda_and_layer_pruning_need(ours: Calibration) -> None:
    ffn_down = ours.mean_squares("blk.3.ffn_down.weight")
    attn_q = ours.mean_squares("blk.3.attn_q.weight")
    assert ffn_down.shape == (1536,) and attn_q.shape == (576,)
    assert (attn_q > 0).all() and np.isfinite(ffn_down).all()
    # q, k and v see the same normalised input
    np.testing.assert_array_equal(attn_q, ours.mean_squares("blk.3.attn_k.weight"))
    cos = ours.hidden_cosine
    assert cos is not None and cos.shape == (31, 31)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-9)
    np.testing.assert_allclose(cos, cos.T, atol=1e-12)
    # neighbouring blocks change the stream less than the whole stack does
    assert np.diag(cos, 1)[1:-1].mean() > cos[1, 30]


def test_cli_writes_the_file_and_reports(smollm2_gguf: Path, calibration_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.imatrix.gguf"
    run = slim(
        "calibrate",
        str(smollm2_gguf),
        "--text",
        str(calibration_text),
        "-o",
        str(out),
        "--ctx",
        str(CTX),
        "--chunks",
        "1",
        "--threads",
        "1",
    )
    assert run.returncode == 0, run.stderr
    assert f"210 weights, 1 chunk of {CTX} tokens" in run.stdout
    assert Calibration.load(out).counts["blk.0.ffn_up.weight"] == CTX


def test_bad_input_is_one_clear_line(smollm2_gguf: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.", encoding="utf-8")
    out = tmp_path / "x.imatrix.gguf"
    run = slim("calibrate", str(smollm2_gguf), "--text", str(short), "-o", str(out), "--threads", "1")
    assert run.returncode == 2 and run.stderr.startswith("error: the calibration text is")
    assert "Traceback" not in run.stderr and not out.exists()

    run = slim("calibrate", str(tmp_path / "missing.gguf"), "--text", str(short), "-o", str(out))
    assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr

    with pytest.raises(CalibrationError, match="not an importance matrix"):
        Calibration.load(smollm2_gguf)


# ---- slim convert --imatrix ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def imatrix_file(ours: Calibration, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imatrix") / "smollm2.imatrix.gguf"
    ours.save(path)
    return path


@pytest.mark.parametrize("mix_name", ["Q4_K_M", "Q5_K_M", "Q4_0", "Q4_1"])
def test_convert_with_imatrix_equals_llama_quantize(
    smollm2_hf: Path,
    smollm2_f32: Path,
    imatrix_file: Path,
    llama_tool: Callable[[str], Path],
    mix_name: str,
    tmp_path: Path,
) -> None:
    """Byte for byte what llama-quantize --imatrix writes from the same file. On SmolLM2 these mixes
    use all seven importance-weighted types: Q4_K, Q5_K, Q6_K on the 1536-wide ffn_down, Q5_0 and
    Q5_1 as the K-quants' fallback for 576-wide rows, Q4_0 and the Q4_1 llama-quantize puts on the
    first ffn_down layers when it has an importance matrix."""
    from helpers import gguf_tensors

    from slim.runtime.formats.mixes import mix
    from slim.runtime.pipeline.convert import convert

    binary = llama_tool("llama-quantize")
    theirs = tmp_path / "theirs.gguf"
    subprocess.run(
        [str(binary), "--imatrix", str(imatrix_file), str(smollm2_f32), str(theirs), mix_name, "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    mine = tmp_path / "mine.gguf"
    summary = convert(smollm2_hf, mine, mix(mix_name), imatrix=imatrix_file, backend="numpy", threads=1)
    assert summary.imatrix == str(imatrix_file)
    expected, got = gguf_tensors(theirs), gguf_tensors(mine)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name] == expected[name], name


def test_convert_imatrix_c_path_equals_numpy(
    smollm2_hf: Path, smollm2_converted: Callable[[str], Path], imatrix_file: Path, tmp_path: Path
) -> None:
    from helpers import gguf_tensors

    from slim.runtime.formats.mixes import mix
    from slim.runtime.pipeline.convert import convert

    convert(smollm2_hf, tmp_path / "c.gguf", mix("Q4_K_M"), imatrix=imatrix_file, backend="ggml")
    with_imatrix, plain = gguf_tensors(tmp_path / "c.gguf"), gguf_tensors(smollm2_converted("Q4_K_M"))
    # the importance changes the quantized weights it covers, and only those
    assert with_imatrix["blk.0.ffn_down.weight"] != plain["blk.0.ffn_down.weight"]
    assert with_imatrix["token_embd.weight"] == plain["token_embd.weight"]


def test_convert_rejects_a_wrong_imatrix(smollm2_hf: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    run = slim("convert", str(smollm2_hf), "-o", str(out), "--imatrix", str(smollm2_gguf))
    assert run.returncode == 2 and "not an importance matrix" in run.stderr and not out.exists()

    run = slim("convert", str(smollm2_hf), "-o", str(out), "--imatrix", str(tmp_path / "none.gguf"))
    assert run.returncode == 2 and "does not exist" in run.stderr and not out.exists()

    other = Calibration(sums={"blk.0.ffn_down.weight": np.ones(64)}, counts={"blk.0.ffn_down.weight": 1})
    other.save(tmp_path / "other.imatrix.gguf")
    run = slim("convert", str(smollm2_hf), "-o", str(out), "--imatrix", str(tmp_path / "other.imatrix.gguf"))
    assert run.returncode == 2 and "made for a different model" in run.stderr and not out.exists()
    assert "Traceback" not in run.stderr
