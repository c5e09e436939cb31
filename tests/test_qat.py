"""slim qat: the grid read from blocks is the dequantizer's, new codes change only the code bits,
and the exported GGUF holds exactly the weights the last forward pass used, for every type a mix
can pick; llama.cpp runs it to the torch forward's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import llama_logits, make_llama_checkpoint, run_slim

from slim import kernels
from slim.kernels import grid as grids
from slim.runtime.formats.gguf_file import open_gguf, tensor_array
from slim.runtime.formats.mixes import mix

torch = pytest.importorskip("torch")

from slim.runtime.train import distill as distill_lib  # noqa: E402  (needs torch)
from slim.runtime.train import qat as qat_lib  # noqa: E402
from slim.runtime.train import student as student_lib  # noqa: E402


@pytest.mark.parametrize("qtype", grids.TYPES)
def test_grid_is_the_dequantizer_and_new_codes_land_exactly(qtype: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_t(5, size=(6, 512)) * 0.02).astype(np.float32)
    x[0, :256] = 0  # an all-zero block: step 0 where the type stores it so
    data = kernels.quantize(x, qtype, backend="numpy")
    grid, codes = grids.grid(data, qtype, x.shape)
    assert np.array_equal(grid.values(codes), kernels.dequantize(data, qtype, x.shape))
    assert np.array_equal(grids.with_codes(data, qtype, codes), data)
    new = rng.integers(grid.low, grid.high + 1, size=codes.shape)
    rewritten = grids.with_codes(data, qtype, new)
    assert np.array_equal(kernels.dequantize(rewritten, qtype, x.shape), grid.values(new))
    assert np.array_equal(grids.grid(rewritten, qtype, x.shape)[1], new)
    cls = kernels.qtype(qtype)
    before, after = data.reshape(-1, cls.type_size), rewritten.reshape(-1, cls.type_size)
    changed = (before != after).any(axis=0)
    scale_bytes = {
        "Q8_0": slice(0, 2),
        "Q4_0": slice(0, 2),
        "Q5_0": slice(0, 2),
        "Q4_1": slice(0, 4),
        "Q5_1": slice(0, 4),
        "Q4_K": slice(0, 16),
        "Q5_K": slice(0, 16),
        "Q6_K": slice(192, 210),
    }[qtype]
    assert not changed[scale_bytes].any()  # only code bits moved
    with pytest.raises(ValueError, match="codes must lie in"):
        grids.with_codes(data, qtype, new + grid.high + 1)


def test_the_gradient_passes_straight_through() -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 64)) * 0.05).astype(np.float32)
    grid, _ = grids.grid(kernels.quantize(w, "Q4_0"), "Q4_0", w.shape)
    on_grid = qat_lib.OnGrid(grid)
    weight = torch.from_numpy(w).requires_grad_(True)
    rounded = on_grid(weight)
    assert np.array_equal(rounded.detach().numpy(), kernels.dequantize(kernels.quantize(w, "Q4_0"), "Q4_0", w.shape))
    upstream = torch.randn(4, 64)
    rounded.backward(upstream)
    assert torch.equal(weight.grad, upstream)


@pytest.fixture(scope="module")
def tiny_256(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 and 512: the K-quants fit."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("tiny256") / "hf", smollm2_tokenizer, hidden=256, n_layer=1, ffn=512, tied=True
    )


@pytest.fixture(scope="module")
def tiny_64(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 64 and 128, as SmolLM2's 576: the K-quants fall back to Q5_0 and Q8_0."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("tiny64") / "hf", smollm2_tokenizer, hidden=64, n_layer=2, ffn=128, tied=False
    )


@pytest.mark.parametrize(
    "mix_name, model, types",
    [
        ("Q4_K_M", "tiny_256", {"Q4_K", "Q6_K"}),
        ("Q5_K_M", "tiny_256", {"Q5_K", "Q6_K"}),
        ("Q4_K_M", "tiny_64", {"Q5_0", "Q8_0"}),
        ("Q4_0", "tiny_64", {"Q4_0", "Q8_0"}),
        ("Q4_1", "tiny_64", {"Q4_1", "Q8_0"}),
        ("Q5_1", "tiny_64", {"Q5_1", "Q8_0"}),
    ],
)
def test_exported_gguf_holds_exactly_the_trained_weights(
    mix_name: str, model: str, types: set[str], tiny_256: Path, tiny_64: Path, tmp_path: Path
) -> None:
    source = {"tiny_256": tiny_256, "tiny_64": tiny_64}[model]
    student = student_lib.load(source)
    plan = qat_lib.type_plan(student, mix(mix_name))
    attached = qat_lib.attach_grids(student, plan)
    rng = np.random.default_rng(0)
    targets = distill_lib.Targets(rng.integers(0, 49152, (4, 32)))
    teacher = student_lib.load(source).requires_grad_(False)  # online: the unquantized model
    options = distill_lib.Options(steps=2, batch_size=2, seq_len=32, lr=1e-2, warmup=1, threads=1)
    distill_lib.train(student, targets, options, tmp_path / "ckpt", teacher=teacher)
    out = tmp_path / "qat.gguf"
    qat_lib.write_gguf(student, source, qat_lib.final_blocks(student, attached), plan, out)

    state = student.hf_state()
    found = set()
    moved = 0
    for tensor in open_gguf(out).tensors:
        name = student.arch.hf_name(tensor.name)
        forward = student.arch.to_gguf(tensor.name, state[name].detach().numpy())
        assert np.array_equal(tensor_array(tensor), forward), tensor.name  # exactly, in float32
        found.add(tensor.tensor_type.name)
        if name in attached:
            initial = kernels.dequantize(attached[name][2], attached[name][1], forward.shape)
            moved += int((student.arch.to_hf(tensor.name, forward) != initial).sum())
    assert found - {"F32"} == types
    assert moved > 0  # training changed codes: the file is not the post-training quantization

    tokens = list(targets.tokens[0])
    with torch.no_grad():
        ours = student(torch.tensor([tokens]))[0].numpy()
        unquantized = teacher(torch.tensor([tokens]))[0].numpy()
    theirs = llama_logits(out, tokens, exact=True)
    # llama.cpp rounds activations to 8 bits in quantized matmuls: close, and closer than the float model
    assert np.abs(theirs - ours).max() < 0.03 * np.abs(ours).max()
    assert np.abs(theirs - ours).mean() < np.abs(theirs - unquantized).mean()


@pytest.mark.parametrize("model", ["tiny_256", "tiny_64"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_training_starts_from_exactly_the_post_training_quantization(
    model: str, with_imatrix: bool, tiny_256: Path, tiny_64: Path, tmp_path: Path
) -> None:
    """Untrained, the grids give back slim convert's blocks byte for byte: QAT starts where
    post-training quantization ends (with the importance matrix too), even where the quantizer's
    codes are not the nearest ones."""
    from slim.runtime.pipeline.calibrate import calibrate
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.store import assets

    source = {"tiny_256": tiny_256, "tiny_64": tiny_64}[model]
    imatrix, calibration = None, None
    if with_imatrix:
        convert(source, tmp_path / "f32.gguf", mix("F32"))
        calibration = calibrate(
            tmp_path / "f32.gguf",
            assets.wiki_text("train").read_text(encoding="utf-8")[:3000],
            ctx=64,
            chunks=4,
            threads=1,
        )
        imatrix = tmp_path / "tiny.imatrix.gguf"
        calibration.save(imatrix)
    student = student_lib.load(source)
    plan = qat_lib.type_plan(student, mix("Q4_K_M"), has_imatrix=calibration is not None)
    blocks = qat_lib.final_blocks(student, qat_lib.attach_grids(student, plan, calibration))
    convert(source, tmp_path / "ptq.gguf", mix("Q4_K_M"), imatrix=imatrix)
    for tensor in open_gguf(tmp_path / "ptq.gguf").tensors:
        if tensor.name in blocks:
            assert np.array_equal(blocks[tensor.name].reshape(-1), np.asarray(tensor.data).reshape(-1).view(np.uint8))
    assert len(blocks) == sum(t.tensor_type.name != "F32" for t in open_gguf(tmp_path / "ptq.gguf").tensors)
    if with_imatrix:  # the importance matrix did change the starting point
        plain_student = student_lib.load(source)
        plain_plan = qat_lib.type_plan(plain_student, mix("Q4_K_M"))
        plain = qat_lib.final_blocks(plain_student, qat_lib.attach_grids(plain_student, plain_plan))
        assert any(not np.array_equal(plain[name], blocks[name]) for name in blocks)


def test_qat_cli_writes_a_gguf_of_the_mix(tiny_64: Path, tmp_path: Path) -> None:
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.store import assets

    text = tmp_path / "train.txt"
    text.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    out = tmp_path / "qat.gguf"
    run = run_slim(
        "qat",
        str(tiny_64),
        "--type",
        "Q4_K_M",
        "--text",
        str(text),
        "-o",
        str(out),
        "--steps",
        "3",
        "--seq-len",
        "64",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--json",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["steps"] == 3 and summary["output"] == str(out)
    ptq = tmp_path / "ptq.gguf"
    convert(tiny_64, ptq, mix("Q4_K_M"))
    assert out.stat().st_size == ptq.stat().st_size
    ours = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert ours == {t.name: t.tensor_type.name for t in open_gguf(ptq).tensors}
    assert not list(tmp_path.glob(".qat.gguf*"))  # no temporary files left behind

    bad = run_slim("qat", str(tiny_64), "--type", "F16", "--text", str(text), "-o", str(tmp_path / "f16.gguf"))
    assert (
        bad.returncode == 2
        and bad.stderr == "error: F16 is not quantized; QAT needs a quantized --type such as Q4_K_M\n"
    )


def test_a_run_that_cannot_improve_writes_the_starting_blocks(tiny_64: Path, tmp_path: Path) -> None:
    """Validated on held-out text, QAT keeps the best state it saw, the start included: a run
    whose steps change nothing ends with exactly the post-training file of the thorough search,
    and says so."""
    from helpers import gguf_tensors

    from slim.runtime.pipeline.convert import convert
    from slim.runtime.store import assets

    text = assets.wiki_text("train").read_text(encoding="utf-8")[:8000]
    out = tmp_path / "qat.gguf"
    summary = qat_lib.qat(
        tiny_64, mix("Q4_K_M"), text, out, steps=2, lr=1e-12, seq_len=64, threads=1, cache_dir=tmp_path / "cache"
    )
    assert summary.best_step == 0 and summary.heldout_kl_after == summary.heldout_kl_before > 0
    assert "training never beat the starting point" in summary.line()
    convert(tiny_64, tmp_path / "ptq.gguf", mix("Q4_K_M"), search="thorough")
    assert gguf_tensors(out) == gguf_tensors(tmp_path / "ptq.gguf")
