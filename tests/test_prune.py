"""slim prune: the zeroing rules on their own, and structured pruning proved against llama.cpp.

A removed FFN neuron or KV group contributes exactly what its down_proj / o_proj columns would
with those columns zeroed, and a removed block is the identity once its o_proj and down_proj are
zero (the residual stream passes through). So the smaller model must give the same logits in
llama.cpp as the original with those columns zeroed; and transformers must load it and agree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from helpers import llama_logits, make_llama_checkpoint, run_slim, tokenize

from slim import models
from slim.runtime.formats.checkpoint import Checkpoint, write_safetensors
from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.calibrate import Calibration, calibrate
from slim.runtime.pipeline.convert import convert
from slim.runtime.pipeline.export import export
from slim.runtime.pipeline.prune import (
    PruneError,
    check_amounts,
    choose_blocks,
    parse_pattern,
    plan_layers,
    plan_unstructured,
    plan_width,
    prune_checkpoint,
    sparsify,
)

SAMPLE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Rome of Italy. " * 3


def slim_prune(*args: str) -> subprocess.CompletedProcess[str]:
    return run_slim("prune", *args, "--threads", "1", "-q")


@pytest.fixture(scope="module")
def tiny_hf(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", smollm2_tokenizer, n_layer=4, ffn=512)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gguf") / "f32.gguf"
    convert(tiny_hf, path, mix("F32"))
    return path


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slim.runtime.store import assets

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_calibration(tiny_gguf: Path, calibration_file: Path) -> Calibration:
    return calibrate(tiny_gguf, calibration_file.read_text(), ctx=128, chunks=4, threads=1, hidden_states=True)


# ---- the rules, in numpy ----------------------------------------------------------------------


def test_sparsity_zeroes_the_lowest_scores_of_each_row() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 96)).astype(np.float32)
    pruned = sparsify(weight, np.abs(weight), sparsity=0.3)
    assert ((pruned == 0).sum(axis=1) == int(0.3 * 96)).all()
    for row, kept in zip(np.abs(weight), pruned != 0, strict=False):
        assert row[~kept].max() <= row[kept].min()
    assert np.array_equal(pruned[pruned != 0], weight[pruned != 0])
    assert np.array_equal(sparsify(weight, np.abs(weight), sparsity=0.0), weight)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_pattern_keeps_the_top_n_of_every_m(pattern: tuple[int, int]) -> None:
    n, m = pattern
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    pruned = sparsify(weight, np.abs(weight), pattern=pattern)
    groups, kept = np.abs(weight).reshape(8, -1, m), (pruned != 0).reshape(8, -1, m)
    assert (kept.sum(axis=-1) == n).all()
    assert (np.where(kept, groups, np.inf).min(axis=-1) >= np.where(kept, -np.inf, groups).max(axis=-1)).all()


def test_wanda_keeps_small_weights_on_loud_inputs() -> None:
    """Column 0 carries small weights but large activations: Wanda keeps it, magnitude drops it."""
    weight = np.tile(np.array([0.1, 0.5, 0.4, 0.3], dtype=np.float32), (3, 1))
    norms = np.array([10.0, 1.0, 1.0, 1.0], dtype=np.float32)
    magnitude = sparsify(weight, np.abs(weight), sparsity=0.5)
    wanda = sparsify(weight, np.abs(weight) * norms, sparsity=0.5)
    assert (magnitude[:, 0] == 0).all() and (wanda[:, 0] != 0).all()
    assert (wanda[:, 3] == 0).all() and (wanda[:, 1] != 0).all()


def test_block_choice_from_hidden_state_similarity() -> None:
    """Blocks 3 and 4 barely turn the stream, block 6 a little; the others a lot."""
    rng = np.random.default_rng(2)
    turn = {3: 0.01, 4: 0.01, 6: 0.05}
    states = [rng.standard_normal(64)]
    for i in range(8):
        states.append(states[-1] + turn.get(i, 1.0) * np.linalg.norm(states[-1]) * rng.standard_normal(64) / 8)
    unit = np.array(states) / np.linalg.norm(states, axis=1, keepdims=True)
    cosine = unit @ unit.T
    assert choose_blocks(cosine, 2, "angular")[0] == [3, 4]
    assert choose_blocks(cosine, 3, "influence")[0] == [3, 4, 6]
    removed, scores = choose_blocks(cosine, 2, "angular")
    assert scores[3] == pytest.approx(np.arccos(cosine[3, 5]) / np.pi)


def test_amounts_are_checked(tiny_hf: Path) -> None:
    arch = models.for_hf_config(Checkpoint(tiny_hf).config)
    bad = [
        ("magnitude", {"sparsity": 1.0}, "in [0, 1)"),
        ("magnitude", {"sparsity": -0.1}, "in [0, 1)"),
        ("magnitude", {}, "needs --sparsity"),
        ("wanda", {"sparsity": 0.5, "pattern": (2, 4)}, "one of them"),
        ("magnitude", {"pattern": (3, 7)}, "does not divide"),
        ("layers", {"remove": 4}, "between 1 and 3"),
        ("layers", {"remove": 0}, "between 1 and 3"),
        ("width", {"ffn": 0.0}, "(0, 1]"),
        ("width", {}, "below 1"),
    ]
    for method, amounts, words in bad:
        with pytest.raises(PruneError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            check_amounts(arch, method, **amounts)
    for text in ("4:4", "5:4", "0:4", "2-4"):
        with pytest.raises(PruneError):
            parse_pattern(text)
    assert parse_pattern("2:4") == (2, 4)


# ---- structured pruning against llama.cpp and transformers ------------------------------------


def zeroed_columns(source: Path, target: Path, columns: dict[str, np.ndarray]) -> Path:
    """A copy of the checkpoint with the given columns of the given tensors set to zero."""
    checkpoint = Checkpoint(source)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))

    def tensors():
        for ref in checkpoint:
            array = ref.load().copy()
            if ref.name in columns:
                array[:, columns[ref.name]] = 0
            yield ref.name, array

    write_safetensors(target / "model.safetensors", tensors(), {ref.name: (ref.shape, "F32") for ref in checkpoint})
    return target


def same_logits(smaller_hf: Path, zeroed_hf: Path, tmp_path: Path) -> np.ndarray:
    convert(smaller_hf, tmp_path / "small.gguf", mix("F32"))
    convert(zeroed_hf, tmp_path / "zeroed.gguf", mix("F32"))
    tokens = tokenize(tmp_path / "small.gguf", SAMPLE)
    small = llama_logits(tmp_path / "small.gguf", tokens, exact=True)
    np.testing.assert_allclose(small, llama_logits(tmp_path / "zeroed.gguf", tokens, exact=True), atol=2e-3, rtol=0)
    return small


def test_width_pruning_is_the_model_without_those_neurons_and_heads(
    tiny_hf: Path, tiny_calibration: Calibration, tmp_path: Path
) -> None:
    checkpoint = Checkpoint(tiny_hf)
    arch = models.for_hf_config(checkpoint.config)
    plan = plan_width(checkpoint, arch, tiny_calibration, ffn=0.75, heads=0.5)
    summary = prune_checkpoint(tiny_hf, tmp_path / "small", plan)
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert (
        config["intermediate_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    ) == (384, 2, 1, 64)
    assert summary.parameters_after == summary.parameters_before - 4 * (3 * 128 * 256 + 2 * 128 * 256 + 2 * 64 * 256)

    columns = {}
    for i in range(arch.n_layer):
        down = np.setdiff1d(np.arange(512), plan.ffn_kept[i])
        energy = tiny_calibration.sums[f"blk.{i}.ffn_down.weight"] * (
            checkpoint.tensors[f"model.layers.{i}.mlp.down_proj.weight"].load() ** 2
        ).sum(axis=0)
        assert energy[plan.ffn_kept[i]].min() >= energy[down].max()  # the loudest neurons stay
        columns[f"model.layers.{i}.mlp.down_proj.weight"] = down
        (dropped_group,) = np.setdiff1d(np.arange(2), plan.kv_kept[i])
        columns[f"model.layers.{i}.self_attn.o_proj.weight"] = np.arange(128) + 128 * dropped_group
    small = same_logits(tmp_path / "small", zeroed_columns(tiny_hf, tmp_path / "zeroed", columns), tmp_path)

    fields = gguf.GGUFReader(tmp_path / "small.gguf").fields
    assert fields["llama.attention.key_length"].contents() == 64
    assert fields["llama.feed_forward_length"].contents() == 384
    export(tmp_path / "small.gguf", tmp_path / "exported")  # and back: head_dim survives the round trip
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (exported["num_attention_heads"], exported["head_dim"]) == (2, 64)

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor([tokenize(tmp_path / "small.gguf", SAMPLE)])).logits[0].numpy()
    np.testing.assert_allclose(small, theirs, atol=2e-3, rtol=0)


def test_removing_blocks_is_skipping_them(tiny_hf: Path, tiny_calibration: Calibration, tmp_path: Path) -> None:
    arch = models.for_hf_config(Checkpoint(tiny_hf).config)
    plan = plan_layers(arch, tiny_calibration, 2)
    assert plan.removed_blocks == choose_blocks(tiny_calibration.hidden_cosine, 2)[0]
    prune_checkpoint(tiny_hf, tmp_path / "small", plan)
    assert json.loads((tmp_path / "small" / "config.json").read_text())["num_hidden_layers"] == 2
    columns = {
        f"model.layers.{i}.{part}.weight": np.arange(width)
        for i in plan.removed_blocks
        for part, width in (("self_attn.o_proj", 256), ("mlp.down_proj", 512))
    }
    same_logits(tmp_path / "small", zeroed_columns(tiny_hf, tmp_path / "zeroed", columns), tmp_path)
    assert gguf.GGUFReader(tmp_path / "small.gguf").fields["llama.block_count"].contents() == 2


def test_wanda_ranks_by_the_calibration_column_norms(
    tiny_hf: Path, tiny_calibration: Calibration, tmp_path: Path
) -> None:
    checkpoint = Checkpoint(tiny_hf)
    arch = models.for_hf_config(checkpoint.config)
    plan = plan_unstructured(arch, "wanda", sparsity=0.5, calibration=tiny_calibration)
    summary = prune_checkpoint(tiny_hf, tmp_path / "wanda", plan)
    assert summary.zeroed == summary.block_weights // 2 and summary.parameters_after == summary.parameters_before
    name = "model.layers.1.mlp.down_proj.weight"
    original = checkpoint.tensors[name].load()
    pruned = Checkpoint(tmp_path / "wanda").tensors[name].load()
    expected = sparsify(
        original, np.abs(original) * np.sqrt(tiny_calibration.sums["blk.1.ffn_down.weight"]), sparsity=0.5
    )
    assert np.array_equal(pruned, expected)
    assert not np.array_equal(pruned == 0, sparsify(original, np.abs(original), sparsity=0.5) == 0)


# ---- the command --------------------------------------------------------------------------------


def test_command_from_a_gguf_with_a_saved_imatrix(
    tiny_gguf: Path, tiny_calibration: Calibration, calibration_file: Path, tmp_path: Path
) -> None:
    tiny_calibration.save(tmp_path / "tiny.imatrix")
    out = tmp_path / "out.gguf"
    dry = slim_prune(
        str(tiny_gguf),
        "-o",
        str(out),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--type",
        "F16",
        "--imatrix",
        str(tmp_path / "tiny.imatrix"),
        "--dry-run",
        "--json",
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] and not out.exists()

    run = slim_prune(
        str(tiny_gguf),
        "-o",
        str(out),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--type",
        "F16",
        "--imatrix",
        str(tmp_path / "tiny.imatrix"),
        "--json",
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["zeroed"] == report["block_weights"] // 2 and report["output_bytes"] == out.stat().st_size
    assert report["output_bytes"] == pytest.approx(json.loads(dry.stdout)["expected_bytes"], rel=0.05)
    weights = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight"):
        assert ((weights[name].reshape(weights[name].shape[0], -1, 4) != 0).sum(axis=-1) == 2).all()
    assert (weights["token_embd.weight"] == 0).mean() < 0.001  # embeddings are not pruned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "tiny.imatrix"]


def test_layers_command_reports_size_and_perplexity(tiny_hf: Path, calibration_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    run = slim_prune(
        str(tiny_hf),
        "-o",
        str(out),
        "--method",
        "layers",
        "--remove",
        "1",
        "--text",
        str(calibration_file),
        "--ctx",
        "128",
        "--chunks",
        "2",
        "--eval-text",
        str(calibration_file),
    )
    assert run.returncode == 0, run.stderr
    assert "4 -> 3 blocks" in run.stdout and "perplexity" in run.stdout
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / "tokenizer.json").exists()


def test_bad_input_is_one_error_line_and_no_output(tiny_hf: Path, calibration_file: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    out = tmp_path / "out.gguf"
    text = ["--text", str(calibration_file)]
    cases = [
        (["--method", "magnitude", "--sparsity", "1.0"], "in [0, 1)"),
        (["--method", "wanda", "--sparsity", "-0.5", *text], "in [0, 1)"),
        (["--method", "magnitude", "--pattern", "4:4"], "smaller than M"),
        (["--method", "magnitude", "--pattern", "3:7"], "does not divide"),
        (["--method", "layers", "--remove", "4", *text], "between 1 and 3"),
        (["--method", "wanda", "--sparsity", "0.5", "--text", str(short)], "shorter than one chunk"),
        (["--method", "wanda", "--sparsity", "0.5"], "needs a calibration text"),
        (["--method", "width", "--ffn", "1.5", *text], "(0, 1]"),
        (["--method", "layers", "--remove", "1", "--imatrix", str(short)], "not --imatrix"),
    ]
    for args, words in cases:
        result = slim_prune(str(tiny_hf), "-o", str(out), *args, "--type", "F16")
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, result.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"], args
    result = slim_prune(
        str(tiny_hf), "-o", str(tmp_path / "dir"), "--method", "magnitude", "--sparsity", "0.5", "--type", "Q8_0"
    )
    assert result.returncode == 2 and "name the output file *.gguf" in result.stderr


def test_heal_trains_the_pruned_model_towards_the_unpruned_one(
    tiny_hf: Path, calibration_file: Path, tmp_path: Path
) -> None:
    """--heal runs slim distill with the unpruned model as teacher; the written model is the trained one."""
    pytest.importorskip("torch")
    from slim.runtime.inference import load

    plain, healed = tmp_path / "plain", tmp_path / "healed"
    common = ["--method", "layers", "--remove", "1", "--text", str(calibration_file), "--ctx", "128", "--chunks", "2"]
    assert slim_prune(str(tiny_hf), "-o", str(plain), *common).returncode == 0
    run = slim_prune(str(tiny_hf), "-o", str(healed), *common, "--heal", "2", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["healed"]["steps"] == 2 and np.isfinite(report["healed"]["loss_last"])
    # the same blocks were removed, and training changed the weights that remain
    assert report["removed"].startswith("layers: remove blocks")
    before = Checkpoint(plain)
    after = {ref.name: ref for ref in Checkpoint(healed)}
    changed = [ref.name for ref in before if not np.array_equal(ref.load(), after[ref.name].load())]
    assert any("mlp" in name for name in changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed", "plain"]  # no training checkpoint left

    gguf = tmp_path / "healed.gguf"
    run = slim_prune(str(tiny_hf), "-o", str(gguf), *common, "--heal", "1", "--type", "Q8_0")
    assert run.returncode == 0, run.stderr
    with load(gguf, n_ctx=64, n_threads=1) as model:
        assert model.logits(model.tokenize("The capital of France is"))[-1].argmax() >= 0

    run = slim_prune(
        str(tiny_hf), "-o", str(tmp_path / "x"), "--method", "magnitude", "--sparsity", "0.5", "--heal", "2"
    )
    assert run.returncode == 2 and "--heal trains on a text" in run.stderr
