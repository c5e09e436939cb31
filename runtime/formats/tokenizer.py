"""Tokenizers between Hugging Face files and GGUF metadata, the way llama.cpp reads and writes them.

HF -> GGUF (`read_hf_tokenizer`, `write_to_gguf`) reproduces the tokenizer.* keys of llama.cpp's
convert_hf_to_gguf.py (as vendored in the pinned llama-cpp-python 0.3.36) without transformers.
One deliberate difference: llama.cpp names the BPE pre-tokenizer by hashing the token ids of a
test string, which needs the full tokenizer and changes whenever the vocabulary does; here it is
read off tokenizer.json's pre_tokenizer and normalizer and looked up in `PRE_TOKENIZERS`. Anything
not in that table is refused rather than guessed: a wrong pre-tokenizer silently degrades every prompt.

GGUF -> HF (`read_gguf_tokenizer`, `write_hf_tokenizer`) writes a tokenizer.json that the
`tokenizers` library loads and that gives llama.cpp's token ids (byte-level BPE, "gpt2" GGUFs with a
pre-tokenizer in the table), or a SentencePiece tokenizer.model ("llama" GGUFs), plus
tokenizer_config.json and special_tokens_map.json.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import ascii_letters, digits
from typing import Any

import gguf

from slim import models

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL = int(gguf.TokenType.NORMAL)
UNKNOWN = int(gguf.TokenType.UNKNOWN)
CONTROL = int(gguf.TokenType.CONTROL)
USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
UNUSED = int(gguf.TokenType.UNUSED)
BYTE = int(gguf.TokenType.BYTE)

# The score llama.cpp's converter gives a SentencePiece vocabulary's tokens from added_tokens.json/tokenizer_config.
ADDED_TOKEN_SCORE = -1000.0

# The special tokens a spec carries, in the order llama.cpp writes their ids.
SPECIAL_TYPES = ("bos", "eos", "unk", "pad")


class TokenizerError(ValueError):
    """The tokenizer files are missing, malformed, or of a kind slim cannot convert faithfully."""


@dataclass
class TokenizerSpec:
    """Everything llama.cpp keeps of a tokenizer: the tokenizer.* keys of a GGUF.

    Optional fields are None when llama.cpp would not write the key at all (for add_bos that
    matters: llama.cpp then falls back to a per-pre-tokenizer default).
    """

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # BPE only, "left right"
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    named_chat_templates: dict[str, str] = field(default_factory=dict)

    def padded(self, vocab_size: int) -> TokenizerSpec:
        """The spec with [PAD{id}] tokens appended up to the embedding's row count, as llama.cpp pads."""
        missing = vocab_size - len(self.tokens)
        if missing < 0:
            raise TokenizerError(
                f"the tokenizer has {len(self.tokens)} tokens but the model's vocab_size is {vocab_size}"
            )
        if missing == 0:
            return self
        ids = range(len(self.tokens), vocab_size)
        return replace(
            self,
            tokens=self.tokens + [f"[PAD{i}]" for i in ids],
            token_types=self.token_types + [UNUSED] * missing,
            scores=None if self.scores is None else self.scores + [-10000.0] * missing,
        )


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers: llama.cpp's name -> the normalizer and pre_tokenizer of tokenizer.json.
# The regexes are the ones the models ship (llama.cpp's llama-vocab.cpp quotes them as the
# originals it adapts); fields that do not change token ids (trim_offsets) are not compared.

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken (Nemo, Small 3): case-aware words, single digits, and "/" kept with punctuation.
_TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer as tokenizer.json spells it."""

    normalizer: dict[str, Any] | None
    steps: tuple[dict[str, Any], ...]
    ignore_merges: bool = False  # llama.cpp looks whole words up in the vocab first (llama-bpe)

    def pre_tokenizer_json(self) -> dict[str, Any]:
        if len(self.steps) == 1:
            return self.steps[0]
        return {"type": "Sequence", "pretokenizers": list(self.steps)}


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # GPT-2's own regex inside ByteLevel.
    "gpt-2": PreTokenizer(None, (_byte_level(use_regex=True),)),
    # SmolLM / StarCoder: every digit on its own, then GPT-2's regex. llama.cpp's "starcoder"
    # splits identically (it differs only in detokenizer space cleanup).
    "smollm": PreTokenizer(None, ({"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True))),
    # Llama 3: GPT-4 style regex, numbers in runs of up to three digits.
    "llama-bpe": PreTokenizer(None, (_split(_LLAMA3_REGEX), _byte_level(use_regex=False)), ignore_merges=True),
    # Qwen2 / Qwen2.5: the same regex with single digits, after NFC.
    "qwen2": PreTokenizer({"type": "NFC"}, (_split(_QWEN2_REGEX), _byte_level(use_regex=False))),
    "tekken": PreTokenizer(None, (_split(_TEKKEN_REGEX), _byte_level(use_regex=False)), ignore_merges=True),
}


def _canonical_step(step: dict[str, Any]) -> Any:
    """What of one pre-tokenizer step decides the splits, with tokenizers' defaults filled in."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return (kind, step.get("add_prefix_space", True), step.get("use_regex", True))
    if kind == "Digits":
        return (kind, step.get("individual_digits", False))
    if kind == "Split":
        pattern = json.dumps(step.get("pattern"), sort_keys=True)
        return (kind, pattern, step.get("behavior"), step.get("invert", False))
    return (kind, json.dumps(step, sort_keys=True))


def _flat_steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [s for inner in pre_tokenizer.get("pretokenizers", []) for s in _flat_steps(inner)]
    return [pre_tokenizer]


def _canonical_normalizer(normalizer: dict[str, Any] | None) -> Any:
    if normalizer is None or (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        return None
    return json.dumps(normalizer, sort_keys=True)


def _fingerprint(normalizer: dict[str, Any] | None, pre_tokenizer: dict[str, Any] | None) -> Any:
    return _canonical_normalizer(normalizer), tuple(_canonical_step(s) for s in _flat_steps(pre_tokenizer))


_BY_FINGERPRINT = {_fingerprint(p.normalizer, p.pre_tokenizer_json()): name for name, p in PRE_TOKENIZERS.items()}


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer (and normalizer) of a parsed tokenizer.json."""
    normalizer, pre = tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")
    name = _BY_FINGERPRINT.get(_fingerprint(normalizer, pre))
    if name is None:
        steps = "+".join(str(s.get("type")) for s in _flat_steps(pre)) or "(none)"
        if normalizer is not None and _canonical_normalizer(normalizer) is not None:
            steps += f" after a {normalizer.get('type')} normalizer"
        raise TokenizerError(
            f"the pre-tokenizer {steps} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return name


# ---------------------------------------------------------------------------------------------
# HF -> GGUF


def read_hf_tokenizer(model_dir: Path, vocab_size: int | None = None) -> TokenizerSpec:
    """The tokenizer of an HF model folder as llama.cpp's converter would write it.

    tokenizer.model (SentencePiece) wins over tokenizer.json, as in llama.cpp. vocab_size (default:
    config.json's) is the embedding's row count; ids the tokenizer lacks become [PAD{id}] tokens.
    The family config.json names (slim.models) may set fields itself, as its llama.cpp converter does.
    """
    model_dir = Path(model_dir)
    config = _load_json(model_dir / "config.json") or {}
    # An empty tokenizer_config.json counts as none, as in llama.cpp.
    tokenizer_config = _load_json(model_dir / "tokenizer_config.json") or None
    tokenizer_json = _load_json(model_dir / "tokenizer.json")
    if vocab_size is None:
        vocab_size = _config_value(config, "vocab_size")

    if (model_dir / "tokenizer.model").is_file():
        spec = _read_sentencepiece(model_dir, tokenizer_config, vocab_size)
    elif tokenizer_json is not None:
        spec = _read_byte_level_bpe(tokenizer_json, tokenizer_config, model_dir / "tokenizer.json", vocab_size)
    else:
        raise TokenizerError(f"no tokenizer found in {model_dir}: expected tokenizer.json or tokenizer.model")

    ids, add = _special_tokens(tokenizer_json, tokenizer_config, config, len(spec.tokens))
    spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id = (ids.get(t) for t in SPECIAL_TYPES)
    spec.add_bos, spec.add_eos = add.get("bos"), add.get("eos")

    family = models.class_for_hf_config(config)
    if family is not None:
        for name, value in family.tokenizer_overrides(config, tokenizer_config).items():
            setattr(spec, name, value)

    if tokenizer_config is not None:  # llama.cpp reads templates only next to a tokenizer_config.json
        spec.chat_template, spec.named_chat_templates = _chat_templates(model_dir, tokenizer_config)
    return spec


def write_to_gguf(spec: TokenizerSpec, writer: gguf.GGUFWriter, vocab_size: int | None = None) -> None:
    """Add the tokenizer.* keys, padding the vocabulary to vocab_size (the embedding's rows) if given."""
    if vocab_size is not None:
        spec = spec.padded(vocab_size)
    if spec.add_space_prefix is not None:
        writer.add_add_space_prefix(spec.add_space_prefix)
    writer.add_tokenizer_model(spec.model)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(spec.tokens)
    if spec.scores is not None:
        writer.add_token_scores(spec.scores)
    writer.add_token_types(spec.token_types)
    if spec.merges:
        writer.add_token_merges(spec.merges)
    for kind in SPECIAL_TYPES:
        if (token_id := getattr(spec, f"{kind}_id")) is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    if spec.add_bos is not None:
        writer.add_add_bos_token(spec.add_bos)
    if spec.add_eos is not None:
        writer.add_add_eos_token(spec.add_eos)
    if spec.named_chat_templates:
        choices = [{"name": name, "template": t} for name, t in spec.named_chat_templates.items()]
        if spec.chat_template is not None:
            choices.insert(0, {"name": "default", "template": spec.chat_template})
        writer.add_chat_template(choices)
    elif spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from None


def _config_value(config: dict[str, Any], key: str) -> Any:
    """A config.json value, looking into text_config for multimodal configs as llama.cpp does."""
    if key in config:
        return config[key]
    return (config.get("text_config") or {}).get(key)


def _looks_special(text: str) -> bool:
    """llama.cpp's guess for added tokens that some models forget to mark special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _added_token_type(text: str, special: bool) -> tuple[str, int]:
    """(text as stored, type) of an added token: llama.cpp stores user-defined spaces pre-normalized."""
    if special or _looks_special(text):
        return text, CONTROL
    return text.replace("\u2581", " "), USER_DEFINED


def _read_byte_level_bpe(
    tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any] | None, path: Path, vocab_size: int | None
) -> TokenizerSpec:
    model = tokenizer_json.get("model") or {}
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise TokenizerError(
            f"{path} is not a byte-level BPE tokenizer (model {model.get('type')}, "
            f"byte_fallback {bool(model.get('byte_fallback'))}, decoder {decoder}); "
            "only byte-level BPE tokenizer.json or a SentencePiece tokenizer.model is supported"
        )
    pre = pre_tokenizer_name(tokenizer_json)

    texts: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["content"]: a for a in tokenizer_json.get("added_tokens", [])}
    texts.update((a["id"], a["content"]) for a in added.values())
    if not texts:
        raise TokenizerError(f"{path} has an empty vocabulary")
    # transformers (which llama.cpp's converter loads) takes the special flag from tokenizer_config.
    decoder_entries = (tokenizer_config or {}).get("added_tokens_decoder") or {}
    special = {a["content"]: bool(decoder_entries.get(str(a["id"]), a).get("special")) for a in added.values()}
    n_tokens = vocab_size or max(texts) + 1
    if max(texts) >= n_tokens:
        raise TokenizerError(f"{path} has token id {max(texts)} but the model's vocab_size is {n_tokens}")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_tokens):
        text = texts.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif text in added:
            text, kind = _added_token_type(text, special[text])
            tokens.append(text)
            types.append(kind)
        else:
            tokens.append(text)
            types.append(NORMAL)
    return TokenizerSpec("gpt2", pre, tokens, types, merges=_merges(model.get("merges") or [], path))


def _merges(merges: list[Any], path: Path) -> list[str]:
    """Merges as GGUF stores them, "left right"; a space inside a pair part is written as U+0120."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    raise TokenizerError(f"{path}: unknown format of model.merges")


def _read_sentencepiece(
    model_dir: Path, tokenizer_config: dict[str, Any] | None, vocab_size: int | None
) -> TokenizerSpec:
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path} is not a SentencePiece model: {exc}") from None
    n_pieces = processor.vocab_size()
    n_tokens = vocab_size or n_pieces
    if n_pieces > n_tokens:
        raise TokenizerError(f"{path} has {n_pieces} pieces but the model's vocab_size is {n_tokens}")

    tokens = [f"[PAD{i}]" for i in range(n_tokens)]
    scores = [-10000.0] * n_tokens
    types = [UNUSED] * n_tokens
    for i in range(n_pieces):
        tokens[i] = processor.IdToPiece(i)
        scores[i] = processor.GetScore(i)
        types[i] = (
            UNKNOWN
            if processor.IsUnknown(i)
            else CONTROL
            if processor.IsControl(i)
            else UNUSED
            if processor.IsUnused(i)
            else BYTE
            if processor.IsByte(i)
            else NORMAL
        )

    added_tokens = _load_json(model_dir / "added_tokens.json") or {}
    for text, i in added_tokens.items():
        if i < n_tokens:
            tokens[i], scores[i], types[i] = text, ADDED_TOKEN_SCORE, USER_DEFINED
    for key, entry in ((tokenizer_config or {}).get("added_tokens_decoder") or {}).items():
        i = int(key)
        if i < n_tokens:
            tokens[i], types[i] = _added_token_type(entry["content"], bool(entry.get("special")))
            scores[i] = ADDED_TOKEN_SCORE
    return TokenizerSpec("llama", "default", tokens, types, scores=scores)


def _token_content(entry: Any) -> str | None:
    """A tokenizer_config special-token entry: a string or an AddedToken dict."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_tokens(
    tokenizer_json: dict[str, Any] | None,
    tokenizer_config: dict[str, Any] | None,
    config: dict[str, Any],
    n_tokens: int,
) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and add-bos/eos flags, resolved in llama.cpp's order (gguf-py SpecialVocab).

    Ids come from tokenizer_config's token strings looked up among tokenizer.json's added tokens,
    then from config.json's *_token_id; the first source to give one wins. The add flags come from
    tokenizer.json's post-processor, then from tokenizer_config's add_*_token where it said nothing.
    """
    strings = {
        kind: _token_content((tokenizer_config or {}).get(f"{kind}_token"))
        for kind in ("bos", "eos", "unk", "pad", "cls", "sep")
    }
    add: dict[str, bool] = {}
    if tokenizer_json is not None:
        if tokenizer_config is not None:
            strings["bos"] = strings["bos"] or strings["cls"]
            strings["eos"] = strings["eos"] or strings["sep"]
        post_processor = tokenizer_json.get("post_processor") or {}
        for processor in post_processor.get("processors", [post_processor]):
            if processor.get("type") == "ByteLevel":
                add.setdefault("bos", False)
                add.setdefault("eos", False)
            elif processor.get("type") == "RobertaProcessing":
                add["bos"] = add["eos"] = True
            elif processor.get("type") == "TemplateProcessing" and len(processor.get("single", [])) > 1:
                first = processor["single"][0].get("SpecialToken", {}).get("id")
                last = processor["single"][-1].get("SpecialToken", {}).get("id")
                if first:
                    # A leading special token that tokenizer_config does not name becomes the bos.
                    if tokenizer_config is not None and first not in (strings["bos"], strings["cls"]):
                        strings["bos"] = strings["bos"] or first
                        strings["cls"] = strings["cls"] or first
                    add["bos"] = tokenizer_config is None or first in (strings["bos"], strings["cls"])
                if last:
                    if tokenizer_config is not None and last != strings["eos"]:
                        raise TokenizerError(
                            f"tokenizer.json's post-processor appends {last!r}, which is not the "
                            f"eos token {strings['eos']!r}; such tokenizers are not supported"
                        )
                    add["eos"] = True

    ids: dict[str, int] = {}

    def set_id(kind: str, token_id: Any) -> None:
        if not isinstance(token_id, int) or kind in ids:
            return
        if token_id < 0:
            raise TokenizerError(f"invalid {kind} token id {token_id}")
        if token_id < n_tokens:
            ids[kind] = token_id

    if tokenizer_config is not None:
        added_tokens = (tokenizer_json or {}).get("added_tokens", [])
        for kind in SPECIAL_TYPES:
            flag = tokenizer_config.get(f"add_{kind}_token")
            if kind in ("bos", "eos") and isinstance(flag, bool):
                add.setdefault(kind, flag)
            if strings[kind] is not None:
                set_id(kind, next((a.get("id") for a in added_tokens if a.get("content") == strings[kind]), None))
    for kind in SPECIAL_TYPES:
        set_id(kind, _config_value(config, f"{kind}_token_id"))
    return ids, add


def _chat_templates(model_dir: Path, tokenizer_config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """(default template, named others) from tokenizer_config.json, else chat_template.jinja/.json."""
    value = tokenizer_config.get("chat_template")
    if value is None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            value = jinja.read_text(encoding="utf-8")
            extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                value = [{"name": "default", "template": value}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra
                ]
        else:
            value = (_load_json(model_dir / "chat_template.json") or {}).get("chat_template")
    if value is None or isinstance(value, str):
        return value, {}
    if not isinstance(value, list):
        raise TokenizerError(f"chat_template in {model_dir / 'tokenizer_config.json'} is not a string or a list")
    default = None
    named: dict[str, str] = {}
    for choice in value:
        # GGUF key names allow only letters, digits and "_" (gguf-py's rule).
        name = "".join(c if c in ascii_letters + digits else "_" for c in choice.get("name", ""))
        template = choice.get("template")
        if name and template is not None:
            if name == "default":
                default = template
            else:
                named[name] = template
    return default, named


# ---------------------------------------------------------------------------------------------
# GGUF -> HF


def read_gguf_tokenizer(reader: gguf.GGUFReader) -> TokenizerSpec:
    """The tokenizer.* keys of a GGUF as a spec (the inverse of write_to_gguf)."""
    keys = gguf.Keys.Tokenizer

    def get(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    model, tokens, types = get(keys.MODEL), get(keys.LIST), get(keys.TOKEN_TYPE)
    if model is None or tokens is None:
        raise TokenizerError("the GGUF has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    named = {name: get(keys.CHAT_TEMPLATE_N.format(name=name)) for name in get(keys.CHAT_TEMPLATES) or []}
    return TokenizerSpec(
        model=model,
        pre=get(keys.PRE) or "default",
        tokens=tokens,
        token_types=types if types is not None else [NORMAL] * len(tokens),
        scores=get(keys.SCORES),
        merges=get(keys.MERGES),
        bos_id=get(keys.BOS_ID),
        eos_id=get(keys.EOS_ID),
        unk_id=get(keys.UNK_ID),
        pad_id=get(keys.PAD_ID),
        add_bos=get(keys.ADD_BOS),
        add_eos=get(keys.ADD_EOS),
        add_space_prefix=get(keys.ADD_PREFIX),
        chat_template=get(keys.CHAT_TEMPLATE),
        named_chat_templates={k: v for k, v in named.items() if v is not None},
    )


def write_hf_tokenizer(reader: gguf.GGUFReader, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a GGUF's tokenizer.

    [PAD{id}] filler tokens are left out: reading the folder back restores them from
    config.json's vocab_size, as llama.cpp's converter does.
    """
    spec = read_gguf_tokenizer(reader)
    if spec.model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"exporting a {spec.model!r} tokenizer is not supported; "
            "only byte-level BPE ('gpt2') and SentencePiece ('llama') GGUF tokenizers can be exported"
        )
    pre = PRE_TOKENIZERS.get(spec.pre)
    if pre is None and spec.model == "gpt2":
        raise TokenizerError(
            f"exporting the pre-tokenizer {spec.pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    context = (
        None
        if architecture is None
        else reader.get_field(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=architecture.contents()))
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if pre is None:
        (out_dir / "tokenizer.model").write_bytes(_sentencepiece_model(spec))
    else:
        _write_json(out_dir / "tokenizer.json", _tokenizer_json(spec, pre))
    special_map = {
        f"{kind}_token": spec.tokens[i] for kind in SPECIAL_TYPES if (i := getattr(spec, f"{kind}_id")) is not None
    }
    config: dict[str, Any] = {}
    for key, value in (
        ("add_bos_token", spec.add_bos),
        ("add_eos_token", spec.add_eos),
        ("add_prefix_space", spec.add_space_prefix),
    ):
        if value is not None:
            config[key] = value
    # tokenizer.model keeps its own control pieces: only the tokens llama.cpp's converter added from
    # tokenizer_config (score -1000) go back there, so that reading the export gives the same scores.
    config["added_tokens_decoder"] = {
        str(i): _added_token(spec.tokens[i], kind)
        for i, kind in enumerate(spec.token_types)
        if kind in (CONTROL, USER_DEFINED) and (pre is not None or (spec.scores or [])[i] == ADDED_TOKEN_SCORE)
    }
    config.update(special_map)
    if spec.named_chat_templates:
        default = [] if spec.chat_template is None else [{"name": "default", "template": spec.chat_template}]
        named = [{"name": n, "template": t} for n, t in spec.named_chat_templates.items()]
        config["chat_template"] = default + named
    elif spec.chat_template is not None:
        config["chat_template"] = spec.chat_template
    config["clean_up_tokenization_spaces"] = False
    if context is not None:
        config["model_max_length"] = int(context.contents())
    if pre is not None:  # a tokenizer.model is read by the class config.json's model type implies
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_map)


def _sentencepiece_model(spec: TokenizerSpec) -> bytes:
    """tokenizer.model for a SentencePiece GGUF: a BPE model of its pieces, scores and types, with
    llama.cpp's normalisation (none but spaces as U+2581, a leading one if add_space_prefix).

    Written as protobuf wire format directly (sentencepiece_model.proto's field numbers): the
    sentencepiece package's own proto module needs the protobuf package, which slim does not."""
    tokens, types = list(spec.tokens), list(spec.token_types)
    while tokens and types[-1] == UNUSED and tokens[-1] == f"[PAD{len(tokens) - 1}]":
        tokens.pop(), types.pop()
    # SentencePiece needs an unknown piece: the GGUF's, else its UNKNOWN-typed token, else llama.cpp's default id 0.
    unk_id = spec.unk_id if spec.unk_id is not None else next((i for i, t in enumerate(types) if t == UNKNOWN), 0)
    if unk_id >= len(tokens):
        raise TokenizerError(f"the GGUF's unknown token id {unk_id} is past its {len(tokens)} tokens")
    types[unk_id] = UNKNOWN
    scores = spec.scores or [0.0] * len(tokens)

    def varint(value: int) -> bytes:
        value &= (1 << 64) - 1  # negative int32 fields are sign-extended to 64 bits
        out = bytearray()
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out + bytes([value]))

    def number(field_number: int, value: int) -> bytes:
        return varint(field_number << 3) + varint(value)

    def nested(field_number: int, payload: bytes) -> bytes:
        return varint(field_number << 3 | 2) + varint(len(payload)) + payload

    def text(field_number: int, value: str) -> bytes:
        return nested(field_number, value.encode("utf-8"))

    pieces = b"".join(
        nested(1, text(1, token) + varint(2 << 3 | 5) + struct.pack("<f", scores[i]) + number(3, types[i]))
        for i, token in enumerate(tokens)
    )
    trainer = number(3, 2) + number(4, len(tokens)) + number(35, int(BYTE in types))  # model_type BPE
    for field_number, kind in zip((40, 41, 42, 43), ("unk", "bos", "eos", "pad"), strict=True):
        token_id = unk_id if kind == "unk" else getattr(spec, f"{kind}_id")
        trainer += number(field_number, -1 if token_id is None or token_id >= len(tokens) else token_id)
        if token_id is not None and token_id < len(tokens):
            trainer += text(field_number + 5, tokens[token_id])  # unk_piece 45 ... pad_piece 48
    add_prefix = spec.add_space_prefix is not False  # llama.cpp's default for SentencePiece
    normalizer = text(1, "identity") + number(3, int(add_prefix)) + number(4, 0) + number(5, 1)
    return pieces + nested(2, trainer) + nested(3, normalizer)


def _added_token(text: str, kind: int) -> dict[str, Any]:
    return {
        "content": text,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": kind == CONTROL,
    }


def _tokenizer_json(spec: TokenizerSpec, pre: PreTokenizer) -> dict[str, Any]:
    vocab: dict[str, int] = {}
    added = []
    for i, (text, kind) in enumerate(zip(spec.tokens, spec.token_types, strict=True)):
        if kind == UNUSED and text == f"[PAD{i}]":
            continue
        if text in vocab:
            # `tokenizers` keys its vocabulary by text: a second id would be silently dropped.
            raise TokenizerError(
                f"token {text!r} appears twice in the GGUF vocabulary (ids {vocab[text]} "
                f"and {i}); such a vocabulary cannot be written as tokenizer.json"
            )
        vocab[text] = i
        if kind in (CONTROL, USER_DEFINED):
            added.append({"id": i, **_added_token(text, kind)})

    merges = []
    for merge in spec.merges or []:
        cut = merge.find(" ", 1)  # llama.cpp's split: the first space after the first character
        if cut < 0:
            raise TokenizerError(f"malformed merge {merge!r} in the GGUF")
        merges.append([merge[:cut], merge[cut + 1 :]])

    prefix = [spec.bos_id] if spec.add_bos and spec.bos_id is not None else []
    suffix = [spec.eos_id] if spec.add_eos and spec.eos_id is not None else []
    if prefix or suffix:

        def template(sequence: str, type_id: int) -> list[dict[str, Any]]:
            return (
                [{"SpecialToken": {"id": spec.tokens[i], "type_id": type_id}} for i in prefix]
                + [{"Sequence": {"id": sequence, "type_id": type_id}}]
                + [{"SpecialToken": {"id": spec.tokens[i], "type_id": type_id}} for i in suffix]
            )

        post_processor: dict[str, Any] | None = {
            "type": "TemplateProcessing",
            "single": template("A", 0),
            "pair": template("A", 0) + template("B", 1),
            "special_tokens": {
                spec.tokens[i]: {"id": spec.tokens[i], "ids": [i], "tokens": [spec.tokens[i]]} for i in prefix + suffix
            },
        }
    else:
        # No post-processor rather than ByteLevel's, which llama.cpp reads as add_bos/add_eos = false.
        post_processor = None

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": pre.normalizer,
        "pre_tokenizer": pre.pre_tokenizer_json(),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
