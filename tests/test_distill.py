"""slim distill: the torch student against transformers, the loss, the teacher's cached top-k
against llama.cpp, bit-for-bit resume, and whole runs (offline, online, healing) through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import llama_logits, log_softmax, make_llama_checkpoint
from helpers import run_slim as slim

from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.convert import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slim.runtime.train import distill as distill_lib  # noqa: E402  (needs torch)
from slim.runtime.train import student as student_lib  # noqa: E402


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slim.runtime.store import assets

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:12000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def teacher_hf(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("teacher") / "hf", smollm2_tokenizer, hidden=64, n_layer=3, ffn=128, tied=True, seed=1
    )


@pytest.fixture(scope="module")
def teacher_gguf(teacher_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher-gguf") / "f32.gguf"
    convert(teacher_hf, path, mix("F32"))
    return path


@pytest.fixture(scope="module")
def student_hf(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("student") / "hf", smollm2_tokenizer, hidden=64, n_layer=2, ffn=128, tied=True, seed=2
    )


def test_student_saves_what_it_loaded(student_hf: Path, tmp_path: Path) -> None:
    model = student_lib.load(student_hf)
    student_lib.save(model, student_hf, tmp_path / "copy")
    again = student_lib.load(tmp_path / "copy")
    for name, tensor in model.hf_state().items():
        assert torch.equal(tensor, again.hf_state()[name]), name
    assert (tmp_path / "copy" / "tokenizer.json").is_file()


def test_loss_on_full_top_k_equals_full_kl() -> None:
    """Top-k renormalised at T with k = the whole vocabulary is the full KL at T, and the mix is
    alpha * T^2 * KL + (1 - alpha) * CE."""
    gen = torch.Generator().manual_seed(0)
    student_logits = torch.randn(2, 6, 11, generator=gen)
    teacher_logits = torch.randn(2, 6, 11, generator=gen)
    tokens = torch.randint(0, 11, (2, 6), generator=gen)
    T, alpha = 2.0, 0.3
    full, kl_full, ce = distill_lib.distill_loss(
        student_logits, tokens, alpha=alpha, temperature=T, teacher_logits=teacher_logits
    )
    log_p = torch.log_softmax(teacher_logits[:, :-1], -1)
    order = log_p.argsort(-1, descending=True)
    topk, kl_topk, _ = distill_lib.distill_loss(
        student_logits, tokens, alpha=alpha, temperature=T, top_ids=order, top_log_probs=log_p.gather(-1, order)
    )
    # (the empty tail keeps a floor of 1e-9, which tempering at T = 2 lifts to ~3e-5)
    assert torch.allclose(full, topk, atol=1e-4) and torch.allclose(kl_full, kl_topk, atol=1e-4)
    p_t = np.exp(log_softmax(teacher_logits[:, :-1].numpy() / T))
    log_q = log_softmax(student_logits[:, :-1].numpy() / T)
    expected_kl = (p_t * (np.log(p_t) - log_q)).sum(-1).mean()
    expected_ce = -log_softmax(student_logits[:, :-1].numpy())[
        np.arange(2)[:, None], np.arange(5)[None, :], tokens[:, 1:].numpy()
    ].mean()
    assert abs(float(kl_full) - expected_kl) < 1e-5 and abs(float(ce) - expected_ce) < 1e-5
    assert abs(float(full) - (alpha * T * T * expected_kl + (1 - alpha) * expected_ce)) < 1e-5

    # k < vocabulary at T = 1: the bucketed KL (top-k and one tail) is a lower bound of the full KL,
    # and the tail is what distinguishes it from renormalising the top-k
    _, kl_1, _ = distill_lib.distill_loss(
        student_logits, tokens, alpha=1.0, temperature=1.0, teacher_logits=teacher_logits
    )
    top = order[..., :4]
    _, kl_4, _ = distill_lib.distill_loss(
        student_logits, tokens, alpha=1.0, temperature=1.0, top_ids=top, top_log_probs=log_p.gather(-1, top)
    )
    p_t, log_s = log_p.exp().numpy(), torch.log_softmax(student_logits[:, :-1], -1).numpy()
    ids = top.numpy()
    t_top, s_top = np.take_along_axis(p_t, ids, -1), np.exp(np.take_along_axis(log_s, ids, -1))
    t_tail, s_tail = 1 - t_top.sum(-1), 1 - s_top.sum(-1)
    bucketed = ((t_top * np.log(t_top / s_top)).sum(-1) + t_tail * np.log(t_tail / s_tail)).mean()
    assert abs(float(kl_4) - bucketed) < 1e-5 and float(kl_4) < float(kl_1)


def test_teacher_top_k_is_llama_cpp_and_is_cached(
    teacher_gguf: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = text.read_text()[:3000]
    targets = distill_lib.teacher_targets(teacher_gguf, sample, 64, 8, threads=1, cache_dir=tmp_path)
    assert targets.tokens.shape[1] == 64 and targets.top_ids.shape == (len(targets.tokens), 63, 8)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # the engine keeps llama.cpp's F16 KV cache, the oracle an F32 one: equal to ~1e-4
    log_p = log_softmax(llama_logits(teacher_gguf, list(targets.tokens[1]), exact=True))[:-1]
    expected = np.sort(log_p, axis=-1)[:, ::-1][:, :8]
    got = np.sort(targets.top_log_probs[1], axis=-1)[:, ::-1]
    assert np.abs(got - expected).max() < 2e-3
    np.testing.assert_allclose(np.take_along_axis(log_p, targets.top_ids[1], -1), targets.top_log_probs[1], atol=2e-3)

    def no_llama(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached top-k should have been used")

    monkeypatch.setattr("slim.runtime.inference.load", no_llama)
    again = distill_lib.teacher_targets(teacher_gguf, sample, 64, 8, threads=1, cache_dir=tmp_path)
    assert np.array_equal(again.top_ids, targets.top_ids) and np.array_equal(again.tokens, targets.tokens)
    with pytest.raises(AssertionError):  # another k is another cache entry
        distill_lib.teacher_targets(teacher_gguf, sample, 64, 4, threads=1, cache_dir=tmp_path)


def test_resume_continues_bit_for_bit(student_hf: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    targets = distill_lib.Targets(
        rng.integers(0, 49152, (6, 16)),
        rng.integers(0, 49152, (6, 15, 4)).astype(np.int32),
        np.log(rng.dirichlet(np.ones(4), (6, 15))).astype(np.float32),
    )
    options = distill_lib.Options(steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup=1, save_every=2, threads=1)
    straight = student_lib.load(student_hf)
    losses = distill_lib.train(straight, targets, options, tmp_path / "a.ckpt")

    half = student_lib.load(student_hf)
    first = distill_lib.train(
        half, targets, distill_lib.Options(**{**options.__dict__, "time_limit": 0.0}), tmp_path / "b.ckpt"
    )
    assert len(first) == 1  # the time limit stopped it after one step and checkpointed
    resumed = student_lib.load(student_hf)  # fresh weights: everything must come from the checkpoint
    rest = distill_lib.train(resumed, targets, options, tmp_path / "b.ckpt", resume=True)
    assert first + rest == losses
    for name, tensor in straight.hf_state().items():
        assert torch.equal(tensor, resumed.hf_state()[name]), name

    other = distill_lib.Options(**{**options.__dict__, "lr": 5e-4})
    with pytest.raises(distill_lib.DistillError, match="other training options"):
        distill_lib.train(student_lib.load(student_hf), targets, other, tmp_path / "b.ckpt", resume=True)


def mean_kl(model_dir: Path, teacher_gguf: Path, sample: str) -> float:
    targets = distill_lib.teacher_targets(teacher_gguf, sample, 64, 32, threads=1)
    model = student_lib.load(model_dir)
    tokens = torch.from_numpy(targets.tokens)
    with torch.no_grad():
        _, kl, _ = distill_lib.distill_loss(
            model(tokens),
            tokens,
            alpha=1.0,
            temperature=1.0,
            top_ids=torch.from_numpy(targets.top_ids).long(),
            top_log_probs=torch.from_numpy(targets.top_log_probs),
        )
    return float(kl)


def test_distill_cli_moves_the_student_towards_the_teacher(
    teacher_gguf: Path, student_hf: Path, text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = slim(
        "distill",
        "--teacher",
        str(teacher_gguf),
        "--student",
        str(student_hf),
        "-o",
        str(out),
        "--text",
        str(text),
        "--steps",
        "12",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--alpha",
        "1",
        "--threads",
        "1",
        "--type",
        "Q8_0",
        "--json",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["steps"] == 12 and summary["last_loss"] < summary["first_loss"]
    assert not (tmp_path / "out.ckpt").exists() and list((tmp_path / "cache").glob("*.npz"))
    assert Path(summary["gguf"]) == tmp_path / "out-q8_0.gguf"
    from slim.runtime.inference import load

    with load(summary["gguf"], n_ctx=64, n_threads=1) as model:
        assert model.logits(model.tokenize("Paris is"))[-1].shape == (49152,)
    sample = text.read_text()[:3000]
    assert mean_kl(out, teacher_gguf, sample) < mean_kl(student_hf, teacher_gguf, sample)

    again = slim(
        "distill",
        "--teacher",
        str(teacher_gguf),
        "--student",
        str(student_hf),
        "-o",
        str(out),
        "--text",
        str(text),
        "--threads",
        "1",
    )
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already exists" in again.stderr


def test_healing_a_pruned_model_with_its_unpruned_self(
    teacher_hf: Path, teacher_gguf: Path, text: Path, tmp_path: Path
) -> None:
    """The teacher minus one block, distilled from the teacher, gets closer to it."""
    from slim.runtime.pipeline.prune import Plan, prune_checkpoint

    pruned = tmp_path / "pruned"
    prune_checkpoint(teacher_hf, pruned, Plan("layers", removed_blocks=[1], block_scores={1: 0.0}))
    healed = tmp_path / "healed"
    summary = distill_lib.distill(
        teacher_gguf,
        pruned,
        text.read_text(),
        healed,
        steps=10,
        seq_len=64,
        batch_size=4,
        lr=3e-3,
        alpha=1.0,
        threads=1,
        cache_dir=tmp_path / "cache",
    )
    assert summary.steps == 10
    sample = text.read_text()[:3000]
    assert mean_kl(healed, teacher_gguf, sample) < mean_kl(pruned, teacher_gguf, sample)


def test_online_distillation(teacher_hf: Path, student_hf: Path, text: Path, tmp_path: Path) -> None:
    summary = distill_lib.distill(
        teacher_hf,
        student_hf,
        text.read_text(),
        tmp_path / "out",
        online=True,
        steps=6,
        seq_len=64,
        batch_size=2,
        lr=3e-3,
        alpha=1.0,
        threads=1,
    )
    assert summary.steps == 6 and summary.last_loss < summary.first_loss
    with pytest.raises(distill_lib.DistillError, match="Hugging Face model folder"):
        distill_lib.distill(tmp_path / "nothing.gguf", student_hf, "text", tmp_path / "x", online=True)


def test_a_different_vocabulary_is_refused(teacher_gguf: Path, student_hf: Path, text: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(student_hf, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    run = slim(
        "distill",
        "--teacher",
        str(teacher_gguf),
        "--student",
        str(other),
        "-o",
        str(tmp_path / "out"),
        "--text",
        str(text),
        "--threads",
        "1",
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "vocabulary differs from the teacher's" in run.stderr
    assert "first difference at id 300" in run.stderr


def test_bad_inputs_are_one_line_errors(teacher_gguf: Path, student_hf: Path, text: Path, tmp_path: Path) -> None:
    base = ["distill", "--teacher", str(teacher_gguf), "--student", str(student_hf), "--text", str(text)]
    for extra, message in [
        (["-o", str(tmp_path / "a"), "--type", "Q3"], "unknown --type"),
        (["-o", str(tmp_path / "b"), "--seq-len", "4096"], "shorter than one sequence"),
        (["-o", str(tmp_path / "c"), "--resume"], "no checkpoint"),
        (["-o", str(tmp_path / "no" / "d")], "does not exist"),
    ]:
        run = slim(*base, *extra, "--threads", "1", "-q")
        assert run.returncode == 2, (extra, run.stderr)
        assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_without_torch_the_commands_say_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from slim.runtime.cli import main\n"
        "sys.argv = ['slim', *sys.argv[1:]]\n"
        "main()"
    )
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello")
    for args in (
        ["distill", "--teacher", "t.gguf", "--student", str(tmp_path), "-o", str(tmp_path / "o")],
        ["qat", str(tmp_path), "-o", str(tmp_path / "o.gguf")],
    ):
        run = subprocess.run(
            [sys.executable, "-c", code, *args, "--text", str(text_file)], capture_output=True, text=True
        )
        assert run.returncode == 1 and "pip install 'slim-llm[train]'" in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1
