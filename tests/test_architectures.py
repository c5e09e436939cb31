"""Every registered architecture through the same proofs, on a random-weight checkpoint that
transformers builds from the family's fixture config in tests/architectures/<family>.json.

- Bytes: slim's F32, F16 and BF16 GGUFs hold the tensors (names, types, bytes) and metadata that llama.cpp's
  own convert_hf_to_gguf.py writes; Q8_0 and Q4_K_M equal that file through llama-quantize.
- Numerics: llama.cpp's logits on slim's F32 GGUF equal transformers' on the checkpoint (max abs
  difference below 1e-2, over a prompt longer than any sliding window of the fixtures).
- Export: `slim export` gives a checkpoint transformers loads with the same logits, and converting
  it again gives the same bytes.
- Training: the torch student equals transformers' forward to 1e-5, and prune (wanda, layers),
  distill and qat run on every family.

Adding a family is its module in slim/models/ plus a fixture config here.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from helpers import gguf_tensors, llama_logits, llama_quantize, pre_tokenizer_json, run_slim, tokenize

from slim.runtime.formats.mixes import mix
from slim.runtime.pipeline.convert import convert
from slim.runtime.pipeline.export import export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "architectures"
FAMILIES = sorted(path.stem for path in FIXTURES.glob("*.json"))
PROMPT = "The quick brown fox jumps over the lazy dog; Paris is the capital of France. " * 6
# Keys that name the file rather than describe the model.
NAMING_KEYS = ("general.name", "general.basename", "general.size_label", "general.finetune", "general.version")


def build_checkpoint(family: str, directory: Path, tokenizer_from: Path) -> Path:
    return build_from_config(json.loads((FIXTURES / f"{family}.json").read_text()), directory, tokenizer_from)


def build_from_config(config: dict[str, Any], directory: Path, tokenizer_from: Path | None) -> Path:
    """A random-weight checkpoint of a fixture config, saved by transformers itself, with the real
    SmolLM2 vocabulary under the family's pre-tokenizer (the fixture's "pre_tokenizer", if any) and
    the fixture's "tokenizer_config" settings over SmolLM2's (Phi-4-mini's tokenizer_class), or the
    SentencePiece tokenizer the fixture's "tokenizer" key describes. Weights are drawn larger than
    transformers' init so attention, norms and biases all move the logits."""
    config = dict(config)
    tokenizer = config.pop("tokenizer", None)
    pre_tokenizer = config.pop("pre_tokenizer", None)
    tokenizer_settings = config.pop("tokenizer_config", {})
    if tokenizer is None:
        config.setdefault("vocab_size", 49152)  # SmolLM2's
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0, 0.08)
            else:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is None and tokenizer_from is None:
        return directory  # the weights alone
    if tokenizer is None:
        assert tokenizer_from is not None
        tokenizer_config = json.loads((tokenizer_from / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **tokenizer_settings}))
        bpe = json.loads((tokenizer_from / "tokenizer.json").read_text())
        if pre_tokenizer is not None:
            bpe["normalizer"], bpe["pre_tokenizer"] = pre_tokenizer_json(pre_tokenizer)
        (directory / "tokenizer.json").write_text(json.dumps(bpe, ensure_ascii=False))
    else:
        write_sentencepiece_tokenizer(tokenizer["sentencepiece"], directory)
    return directory


# Text in several scripts, so the SentencePiece fixtures' byte fallback and multi-byte pieces are exercised.
MULTILINGUAL = (
    "Le cœur a ses raisons que la raison ne connaît point. Grüße aus Köln, straße und Maß. "
    "Москва — столица России. 東京は日本の首都です。北京是中国的首都。 Ἐν ἀρχῇ ἦν ὁ λόγος. "
    "مرحبا بالعالم. नमस्ते दुनिया. 🦊🐶 3.14159 + 2,718 = 5.85959;\n\tcode:  x  =  [1, 2, 3]\n"
)


@functools.cache
def sentencepiece_model(vocab_size: int, specials: tuple[str, ...], user_defined: tuple[str, ...]) -> bytes:
    """A SentencePiece BPE model trained with the sentencepiece library on the offline Wikipedia text,
    its special tokens first (pad, eos, bos, unk ids as `specials` orders them), identity normalisation
    and no dummy prefix (as Gemma's), byte fallback for what the training text lacks."""
    import sentencepiece

    from slim.runtime.store import assets

    lines = assets.wiki_text("train").read_text(encoding="utf-8").splitlines()[:3000] + MULTILINGUAL.splitlines()
    model = io.BytesIO()
    pad, eos, bos, unk = specials
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece=pad, eos_piece=eos, bos_piece=bos, unk_piece=unk,
        user_defined_symbols=list(user_defined),
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def write_sentencepiece_tokenizer(spec: dict[str, Any], directory: Path) -> None:
    """tokenizer.model and tokenizer_config.json laid out as the family's own files are: the special
    tokens named in tokenizer_config, each marked special in added_tokens_decoder, BOS added."""
    specials = (spec["pad"], spec["eos"], spec["bos"], spec["unk"])
    user_defined = tuple(spec.get("user_defined", ()))
    (directory / "tokenizer.model").write_bytes(sentencepiece_model(spec["vocab_size"], specials, user_defined))
    decoder = {
        str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, text in enumerate(specials + user_defined)
    }  # fmt: skip
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        **{f"{kind}_token": text for kind, text in zip(("pad", "eos", "bos", "unk"), specials, strict=True)},
        "tokenizer_class": spec.get("tokenizer_class", "LlamaTokenizer"),
        **({"chat_template": spec["chat_template"]} if "chat_template" in spec else {}),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def cached(factory: Callable[[str, Path], Path], folder: Path) -> Callable[[str], Path]:
    """factory(family, path) run once per family, its result shared by the tests."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = factory(family, folder / family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def family_hf(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    # The folder name becomes general.name, which llama.cpp reads: for a "phi3" it marks tokens of
    # Phi-3's vocabulary that SmolLM2's lacks. A neutral name keeps the fixture's vocabulary loadable.
    return cached(
        lambda family, path: build_checkpoint(family, path / "checkpoint", smollm2_tokenizer),
        tmp_path_factory.mktemp("hf"),
    )


@pytest.fixture(scope="session")
def family_f32(family_hf: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    def make(family: str, path: Path) -> Path:
        out = path.with_suffix(".gguf")
        convert(family_hf(family), out, mix("F32"))
        return out

    return cached(make, tmp_path_factory.mktemp("slim-f32"))


# llama.cpp's converter names a BPE pre-tokenizer by hashing the token ids of a test string, which
# only matches the real vocabularies; the fixtures pair each family with SmolLM2's vocabulary, so the
# reference run is told the pre-tokenizer that slim read off tokenizer.json. Identifying
# pre-tokenizers is proved on its own in test_tokenizer.py; every other byte is the converter's.
REFERENCE_CONVERTER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
pre = sys.argv.pop(1)
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
convert_hf_to_gguf.main()
"""


def convert_hf_to_gguf(sources: Path, checkpoint: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's own converter (the script vendored in llama-cpp-python's source package)."""
    from slim.runtime.formats.tokenizer import read_hf_tokenizer

    pre = read_hf_tokenizer(checkpoint).pre
    arguments = [str(checkpoint), "--outtype", outtype, "--outfile", str(out)]
    subprocess.run(
        # -P: not the working directory (the repository root) on sys.path, where kernels/ would shadow
        # the `kernels` package transformers imports
        [sys.executable, "-P", "-c", REFERENCE_CONVERTER, str(sources), pre, *arguments],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return out


@pytest.fixture(scope="session")
def reference_f32(
    family_hf: Callable[[str], Path], llama_cpp_sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """llama.cpp's own converter's F32 GGUF of each fixture."""
    return cached(
        lambda family, path: convert_hf_to_gguf(llama_cpp_sources, family_hf(family), "f32", path.with_suffix(".gguf")),
        tmp_path_factory.mktemp("llama-cpp-f32"),
    )


def metadata(path: Path) -> dict[str, tuple[str, object]]:
    """key -> (GGUF value type, value) for every metadata key but the naming ones."""
    reader = gguf.GGUFReader(path)
    found = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in NAMING_KEYS:
            continue
        value = field.contents()
        found[key] = (field.types[0].name if field.types else "", value)
    return found


def transformers_logits(checkpoint: Path, tokens: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


# ---- bytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_is_llama_cpp_converters_file(
    family: str, family_f32: Callable[[str], Path], reference_f32: Callable[[str], Path]
) -> None:
    ours, theirs = family_f32(family), reference_f32(family)
    assert metadata(ours) == metadata(theirs)
    assert gguf_tensors(ours) == gguf_tensors(theirs)


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_is_llama_cpp_converters_file(
    family: str, type_name: str, family_hf: Callable[[str], Path], llama_cpp_sources: Path, tmp_path: Path
) -> None:
    """Through the command line, whose summary names the family."""
    from slim import models

    theirs = convert_hf_to_gguf(llama_cpp_sources, family_hf(family), type_name.lower(), tmp_path / "theirs.gguf")
    run = run_slim("convert", str(family_hf(family)), "-o", str(tmp_path / "ours.gguf"), "--type", type_name)
    assert run.returncode == 0, run.stderr
    assert models.for_hf_config(json.loads((family_hf(family) / "config.json").read_text())).family in run.stdout
    assert gguf_tensors(tmp_path / "ours.gguf") == gguf_tensors(theirs)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_is_llama_quantizes_file(
    family: str,
    type_name: str,
    family_hf: Callable[[str], Path],
    reference_f32: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    convert(family_hf(family), tmp_path / "ours.gguf", mix(type_name))
    llama_quantize(reference_f32(family), tmp_path / "theirs.gguf", type_name)
    assert gguf_tensors(tmp_path / "ours.gguf") == gguf_tensors(tmp_path / "theirs.gguf")


# ---- numerics and export ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(
    family: str,
    family_hf: Callable[[str], Path],
    family_f32: Callable[[str], Path],
    reference_f32: Callable[[str], Path],
) -> None:
    tokens = tokenize(family_f32(family), PROMPT)
    assert len(tokens) > 96
    truth = transformers_logits(family_hf(family), tokens)
    ours = np.abs(llama_logits(family_f32(family), tokens, exact=True) - truth).max()
    theirs = np.abs(llama_logits(reference_f32(family), tokens, exact=True) - truth).max()
    print(f"{family}: max |logit - transformers'| {ours:.2e} (slim's file), {theirs:.2e} (llama.cpp converter's)")
    assert np.abs(truth).max() > 0.5  # not a trivially flat output
    assert ours < 1e-2 and ours <= theirs + 1e-6


def tokenizer_ids(checkpoint: Path, text: str) -> list[int]:
    """The checkpoint's own tokenizer's ids for `text`, special tokens parsed: the `tokenizers` library
    on tokenizer.json, or the sentencepiece library on tokenizer.model between the special tokens
    (which it does not parse itself), with BOS where tokenizer_config adds it."""
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    if not (checkpoint / "tokenizer.model").is_file():
        import tokenizers

        return tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text).ids
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    special = {entry["content"]: int(i) for i, entry in tokenizer_config["added_tokens_decoder"].items()}
    ids = [processor.piece_to_id(tokenizer_config["bos_token"])] if tokenizer_config.get("add_bos_token") else []
    for part in re.split("(" + "|".join(map(re.escape, special)) + ")", text):
        ids += [special[part]] if part in special else processor.encode(part)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_match_the_tokenizer(
    family: str, family_hf: Callable[[str], Path], family_f32: Callable[[str], Path]
) -> None:
    """llama.cpp's ids from slim's GGUF equal the checkpoint's tokenizer's on text in several scripts
    with special tokens between the sentences."""
    import llama_cpp

    tokenizer_config = json.loads((family_hf(family) / "tokenizer_config.json").read_text())
    specials = [e["content"] for e in tokenizer_config.get("added_tokens_decoder", {}).values() if e.get("special")]
    sentences = MULTILINGUAL.split(". ")
    text = "".join(f"{sentence}{specials[i % len(specials)]}" for i, sentence in enumerate(sentences))
    llm = llama_cpp.Llama(str(family_f32(family)), vocab_only=True, verbose=False)
    ours = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert len(ours) > 100
    assert ours == tokenizer_ids(family_hf(family), text)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(family: str, family_f32: Callable[[str], Path], tmp_path: Path) -> None:
    exported = tmp_path / "hf"
    export(family_f32(family), exported, "F32")
    tokens = tokenize(family_f32(family), PROMPT)
    ours = llama_logits(family_f32(family), tokens, exact=True)
    assert np.abs(transformers_logits(exported, tokens) - ours).max() < 1e-2
    convert(exported, tmp_path / "again.gguf", mix("F32"))
    assert gguf_tensors(tmp_path / "again.gguf") == gguf_tensors(family_f32(family))


# ---- the torch student, and the commands built on it -------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_student_matches_transformers(family: str, family_hf: Callable[[str], Path]) -> None:
    from slim.runtime.train import student

    ours = student.load(family_hf(family))
    tokens = torch.randint(0, ours.arch.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(family_hf(family), dtype=torch.float32)
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    assert a.abs().max() > 0.5
    # float32 rounding of two implementations, summed over the layers, stays near 1e-5; a wrong name,
    # permutation or norm is off by O(1)
    assert (a - b).abs().max() < 1e-4


@pytest.fixture(scope="module")
def training_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slim.runtime.store import assets

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(assets.wiki_text("train").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


def training_command(command: str, checkpoint: Path, f32: Path, text: Path, out: Path) -> list[str]:
    common = ["--text", str(text), "--threads", "1", "-q"]
    if command == "prune-wanda":
        return ["prune", str(checkpoint), "-o", str(out), "--method", "wanda", "--sparsity", "0.5", "--ctx", "128",
                "--chunks", "2", *common]  # fmt: skip
    if command == "prune-layers":
        return ["prune", str(checkpoint), "-o", str(out), "--method", "layers", "--remove", "1", "--ctx", "128",
                "--chunks", "2", *common]  # fmt: skip
    if command == "distill":
        return ["distill", "--teacher", str(f32), "--student", str(checkpoint), "-o", str(out), "--steps", "2",
                "--seq-len", "64", *common]  # fmt: skip
    # the reference search: what is proved here is that QAT runs on the family, not the search's gain
    return ["qat", str(checkpoint), "--type", "Q4_K_M", "-o", str(out), "--steps", "2", "--seq-len", "64",
            "--search", "reference", *common]  # fmt: skip


@pytest.mark.parametrize("command", ["prune-wanda", "prune-layers", "distill", "qat"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_commands_run(
    family: str,
    command: str,
    family_hf: Callable[[str], Path],
    family_f32: Callable[[str], Path],
    training_text: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / ("out.gguf" if command in ("prune-wanda", "qat") else "out")
    run = run_slim(*training_command(command, family_hf(family), family_f32(family), training_text, out))
    assert run.returncode == 0, run.stderr
    assert out.exists()


def test_a_config_llama_cpp_cannot_run_is_refused() -> None:
    """llama.cpp fixes SmolLM3's layers without RoPE at every fourth; a checkpoint whose
    no_rope_layers differ (as after pruning a block out of the middle) would run wrong there."""
    from slim import models

    config = {**json.loads((FIXTURES / "smollm3.json").read_text()), "vocab_size": 49152}
    models.for_hf_config(config)
    config["no_rope_layers"] = [1, 0, 1, 1]
    with pytest.raises(models.ArchitectureError, match="no_rope_layers"):
        models.for_hf_config(config)
    config.update(use_sliding_window=True, architectures=["Qwen3ForCausalLM"], sliding_window=32)
    with pytest.raises(models.ArchitectureError, match="sliding-window"):
        models.for_hf_config(config)


# What `slim show` must say about a fixture beyond its family name.
SHOWN_FACTS = {
    "llama3": "rope scaling",
    "mistral_nemo": "head size",
    "smollm3": "layers without RoPE",
    "qwen3_moe": "experts",
    "mixtral": "experts",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_show_names_the_family_and_its_facts(family: str, family_f32: Callable[[str], Path]) -> None:
    from slim import models

    run = run_slim("show", str(family_f32(family)), "--json")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    config = json.loads((FIXTURES / f"{family}.json").read_text())
    assert info["family"] == models.class_for_hf_config(config).family
    if family in SHOWN_FACTS:
        assert SHOWN_FACTS[family] in info["facts"]
