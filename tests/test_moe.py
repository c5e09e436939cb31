"""Mixtures of experts beyond conversion (which tests/test_architectures.py proves for Qwen3-MoE
and Mixtral like every family): the importance matrix per expert and its routing statistics equal
llama-imatrix's, llama-quantize's mixes and --imatrix quantization of the stacked experts are
matched byte for byte, and expert pruning removes the experts the router does not use."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import gguf_tensors, llama_quantize, run_slim

from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.calibrate import Calibration, calibrate
from slim.runtime.pipeline.convert import convert

pytest.importorskip("torch")
pytest.importorskip("transformers")
from test_architectures import build_checkpoint  # noqa: E402  (needs torch and transformers)

CTX, CHUNKS = 128, 3
FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


@pytest.fixture(scope="module")
def moe_hf(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = build_checkpoint(family, tmp_path_factory.mktemp(family) / "checkpoint", smollm2_tokenizer)
        return made[family]

    return get


@pytest.fixture(scope="module")
def moe_f32(moe_hf: Callable[[str], Path]) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = moe_hf(family).parent / "f32.gguf"
            convert(moe_hf(family), made[family], mix("F32"))
        return made[family]

    return get


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slim.runtime.store import assets

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def imatrices(moe_f32: Callable[[str], Path], text: Path) -> Callable[[str], Path]:
    """slim calibrate's importance matrix of each fixture, as a file."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = moe_f32(family).with_suffix(".imatrix.gguf")
            calibrate(moe_f32(family), text.read_text(encoding="utf-8"), ctx=CTX, chunks=CHUNKS, threads=1).save(
                made[family]
            )
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_per_expert_equals_llama_imatrix(
    family: str,
    moe_f32: Callable[[str], Path],
    imatrices: Callable[[str], Path],
    text: Path,
    llama_tool: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    theirs_path = tmp_path / "theirs.imatrix.gguf"
    subprocess.run(
        [str(llama_tool("llama-imatrix")), "-m", str(moe_f32(family)), "-f", str(text), "-o", str(theirs_path),
         "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), "-t", "1", "--no-ppl"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    theirs, ours = Calibration.load(theirs_path), Calibration.load(imatrices(family))
    assert sorted(ours.sums) == sorted(theirs.sums) and ours.counts == theirs.counts
    assert sorted(ours.expert_sums) == sorted(theirs.expert_sums)
    assert len(ours.expert_sums) == 3 * 4  # gate, up and down of each of the 4 layers
    for name, counts in ours.expert_counts.items():
        np.testing.assert_array_equal(counts, theirs.expert_counts[name], err_msg=name)
        # every token is routed to 2 experts: the counts add up to twice the tokens
        assert counts.sum() == 2 * CTX * CHUNKS
        np.testing.assert_allclose(ours.expert_sums[name], theirs.expert_sums[name], rtol=1e-3, err_msg=name)


def test_routing_statistics_are_shown(imatrices: Callable[[str], Path]) -> None:
    run = run_slim("show", str(imatrices("qwen3_moe")), "--json")
    assert run.returncode == 0, run.stderr
    routing = json.loads(run.stdout)["routing"]
    assert sorted(routing) == ["0", "1", "2", "3"]
    cal = Calibration.load(imatrices("qwen3_moe"))
    for layer, shares in routing.items():
        counts = cal.expert_counts[f"blk.{layer}.ffn_gate_exps.weight"]
        np.testing.assert_allclose(shares, counts / counts.sum(), atol=1e-4)
    text = run_slim("show", str(imatrices("qwen3_moe")))
    assert text.returncode == 0 and "layer   3" in text.stdout, text.stderr


@pytest.mark.parametrize("type_name", ["Q4_K_M", "IQ2_XS"])
def test_convert_with_imatrix_equals_llama_quantize(
    type_name: str,
    moe_hf: Callable[[str], Path],
    moe_f32: Callable[[str], Path],
    imatrices: Callable[[str], Path],
    llama_tool: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    """Each expert's slice quantized with its own importance; IQ2_XS also runs llama-quantize's
    very-low-bit rules for 8-expert models (attn_v and attn_k Q4_K, attn_output Q5_K)."""
    family = "qwen3_moe"
    theirs = tmp_path / "theirs.gguf"
    subprocess.run(
        [str(llama_tool("llama-quantize")), "--imatrix", str(imatrices(family)), str(moe_f32(family)), str(theirs),
         type_name, "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    convert(moe_hf(family), tmp_path / "ours.gguf", mix(type_name), imatrix=imatrices(family), threads=1)
    assert gguf_tensors(tmp_path / "ours.gguf") == gguf_tensors(theirs)


@pytest.mark.parametrize("type_name", ["Q3_K_M", "Q2_K", "IQ3_M"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixes_equal_llama_quantize(
    family: str, type_name: str, moe_hf: Callable[[str], Path], moe_f32: Callable[[str], Path], tmp_path: Path
) -> None:
    """llama-quantize's rules for 8-expert models (Qwen3-MoE fixture: attn_v and attn_k Q8_0,
    attn_output Q5_K, IQ3_M's ffn_down) and for 4 experts (Mixtral fixture: the dense rules)."""
    convert(moe_hf(family), tmp_path / "ours.gguf", mix(type_name))
    llama_quantize(moe_f32(family), tmp_path / "theirs.gguf", type_name)
    ours, theirs = gguf_tensors(tmp_path / "ours.gguf"), gguf_tensors(tmp_path / "theirs.gguf")
    assert {n: t for n, (t, _, _) in ours.items()} == {n: t for n, (t, _, _) in theirs.items()}
    assert ours == theirs


# ---- expert pruning ----------------------------------------------------------------------------


UNUSED = (6, 7)


@pytest.fixture(scope="module")
def skewed_hf(moe_hf: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen3-MoE fixture with a router that never picks experts 6 and 7: experts 0-5 route along
    three directions and their opposites (w, -w), so at least three of them score above zero for
    any hidden state, while 6 and 7 score near zero; with two experts used per token, 6 and 7 are
    never among them."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path_factory.mktemp("skewed") / "checkpoint"
    shutil.copytree(moe_hf("qwen3_moe"), folder)
    weights = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(0)
    for name, router in weights.items():
        if name.endswith("mlp.gate.weight"):
            directions = rng.normal(0, 1.0, (3, router.shape[1])).astype(np.float32)
            router[:6] = np.stack(
                [directions[0], -directions[0], directions[1], -directions[1], directions[2], -directions[2]]
            )
            router[6:] = rng.normal(0, 1e-4, (2, router.shape[1]))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def hf_logits(checkpoint: Path, tokens: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_pruning_removes_the_experts_the_router_never_picks(
    skewed_hf: Path, moe_f32: Callable[[str], Path], text: Path, tmp_path: Path
) -> None:
    from helpers import llama_logits, tokenize
    from safetensors.numpy import load_file

    out = tmp_path / "pruned"
    run = run_slim("prune", str(skewed_hf), "-o", str(out), "--method", "experts", "--keep", "6", "--text", str(text),
                   "--ctx", "128", "--chunks", "2", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    for block in range(4):
        assert f"block {block}: 6, 7 (0.0% of its routing)" in report["removed"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 6 and config["num_experts_per_tok"] == 2
    before, after = load_file(skewed_hf / "model.safetensors"), load_file(out / "model.safetensors")
    np.testing.assert_array_equal(after["model.layers.2.mlp.gate.weight"], before["model.layers.2.mlp.gate.weight"][:6])
    assert "model.layers.2.mlp.experts.6.up_proj.weight" not in after
    # the unused experts carried no weight, and the kept ones' weights are renormalised over the chosen
    # two: transformers' logits do not move, and llama.cpp runs the smaller model as transformers does
    tokens = tokenize(moe_f32("qwen3_moe"), "The quick brown fox jumps over the lazy dog. " * 8)
    pruned_logits = hf_logits(out, tokens)
    assert np.abs(pruned_logits - hf_logits(skewed_hf, tokens)).max() < 1e-4
    convert(out, tmp_path / "pruned.gguf", mix("F32"))
    assert np.abs(llama_logits(tmp_path / "pruned.gguf", tokens, exact=True) - pruned_logits).max() < 1e-2
    assert (tmp_path / "pruned.gguf").stat().st_size < moe_f32("qwen3_moe").stat().st_size


def test_pruning_a_uniform_router_reports_what_it_costs(
    moe_hf: Callable[[str], Path], text: Path, tmp_path: Path
) -> None:
    """On the random router every expert is used: the report says how much routing the removed
    experts had, and the perplexity before and after, measured the same way (Q8_0)."""
    out = tmp_path / "pruned.gguf"
    run = run_slim("prune", str(moe_hf("mixtral")), "-o", str(out), "--method", "experts", "--keep-fraction", "0.5",
                   "--heal", "2", "--text", str(text), "--eval-text", str(text), "--ctx", "128", "--chunks", "2",
                   "--type", "Q8_0", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["removed"].startswith("experts: 4 -> 2 per block;")
    shares = [float(share) for share in re.findall(r"\(([\d.]+)% of its routing\)", report["removed"])]
    assert len(shares) == 4 and all(0 < share < 50 for share in shares)  # the two least-used of four
    assert report["perplexity"] > 0 and report["perplexity_before"] > 0
    assert report["perplexity_of"] == "pruned.gguf"
    assert report["output_bytes"] < report["unpruned_bytes"] + 10**6


@pytest.mark.parametrize(
    ("source", "arguments", "message"),
    [
        ("qwen3_moe", ["--keep", "8"], "--keep must be between 1 and 7"),
        ("qwen3_moe", ["--keep", "2", "--keep-fraction", "0.5"], "--keep N or --keep-fraction F (one of them)"),
        ("qwen3_moe", ["--keep-fraction", "1.5"], "--keep-fraction is the fraction of experts to keep"),
        ("qwen3", ["--keep", "2"], "this Qwen3 is dense"),
        ("mixtral", ["--method", "width", "--ffn", "0.5"], "use --method experts --keep N"),
    ],
)
def test_expert_pruning_refuses_what_it_cannot_do(
    source: str, arguments: list[str], message: str, moe_hf: Callable[[str], Path], smollm2_tokenizer: Path,
    text: Path, tmp_path: Path,
) -> None:  # fmt: skip
    checkpoint = (
        moe_hf(source) if source != "qwen3" else build_checkpoint("qwen3", tmp_path / "dense", smollm2_tokenizer)
    )
    method = [] if "--method" in arguments else ["--method", "experts"]
    run = run_slim("prune", str(checkpoint), "-o", str(tmp_path / "out"), *method, *arguments,
                   "--text", str(text))  # fmt: skip
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


# ---- numerics ----------------------------------------------------------------------------------


def test_llama_cpp_departs_from_transformers_only_after_a_near_tie_in_the_router(
    moe_hf: Callable[[str], Path], tmp_path: Path
) -> None:
    """Why random MoE fixtures at transformers' own initialisation disagree by ~0.1 where dense ones
    agree to 1e-3: llama.cpp's default F16 KV cache rounds attention's keys and values, which moves
    the hidden state by ~1e-3; where the router's k-th and (k+1)-th experts are that close (std 0.02
    weights leave routers nearly flat), the choice flips and a whole expert's output changes. With
    an F32 KV cache the file is exact (below 1e-4, as the dense families); with F16, every position
    before the first near-tie still agrees to 1e-2."""
    import shutil

    import torch
    import transformers
    from helpers import llama_logits, tokenize
    from test_architectures import FIXTURES, PROMPT

    folder = tmp_path / "checkpoint"
    shutil.copytree(moe_hf("qwen3_moe"), folder)
    config = json.loads((FIXTURES / "qwen3_moe.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("pre_tokenizer", "model_type")}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("qwen3_moe", vocab_size=49152, **config), dtype=torch.float32
    )  # transformers' initialisation, not the fixture's wider weights
    model.save_pretrained(folder)
    convert(folder, tmp_path / "f32.gguf", mix("F32"))
    tokens = tokenize(tmp_path / "f32.gguf", PROMPT)
    gaps = []  # per MoE layer: per token, the k-th chosen expert's probability minus the next one's

    def record(module: object, args: object, output: tuple[torch.Tensor, ...]) -> None:
        ranked = torch.softmax(output[0].float(), -1).sort(-1, descending=True).values
        gaps.append(ranked[:, 1] - ranked[:, 2])

    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(record)
    with torch.no_grad():
        truth = model(torch.tensor([tokens])).logits[0].numpy()
    nearest = torch.stack(gaps).min(dim=0).values.numpy()  # per token, over the layers
    assert np.abs(llama_logits(tmp_path / "f32.gguf", tokens, exact=True) - truth).max() < 1e-4
    default_cache = np.abs(llama_logits(tmp_path / "f32.gguf", tokens) - truth).max(axis=1)
    first_tie = int(np.argmax(nearest < 1e-4)) if (nearest < 1e-4).any() else len(tokens)
    before, overall = default_cache[:first_tie].max(), default_cache.max()
    print(
        f"first near-tie at token {first_tie} of {len(tokens)}: max |diff| {before:.1e} before it, {overall:.1e} in all"
    )
    assert before < 1e-2
    departed = np.flatnonzero(default_cache > 1e-2)
    assert len(departed) == 0 or departed[0] >= first_tie


# ---- hostile checkpoints -----------------------------------------------------------------------


def test_a_broken_mixture_is_refused_with_one_line(moe_hf: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    def variant(name: str, edit_weights: Callable[[dict[str, np.ndarray]], None] | None = None,
                edit_config: Callable[[dict[str, object]], None] | None = None) -> Path:  # fmt: skip
        folder = tmp_path / name
        shutil.copytree(moe_hf("qwen3_moe"), folder)
        if edit_weights is not None:
            weights = load_file(folder / "model.safetensors")
            edit_weights(weights)
            save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        if edit_config is not None:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    cases = {
        "missing-expert": (
            variant("missing-expert", lambda w: w.pop("model.layers.1.mlp.experts.5.up_proj.weight")),
            "lacks expert 5 of blk.1.ffn_up_exps.weight",
        ),
        "extra-expert": (
            variant(
                "extra-expert",
                lambda w: w.update(
                    {"model.layers.0.mlp.experts.8.up_proj.weight": w["model.layers.0.mlp.experts.0.up_proj.weight"]}
                ),
            ),
            "has 4 layers of 8 experts",
        ),  # fmt: skip
        "odd-shape": (
            variant(
                "odd-shape",
                lambda w: w.update({"model.layers.2.mlp.experts.3.down_proj.weight": np.zeros((256, 128), np.float32)}),
            ),
            "the experts of blk.2.ffn_down_exps.weight differ in shape",
        ),  # fmt: skip
        "no-top-k": (variant("no-top-k", edit_config=lambda c: c.pop("num_experts_per_tok")), "num_experts_per_tok"),
        "top-k-above-experts": (
            variant("top-k-above", edit_config=lambda c: c.update(num_experts_per_tok=9)),
            "must be between 1 and the 8 experts",
        ),
        "unnormalised": (
            variant("unnormalised", edit_config=lambda c: c.update(norm_topk_prob=False)),
            "always renormalises",
        ),
        "dense-layers": (
            variant("dense-layers", edit_config=lambda c: c.update(mlp_only_layers=[1])),
            "every layer must be a mixture of experts",
        ),
    }
    for name, (folder, message) in cases.items():
        run = run_slim("convert", str(folder), "-o", str(tmp_path / f"{name}.gguf"), "--type", "Q8_0")
        assert run.returncode == 2, (name, run.stderr)
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, (name, run.stderr)
        assert not (tmp_path / f"{name}.gguf").exists(), name
