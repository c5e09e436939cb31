"""slim.runtime.formats.tokenizer: HF tokenizer files <-> GGUF tokenizer keys, checked against llama.cpp.

The real SmolLM2 GGUF is exported and read back; small tokenizers trained here cover the other
pre-tokenizers and SentencePiece. Where llama-cpp-python is installed, token ids are compared with
llama.cpp's own tokenizer, which is the behaviour a converted model has to reproduce.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from helpers import LLAMA3_REGEX, QWEN2_REGEX, TEKKEN_REGEX
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from slim.runtime.formats.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    TokenizerError,
    read_gguf_tokenizer,
    read_hf_tokenizer,
    write_hf_tokenizer,
    write_to_gguf,
)

CORPUS = [
    f"In {1900 + i} the {word} counted {i * 37} ships; they'd seen {i * 1234 % 9973} more, "
    f"and I'VE heard   it's {i / 7:.3f} km away.\n\tcafé naïve Ångström {'ñ' * (i % 3)} 我想 🦙 --- McDonaldsHQ iPhone"
    for i in range(200)
    for word in ("city", "harbour", "council", "river")
]
SAMPLE = (
    "Hello world! I'VE seen 12345 cats in 2024, they're 3.14 happy.\n\n\tIndented  double  spaces\r\n"
    "Ångström naïve café 我想在apple工作1314151天 🦙🦙 ------======= '''```\"quoted\"... we'Ve a'lL "
    "McDonaldsHQ iPhone "
)


def _llama_cpp_tokenizer(gguf_path: Path) -> Callable[[str], list[int]]:
    """llama.cpp's tokenizer for a GGUF: no BOS added, special tokens not parsed from the text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def _write_vocab_gguf(spec, path: Path, vocab_size: int | None = None) -> Path:
    """A tensor-less GGUF holding the tokenizer and just enough hparams for llama.cpp to load it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    write_to_gguf(spec, writer, vocab_size=vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def _tokenizer_fields(path: Path) -> dict[str, tuple[list[int], object]]:
    reader = gguf.GGUFReader(path)
    return {
        name: ([int(t) for t in f.types], f.contents())
        for name, f in reader.fields.items()
        if name.startswith("tokenizer.")
    }


@functools.cache
def _base_vocabulary() -> str:
    """A small byte-level BPE trained without any splitting, so its merges cross word, digit and
    punctuation boundaries: with it, each pre-tokenizer gives different token ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.to_str()


def _bpe(pre_tokenizer, normalizer=None) -> Tokenizer:
    tokenizer = Tokenizer.from_str(_base_vocabulary())
    tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    return tokenizer


PRE_TOKENIZER_CASES = {
    "gpt-2": lambda: _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "smollm": lambda: _bpe(
        pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    ),
    "llama-bpe": lambda: _bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
    "qwen2": lambda: _bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        normalizers.NFC(),
    ),
    "tekken": lambda: _bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(TEKKEN_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
}


# --- the real SmolLM2 GGUF -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-hf")
    write_hf_tokenizer(gguf.GGUFReader(smollm2_gguf), out)
    # What `slim export` writes next to the tokenizer; llama.cpp's converter reads it too.
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152}))
    return out


def test_export_is_a_valid_tokenizers_file(exported: Path) -> None:
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 49152
    encoding = tokenizer.encode("<|im_start|>user\nHi 42<|im_end|>", add_special_tokens=False)
    assert encoding.tokens == ["<|im_start|>", "user", "Ċ", "Hi", "Ġ", "4", "2", "<|im_end|>"]
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    specials = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    assert json.loads((exported / "special_tokens_map.json").read_text())["unk_token"] == "<|endoftext|>"


def test_smollm_round_trip_is_exact(smollm2_gguf: Path, exported: Path) -> None:
    original = read_gguf_tokenizer(gguf.GGUFReader(smollm2_gguf))
    back = read_hf_tokenizer(exported)
    assert (back.model, back.pre, back.add_bos, back.add_space_prefix) == ("gpt2", "smollm", False, False)
    assert (back.bos_id, back.eos_id, back.unk_id, back.pad_id) == (1, 2, 0, 2)
    assert back.token_types.count(CONTROL) == 17
    assert back.tokens == original.tokens
    assert back.token_types == original.token_types
    assert back.merges == original.merges
    assert back.chat_template == original.chat_template
    assert back == original


def test_smollm_gguf_keys_are_rewritten_identically(smollm2_gguf: Path, exported: Path, tmp_path: Path) -> None:
    rewritten = _write_vocab_gguf(read_hf_tokenizer(exported), tmp_path / "vocab.gguf")
    assert _tokenizer_fields(rewritten) == _tokenizer_fields(smollm2_gguf)


def test_smollm_ids_match_llama_cpp_on_real_text(smollm2_gguf: Path, exported: Path, heldout_text: str) -> None:
    paragraphs = heldout_text[:200_000].split("\n\n")
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    ours = [e.ids for e in tokenizer.encode_batch(paragraphs, add_special_tokens=False)]
    llama_cpp_tokenize = _llama_cpp_tokenizer(smollm2_gguf)
    theirs = [llama_cpp_tokenize(p) for p in paragraphs]
    mismatched = [p[:80] for p, a, b in zip(paragraphs, ours, theirs, strict=False) if a != b]
    assert not mismatched
    assert sum(map(len, ours)) > 40_000


# --- pre-tokenizer identification, on tokenizers trained here ----------------------------------


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZER_CASES))
def test_pre_tokenizer_is_identified_and_tokenizes_like_llama_cpp(name: str, tmp_path: Path) -> None:
    trained = PRE_TOKENIZER_CASES[name]()
    trained.save(str(tmp_path / "tokenizer.json"))
    spec = read_hf_tokenizer(tmp_path)
    assert (spec.model, spec.pre) == ("gpt2", name)
    assert spec.token_types[:3] == [CONTROL, CONTROL, NORMAL]

    vocab_gguf = _write_vocab_gguf(spec, tmp_path / "vocab.gguf")
    expected = trained.encode(SAMPLE, add_special_tokens=False).ids
    assert _llama_cpp_tokenizer(vocab_gguf)(SAMPLE) == expected
    for other in sorted(set(PRE_TOKENIZER_CASES) - {name}):  # the check above can tell the names apart
        mislabelled = _write_vocab_gguf(dataclasses.replace(spec, pre=other), tmp_path / f"{other}.gguf")
        assert _llama_cpp_tokenizer(mislabelled)(SAMPLE) != expected, other

    out = tmp_path / "exported"
    write_hf_tokenizer(gguf.GGUFReader(vocab_gguf), out)
    exported = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert exported.encode(SAMPLE, add_special_tokens=False).ids == expected
    assert read_hf_tokenizer(out) == spec


def test_added_tokens_special_ids_and_padding(tmp_path: Path) -> None:
    trained = PRE_TOKENIZER_CASES["llama-bpe"]()
    trained.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    trained.add_tokens(
        [
            AddedToken("<think>", special=False),
            AddedToken("<|eot_id|>", special=False),
            AddedToken("\u2581tab", special=False),
        ]
    )
    trained.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", trained.token_to_id("<|begin_of_text|>"))],
    )
    trained.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True}})
    )
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 432, "pad_token_id": 1}))

    spec = read_hf_tokenizer(tmp_path)
    n = trained.get_vocab_size()
    assert len(spec.tokens) == 432
    assert spec.tokens[n - 5 : n] == ["<|begin_of_text|>", "<|end_of_text|>", "<think>", "<|eot_id|>", " tab"]
    assert spec.token_types[n - 5 : n] == [CONTROL, CONTROL, USER_DEFINED, CONTROL, USER_DEFINED]
    assert spec.tokens[n:] == [f"[PAD{i}]" for i in range(n, 432)]
    assert set(spec.token_types[n:]) == {UNUSED}
    assert (spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id) == (n - 5, n - 4, None, 1)
    assert (spec.add_bos, spec.add_eos, spec.add_space_prefix, spec.chat_template) == (True, None, None, None)

    fields = _tokenizer_fields(_write_vocab_gguf(spec, tmp_path / "vocab.gguf"))
    assert "tokenizer.ggml.scores" not in fields and "tokenizer.ggml.unknown_token_id" not in fields
    assert fields["tokenizer.ggml.add_bos_token"] == ([int(gguf.GGUFValueType.BOOL)], True)
    assert fields["tokenizer.ggml.bos_token_id"] == ([int(gguf.GGUFValueType.UINT32)], n - 5)


def test_add_flags_follow_the_post_processor_first(tmp_path: Path) -> None:
    trained = PRE_TOKENIZER_CASES["gpt-2"]()
    trained.post_processor = processors.ByteLevel(trim_offsets=False)
    trained.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "eos_token": "<|endoftext|>"}))
    spec = read_hf_tokenizer(tmp_path)
    # llama.cpp reads a ByteLevel post-processor as "adds nothing" and lets it win over tokenizer_config.
    assert (spec.add_bos, spec.add_eos, spec.eos_id) == (False, False, 0)


def test_write_to_gguf_pads_to_the_embedding(tmp_path: Path) -> None:
    PRE_TOKENIZER_CASES["gpt-2"]().save(str(tmp_path / "tokenizer.json"))
    spec = read_hf_tokenizer(tmp_path)
    fields = _tokenizer_fields(_write_vocab_gguf(spec, tmp_path / "vocab.gguf", vocab_size=len(spec.tokens) + 3))
    assert fields["tokenizer.ggml.tokens"][1][-1] == f"[PAD{len(spec.tokens) + 2}]"
    assert fields["tokenizer.ggml.token_type"][1][-3:] == [UNUSED] * 3
    with pytest.raises(TokenizerError, match="vocab_size"):
        write_to_gguf(spec, gguf.GGUFWriter(None, "llama"), vocab_size=len(spec.tokens) - 1)


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    _bpe(pre_tokenizers.Whitespace()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        TokenizerError,
        match=r"pre-tokenizer Whitespace is not supported; supported: gpt-2, "
        r"llama-bpe, qwen2, smollm",
    ) as caught:
        read_hf_tokenizer(tmp_path)
    assert "\n" not in str(caught.value)


def test_qwen2_regex_without_its_normalizer_is_refused(tmp_path: Path) -> None:
    _bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="Split\\+ByteLevel is not supported"):
        read_hf_tokenizer(tmp_path)


def test_non_byte_level_tokenizer_json_is_refused(tmp_path: Path) -> None:
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="not a byte-level BPE tokenizer"):
        read_hf_tokenizer(tmp_path)


def test_missing_tokenizer_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer found in .*: expected tokenizer.json or tokenizer.model"):
        read_hf_tokenizer(tmp_path)


# --- SentencePiece -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    return trained_sentencepiece()


@functools.cache
def trained_sentencepiece() -> bytes:
    """A 400-piece SentencePiece BPE model with byte fallback, trained on CORPUS."""
    import sentencepiece

    model = io.BytesIO()
    # identity normalization: llama.cpp does not apply sentencepiece's default NFKC.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        byte_fallback=True,
        model_type="bpe",
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return model.getvalue()


def test_sentencepiece_vocabulary(sentencepiece_model: bytes, tmp_path: Path) -> None:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 404, "bos_token_id": 1, "eos_token_id": 2})
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "add_prefix_space": True,
                "added_tokens_decoder": {
                    "400": {"content": "<|im_end|>", "special": True},
                    "401": {"content": "\u2581hey", "special": False},
                },
            }
        )
    )

    spec = read_hf_tokenizer(tmp_path)
    assert (spec.model, spec.pre, spec.merges) == ("llama", "default", None)
    assert spec.tokens[:400] == [processor.id_to_piece(i) for i in range(400)]
    assert spec.scores[:400] == [processor.get_score(i) for i in range(400)]
    assert spec.token_types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE]
    assert spec.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(spec.token_types[3:259]) == {BYTE}
    assert set(spec.token_types[259:400]) == {NORMAL}
    assert spec.tokens[400:] == ["<|im_end|>", " hey", "[PAD402]", "[PAD403]"]
    assert spec.token_types[400:] == [CONTROL, USER_DEFINED, UNUSED, UNUSED]
    assert spec.scores[400:] == [-1000.0, -1000.0, -10000.0, -10000.0]
    assert (spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id) == (1, 2, None, None)
    assert (spec.add_bos, spec.add_eos, spec.add_space_prefix) == (True, False, True)

    vocab_gguf = _write_vocab_gguf(spec, tmp_path / "vocab.gguf")
    assert read_gguf_tokenizer(gguf.GGUFReader(vocab_gguf)) == spec
    text = "In 1984 the harbour counted 12345 ships; café naïve 我想"
    assert _llama_cpp_tokenizer(vocab_gguf)(text) == processor.encode(text)
    # Exported as a tokenizer.model that sentencepiece loads and that reads back as the same spec.
    write_hf_tokenizer(gguf.GGUFReader(vocab_gguf), tmp_path / "out")
    (tmp_path / "out" / "config.json").write_text((tmp_path / "config.json").read_text())
    exported = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert exported.encode(text) == processor.encode(text)
    assert read_hf_tokenizer(tmp_path / "out") == spec


# --- chat templates ----------------------------------------------------------------------------


@pytest.fixture
def bpe_dir(tmp_path: Path) -> Path:
    PRE_TOKENIZER_CASES["gpt-2"]().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_chat_template_from_tokenizer_config(bpe_dir: Path) -> None:
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (bpe_dir / "chat_template.jinja").write_text("ignored: tokenizer_config.json wins")
    assert read_hf_tokenizer(bpe_dir).chat_template == "{{ messages }}"


def test_chat_template_from_jinja_file(bpe_dir: Path) -> None:
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    (bpe_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n")
    assert read_hf_tokenizer(bpe_dir).chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}\n"


def test_named_chat_templates(bpe_dir: Path) -> None:
    (bpe_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "default", "template": "plain"},
                    {"name": "tool-use", "template": "with tools"},
                ]
            }
        )
    )
    spec = read_hf_tokenizer(bpe_dir)
    assert (spec.chat_template, spec.named_chat_templates) == ("plain", {"tool_use": "with tools"})
    fields = _tokenizer_fields(_write_vocab_gguf(spec, bpe_dir / "vocab.gguf"))
    assert fields["tokenizer.chat_template"][1] == "plain"
    assert fields["tokenizer.chat_template.tool_use"][1] == "with tools"
    assert fields["tokenizer.chat_templates"][1] == ["tool_use"]

    out = bpe_dir / "exported"
    write_hf_tokenizer(gguf.GGUFReader(bpe_dir / "vocab.gguf"), out)
    back = read_hf_tokenizer(out)
    assert (back.chat_template, back.named_chat_templates) == ("plain", {"tool_use": "with tools"})
