"""slim convert --target-size / --max-kld (pipeline/target.py) and the quality written into GGUFs.

The solver is checked on made-up prices (fast); the probes against llama.cpp itself: a probe that
rewrites a tensor in place in the loaded model's file must see what a fresh load of a file holding
those values sees, and leave the file as it was. End to end on a tiny random-weight Llama with the
real tokenizer: the file fits the size, loads in llama.cpp, and carries its measured quality, which
`slim show`, `slim list` and /v1/models report. The real model's figures (KL against llama-quantize's
mixes at the same size) are benchmarks/target_size.py's, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from helpers import gguf_tensors, make_llama_checkpoint, run_slim, serving

from slim import kernels
from slim.runtime.formats import mixes
from slim.runtime.formats.quality import Quality, from_metadata, read_quality, write_quality
from slim.runtime.inference.evaluate import evaluate
from slim.runtime.pipeline import target
from slim.runtime.pipeline.calibrate import calibrate
from slim.runtime.pipeline.convert import convert, planned_tensors
from slim.runtime.store import assets

# ---- the size and the solver: no model --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4.5bpw", target.Target(bits_per_weight=4.5)),
        ("95MB", target.Target(size_bytes=95_000_000)),
        ("90.5 MiB", target.Target(size_bytes=int(90.5 * 2**20))),
        ("1.2gb", target.Target(size_bytes=1_200_000_000)),
        ("123456B", target.Target(size_bytes=123456)),
    ],
)
def test_parse_size(text: str, expected: target.Target) -> None:
    assert target.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "95", "MB", "-3MB", "4.5 bits", "nanMB", "0.5bpw", "40bpw", "1e400GB"])
def test_parse_size_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(target.TargetError, match="--target-size"):
        target.parse_size(text)


def _measurement(seed: int = 0, n: int = 40) -> target.Measurement:
    """Made-up prices: each tensor's KL falls with its type's bytes, by a sensitivity of its own."""
    rng = np.random.default_rng(seed)
    kinds = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F16": 16}
    costs = []
    for i in range(n):
        elements = int(rng.integers(1, 50)) * 4096
        sensitivity = float(rng.lognormal(-6, 1.5))
        options = {q: (int(elements * bits / 8), sensitivity * 4.0 ** -(bits - 2)) for q, bits in kinds.items()}
        costs.append(target.TensorCost(f"blk.{i}.w", elements, "Q3_K", options["Q3_K"][1], options))
    return target.Measurement(costs, {"norm": ("F32", 4096)}, sum(c.elements for c in costs) + 1024, 50_000, 32, 0, 0)


def test_solve_spends_the_budget_and_no_more() -> None:
    measurement = _measurement()
    losses = []
    for bits in (3.0, 4.0, 4.5, 5.0, 6.0):
        choice = target.solve(measurement, target.Target(bits_per_weight=bits))
        assert choice.bits_per_weight <= bits
        assert choice.bits_per_weight > bits - 0.1  # the greedy pass leaves little unspent
        assert choice.predicted_kl == pytest.approx(sum(choice.tensor_kl.values()))
        losses.append(choice.predicted_kl)
    assert losses == sorted(losses, reverse=True)


def test_solve_to_a_file_size_counts_the_header_and_padding() -> None:
    measurement = _measurement()
    size = target.solve(measurement, target.Target(bits_per_weight=4.5)).size_bytes
    choice = target.solve(measurement, target.Target(size_bytes=size))
    assert choice.size_bytes <= size


def test_solve_beats_every_uniform_type_at_its_own_size() -> None:
    measurement = _measurement(seed=1)
    for qtype in ("Q3_K", "Q4_K", "Q5_K"):
        uniform = [cost.options[qtype] for cost in measurement.tensors]
        bits = 8 * (sum(n for n, _ in uniform) + 4096) / measurement.n_params
        choice = target.solve(measurement, target.Target(bits_per_weight=bits))
        assert choice.predicted_kl < sum(kl for _, kl in uniform)


def test_solve_to_a_kl_bound_takes_the_smallest_plan_that_meets_it() -> None:
    measurement = _measurement(seed=2)
    choice = target.solve(measurement, target.Target(max_kl=1e-3))
    assert choice.predicted_kl <= 1e-3
    looser = target.solve(measurement, target.Target(max_kl=1e-2))
    assert looser.size_bytes < choice.size_bytes
    # the same bytes as a size target cannot do better than the bound's plan by much
    sized = target.solve(measurement, target.Target(bits_per_weight=choice.bits_per_weight))
    assert sized.predicted_kl <= choice.predicted_kl


def test_solve_refuses_targets_no_plan_meets() -> None:
    measurement = _measurement()
    with pytest.raises(target.TargetError, match="below the smallest file"):
        target.solve(measurement, target.Target(bits_per_weight=1.5))
    with pytest.raises(target.TargetError, match="raise --max-kld"):
        target.solve(measurement, target.Target(max_kl=1e-30))


def test_joint_probes_map_summed_predictions_to_the_model_kl() -> None:
    measurement = _measurement()
    assert measurement.predicted(0.02) == 0.02  # no joint probes: the sum itself
    measurement.joint = [(0.10, 0.30), (0.01, 0.02)]  # errors compound: K grows faster than S
    assert measurement.predicted(0.10) == pytest.approx(0.30)
    assert measurement.predicted(0.01) == pytest.approx(0.02)
    assert 0.02 < measurement.predicted(0.03) < 0.30
    assert measurement.predicted(measurement.summed_for(0.05)) == pytest.approx(0.05, rel=1e-6)
    # a bound is met on the model's predicted KL, not on the sum
    choice = target.solve(measurement, target.Target(max_kl=1e-3))
    assert choice.predicted_kl <= 1e-3 * (1 + 1e-9)
    assert choice.predicted_kl == pytest.approx(sum(choice.tensor_kl.values()))
    # llama.cpp's 8-bit activations add a floor that no choice of weight types removes
    measurement.floor = 5e-4
    assert measurement.predicted(0.01) == pytest.approx(0.0205)
    choice = target.solve(measurement, target.Target(max_kl=1e-3))
    assert choice.predicted_kl == pytest.approx(choice.floor_kl + sum(choice.tensor_kl.values()))
    assert choice.predicted_kl <= 1e-3 * (1 + 1e-9)
    with pytest.raises(target.TargetError, match="quantized matmuls alone add 0.0005"):
        target.solve(measurement, target.Target(max_kl=4e-4))


def test_file_type_follows_the_most_weights() -> None:
    types = {"a": "Q4_K", "b": "Q6_K", "c": "F32"}
    assert target.file_type(types, {"a": 100, "b": 50, "c": 1000}).name == "Q4_K_M"
    assert target.file_type(types, {"a": 10, "b": 50, "c": 1000}).name == "Q6_K"


# ---- against llama.cpp: a tiny random-weight Llama with the real tokenizer ----------------------


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # rows of 256 (every K-quant fits) and 384 (only 32-weight blocks do), as SmolLM2 mixes them
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("target") / "hf", smollm2_tokenizer, hidden=256, n_layer=2, ffn=384, n_head=4
    )


@pytest.fixture(scope="module")
def text() -> str:
    return assets.wiki_text("train").read_text(encoding="utf-8")[:40_000]


def _probe_kl(model_path: Path, text: str, reference: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """KL of `model_path` from `reference` on the probe window, scored as the probes score it."""
    from slim.runtime import inference
    from slim.runtime.inference.evaluate import chunk_tokens, log_softmax

    model = inference.load(model_path, n_ctx=target.PROBE_CTX, n_batch=target.PROBE_CTX, n_threads=1)
    try:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        chunk = chunk_tokens(tokens, target.PROBE_CTX, model.prompt_bos)[0]
        log_q = log_softmax(model.logits(chunk, target.PROBE_FIRST)[:-1])
    finally:
        model.close()
    if reference is None:
        return 0.0, log_q
    return float((np.exp(reference) * (reference - log_q)).sum(-1).mean()), log_q


def test_probe_in_place_equals_a_fresh_file(tiny: Path, text: str, tmp_path: Path) -> None:
    """The probes rewrite tensors in the file llama.cpp has mapped; a fresh load of a file holding the
    same values must give the same KL, and the file must end as it began."""
    import gguf

    reference = tmp_path / "f16.gguf"
    convert(tiny, reference, mixes.mix("F16"))
    before = hashlib.sha256(reference.read_bytes()).hexdigest()
    _, planned = planned_tensors(tiny, mixes.mix("Q4_K_M"), None)
    names = ("blk.1.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight")
    chosen = [item for item in planned if item.gguf_name in names]
    measurement = target.measure(reference, chosen, text, threads=1)
    assert hashlib.sha256(reference.read_bytes()).hexdigest() == before

    _, reference_log_p = _probe_kl(reference, text)
    offsets = {t.name: int(t.data_offset) for t in gguf.GGUFReader(reference).tensors}
    for item, cost in zip(chosen, measurement.tensors, strict=True):
        assert cost.name == item.gguf_name
        assert cost.probe_type == ("Q3_K" if item.shape[-1] % 256 == 0 else "Q4_0")
        values = np.asarray(item.load(), dtype=np.float32)
        stored = kernels.quantize(values, cost.probe_type)
        round_trip = kernels.dequantize(stored, cost.probe_type, values.shape).astype(np.float16)
        fresh = tmp_path / f"{item.gguf_name}.gguf"
        fresh.write_bytes(reference.read_bytes())
        with fresh.open("r+b") as file:
            file.seek(offsets[item.gguf_name])
            file.write(round_trip.tobytes())
        fresh_kl, _ = _probe_kl(fresh, text, reference_log_p)
        assert fresh_kl > 0
        assert cost.probe_kl == pytest.approx(fresh_kl, rel=1e-3)  # the probes sum in float32
        # the probe type's predicted cost is the measurement; the other types scale with their error
        fitting = {q for q in target.CANDIDATES if item.shape[-1] % kernels.QTYPES[q].block_size == 0}
        assert set(cost.options) == fitting
        assert cost.options[cost.probe_type][1] == pytest.approx(cost.probe_kl)
        assert cost.options["F16"][1] < cost.options["Q8_0"][1] < cost.options["Q4_0"][1]
        assert cost.options["Q8_0"][0] == int(np.prod(item.shape[:-1])) * item.shape[-1] // 32 * 34


@pytest.fixture(scope="module")
def work(tiny: Path, text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's F16, an importance matrix, llama-quantize's Q4_K_M with it, and the text."""
    folder = tmp_path_factory.mktemp("target-work")
    convert(tiny, folder / "f16.gguf", mixes.mix("F16"))
    calibrate(folder / "f16.gguf", text, chunks=4).save(folder / "tiny.imatrix.gguf")
    convert(tiny, folder / "q4_k_m.gguf", mixes.mix("Q4_K_M"), imatrix=folder / "tiny.imatrix.gguf")
    (folder / "text.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def sized(tiny: Path, work: Path) -> tuple[Path, dict]:
    """`slim convert --target-size` at the exact size of the same model's Q4_K_M with the imatrix."""
    out = work / "sized.gguf"
    limit = (work / "q4_k_m.gguf").stat().st_size
    result = run_slim(
        "convert", str(tiny), "-o", str(out), "--target-size", f"{limit}B", "--imatrix",
        str(work / "tiny.imatrix.gguf"), "--text", str(work / "text.txt"), "--json", "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout) | {"limit": limit}


def test_target_size_writes_a_file_within_the_size(sized: tuple[Path, dict]) -> None:
    out, report = sized
    assert out.stat().st_size == report["size_bytes"] <= report["limit"]
    assert report["size_bytes"] > 0.97 * report["limit"]  # and uses what it was given
    written = {name: qtype for name, (qtype, _, _) in gguf_tensors(out).items()}
    assert written == report["types"]
    assert len(set(written.values()) - {"F32"}) > 1  # a mix of types, not one
    assert set(report["tensor_kl"]) == {n for n, t in written.items() if t != "F32"}


def test_target_size_records_the_measured_quality(sized: tuple[Path, dict], work: Path, text: str) -> None:
    out, report = sized
    quality = read_quality(out)
    assert quality is not None and report["quality"].keys() == asdict(quality).keys()
    assert report["quality"]["kl_mean"] == pytest.approx(quality.kl_mean, rel=1e-6)
    assert (quality.text, quality.reference) == ("text.txt", "F16 of the source")
    assert quality.text_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert quality.predicted_kl == pytest.approx(report["predicted_kl"], rel=1e-6)
    # what the file records is what slim eval measures on it (it loads in llama.cpp: same numbers)
    measured, reference = evaluate(
        out, text, n_ctx=target.QUALITY_CTX, reference=work / "f16.gguf", chunks=target.QUALITY_CHUNKS
    )
    assert measured.divergence is not None and reference is not None
    assert quality.kl_mean == pytest.approx(measured.divergence.kl_mean, rel=1e-3)
    assert quality.perplexity == pytest.approx(measured.perplexity, rel=1e-4)
    assert quality.reference_perplexity == pytest.approx(reference.perplexity(), rel=1e-4)

    shown = run_slim("show", str(out))
    assert f"KL {quality.kl_mean:.4f} mean" in shown.stdout and "text.txt" in shown.stdout
    assert json.loads(run_slim("show", str(out), "--json").stdout)["quality"]["kl_mean"] == quality.kl_mean


def test_plan_only_prints_the_plan_and_writes_nothing(tiny: Path, work: Path) -> None:
    before = set(work.iterdir())
    result = run_slim(
        "convert", str(tiny), "--target-size", "5bpw", "--plan-only", "--imatrix", str(work / "tiny.imatrix.gguf"),
        "--text", str(work / "text.txt"), "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert set(work.iterdir()) == before
    assert not list(Path.cwd().glob("hf-5bpw.gguf"))
    lines = result.stdout.splitlines()
    assert any(line.startswith("blk.0.attn_v.weight ") for line in lines)
    assert any(line.startswith("planned: ") and "for 5 bits/weight" in line for line in lines)
    bits = float(next(line for line in lines if line.startswith("planned: ")).split(", ")[1].split()[0])
    assert 4.9 < bits <= 5.0


def test_max_kld_meets_the_bound_with_the_smallest_plan(tiny: Path, work: Path) -> None:
    q4 = read_measured(work, "q4_k_m.gguf")
    out = work / "bounded.gguf"
    result = run_slim(
        "convert", str(tiny), "-o", str(out), "--max-kld", f"{q4:.6g}", "--imatrix", str(work / "tiny.imatrix.gguf"),
        "--text", str(work / "text.txt"), "--json", "--threads", "1",
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert report["quality"]["kl_mean"] <= q4
    assert out.stat().st_size <= (work / "q4_k_m.gguf").stat().st_size * 1.02


def read_measured(work: Path, name: str) -> float:
    """The KL divergence of a file in `work` from the F16, measured as --target-size measures it."""
    report, _ = evaluate(
        work / name, (work / "text.txt").read_text(encoding="utf-8"), n_ctx=target.QUALITY_CTX,
        reference=work / "f16.gguf", chunks=target.QUALITY_CHUNKS,
    )  # fmt: skip
    assert report.divergence is not None
    return report.divergence.kl_mean


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-size", "5bpw", "--type", "Q8_0"], "--type does not go with --target-size"),
        (["--target-size", "5bpw", "--tensor-type", "attn_v=Q8_0"], "--tensor-type does not go with"),
        (["--target-size", "5bpw", "--max-kld", "0.1"], "not both"),
        (["--target-size", "five"], "give bits per weight like 4.5bpw"),
        (["--target-size", "10KB"], "below the smallest file"),
        (["--text", "x.txt"], "--text goes with --target-size or --max-kld"),
        (["--plan-only"], "--plan-only goes with"),
        (["--max-kld", "0.1", "--imatrix", "missing.gguf"], "importance matrix missing.gguf does not exist"),
    ],
)
def test_bad_targets_get_one_line(tiny: Path, work: Path, extra: list[str], message: str) -> None:
    measured = "--target-size" in extra or "--max-kld" in extra
    text = ["--text", str(work / "text.txt")] if measured else []
    result = run_slim("convert", str(tiny), "-o", str(work / "refused.gguf"), *extra, *text, "--threads", "1")
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (work / "refused.gguf").exists()


# ---- the quality in the file: written, kept, read ------------------------------------------------


def test_write_quality_keeps_every_tensor_and_key(work: Path, tmp_path: Path) -> None:
    import gguf

    quality = Quality(0.01, 0.1, 12.5, 12.0, "f16.gguf", "text.txt", "ab" * 32, 512, 2048)
    copy = tmp_path / "with-quality.gguf"
    write_quality(work / "q4_k_m.gguf", copy, quality)
    assert gguf_tensors(copy) == gguf_tensors(work / "q4_k_m.gguf")
    before = {f.name: f.contents() for f in gguf.GGUFReader(work / "q4_k_m.gguf").fields.values()}
    after = {f.name: f.contents() for f in gguf.GGUFReader(copy).fields.values()}
    kept = {k: v for k, v in after.items() if not k.startswith(("slim.quality.", "GGUF.kv_count"))}
    assert kept == {k: v for k, v in before.items() if k != "GGUF.kv_count"}
    assert read_quality(copy) == replace(quality, kl_mean=pytest.approx(0.01), kl_p99=pytest.approx(0.1))
    # written again, in place: replaced, not repeated
    write_quality(copy, copy, replace(quality, tokens=99))
    assert read_quality(copy).tokens == 99  # type: ignore[union-attr]
    assert from_metadata({"slim.quality.kl_mean": 0.1}) is None  # part of a record is none


def test_eval_write_metadata_then_list_and_serve_show_it(work: Path, tmp_path: Path) -> None:
    import openai

    model = tmp_path / "q4.gguf"
    model.write_bytes((work / "q4_k_m.gguf").read_bytes())
    assert run_slim("eval", str(model), "--text", str(work / "text.txt"), "--write-metadata").returncode == 2
    result = run_slim(
        "eval", str(model), "--text", str(work / "text.txt"), "--reference", str(work / "f16.gguf"),
        "--write-metadata", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)[0]["divergence"]["kl_mean"]
    quality = read_quality(model)
    assert quality is not None and quality.kl_mean == pytest.approx(measured, rel=1e-6)
    assert (quality.reference, quality.text) == ("f16.gguf", "text.txt")

    home = {"SLIM_HOME": str(tmp_path / "home")}
    assert run_slim("pull", str(model), "--name", "measured", env=home).returncode == 0
    listed = json.loads(run_slim("list", "--json", env=home).stdout)["models"]
    assert [row["kl_mean"] for row in listed if row["name"] == "measured"] == [pytest.approx(measured, rel=1e-6)]
    assert f"{quality.kl_mean:.4f}" in run_slim("list", env=home).stdout

    with serving({"measured": model, "plain": work / "q4_k_m.gguf"}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        entries = {entry.id: entry.model_extra for entry in client.models.list().data}
    assert entries["measured"]["quality"]["kl_mean"] == pytest.approx(measured, rel=1e-6)
    assert entries["plain"]["quality"] is None


def test_plan_only_for_a_mixture_of_experts(smollm2_tokenizer: Path, text: str, tmp_path: Path) -> None:
    """The stacked experts are probed as one tensor and priced per expert, each with its importance."""
    pytest.importorskip("transformers")
    from test_architectures import build_checkpoint

    checkpoint = build_checkpoint("qwen3_moe", tmp_path / "moe", smollm2_tokenizer)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    result = run_slim(
        "convert", str(checkpoint), "--target-size", "5bpw", "--plan-only", "--json", "--text",
        str(tmp_path / "text.txt"), "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] is None and 4.8 < report["bits_per_weight"] <= 5.0
    assert "blk.0.ffn_down_exps.weight" in report["tensor_kl"]
    assert report["types"]["blk.0.ffn_gate_inp.weight"] == "F32"  # the router stays as it is
