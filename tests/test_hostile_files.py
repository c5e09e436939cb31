"""Hostile files: each one a forged file that would crash llama.cpp (SIGABRT) or hang slim, refused by slim with
one line instead. The GGUFs are built with gguf-py's writer (or patched bytes); two of them are first shown to
abort llama.cpp for real, in a subprocess."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import run_slim

from slim.runtime.formats.gguf_file import GGUFError, check_gguf


def tiny_gguf(
    path: Path,
    tokens: list[str] | None = None,
    block_count: int = 1,
    extra: Callable[..., None] | None = None,
    tensors: list[tuple[str, np.ndarray]] | None = None,
) -> Path:
    """A GGUF whose vocabulary llama.cpp loads (a byte-pair vocabulary with one merge), with one layer of
    hyperparameters; `extra(writer)` adds or overrides metadata."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(block_count)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = tokens if tokens is not None else ["a", "b", "ab", "\n"]
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b"])
    if extra:
        extra(writer)
    for name, array in tensors if tensors is not None else [("token_embd.weight", np.zeros((4, 32), np.float32))]:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_load(path: Path, vocab_only: bool) -> int:
    """The exit status of a fresh process that hands `path` to llama.cpp without slim's check."""
    code = f"import llama_cpp; llama_cpp.Llama({str(path)!r}, vocab_only={vocab_only}, verbose=False)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode


def refused(path: Path, match: str) -> str:
    with pytest.raises(GGUFError, match=match) as info:
        check_gguf(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_the_unchecked_files_really_abort_llama_cpp(tmp_path: Path) -> None:
    nul = tiny_gguf(tmp_path / "nul.gguf", ["a", "b", "a\0b", "\n"])
    no_layers = tiny_gguf(tmp_path / "no-layers.gguf", block_count=0)
    assert llama_cpp_load(tiny_gguf(tmp_path / "good.gguf"), vocab_only=True) == 0
    assert llama_cpp_load(nul, vocab_only=True) == -6  # SIGABRT: GGML_ASSERT in the vocabulary loader
    assert llama_cpp_load(no_layers, vocab_only=False) == -6  # SIGABRT: GGML_ASSERT in load_hparams
    refused(nul, r"same token twice \('a' at index 2")
    refused(no_layers, "block_count is 0")


def test_tokens_are_checked_as_llama_cpp_reads_them(tmp_path: Path) -> None:
    # llama.cpp renames an empty token "[EMPTY_i]" and loads it; only a clash after that renaming aborts
    check_gguf(tiny_gguf(tmp_path / "empty.gguf", ["a", "", "ab", "\n"]))
    refused(tiny_gguf(tmp_path / "empty-clash.gguf", ["a", "", "[EMPTY_1]", "\n"]), "same token twice")
    refused(tiny_gguf(tmp_path / "nul-empty.gguf", ["a", "\0x", "[EMPTY_1]", "\n"]), "same token twice")
    refused(tiny_gguf(tmp_path / "dup.gguf", ["a", "b", "a", "\n"]), "same token twice")


def test_hyperparameters_llama_cpp_asserts_on(tmp_path: Path) -> None:
    cases: dict[str, tuple[dict, str]] = {
        "513-layers": ({"block_count": 513}, "block_count is 513"),
        "more-used-than-experts": (
            {"extra": lambda w: (w.add_expert_count(2), w.add_expert_used_count(4))},
            "expert_used_count is 4 for 2 experts",
        ),
        "used-without-experts": ({"extra": lambda w: w.add_expert_used_count(2)}, "has no experts"),
        "too-many-experts": (
            {"extra": lambda w: (w.add_expert_count(2000), w.add_expert_used_count(2))},
            "expert_count is 2000",
        ),
        "rope-scaling": ({"extra": lambda w: w.add_string("llama.rope.scaling.type", "wild")}, "rope.scaling.type"),
        "per-layer-experts": (
            {"extra": lambda w: (w.add_expert_count(4), w.add_array("llama.expert_used_count", [2, 8]))},
            "expert_used_count is 8",
        ),
    }
    for name, (kwargs, match) in cases.items():
        refused(tiny_gguf(tmp_path / f"{name}.gguf", **kwargs), match)
    assert llama_cpp_load(tmp_path / "more-used-than-experts.gguf", vocab_only=False) == -6
    check_gguf(tiny_gguf(tmp_path / "moe.gguf", extra=lambda w: (w.add_expert_count(8), w.add_expert_used_count(2))))


NAMED_V, NAMED_W = struct.pack("<Q", 1) + b"v", struct.pack("<Q", 1) + b"w"  # a tensor name as GGUF stores it


def test_tensor_table_as_llama_cpp_checks_it(tmp_path: Path) -> None:
    row = np.zeros((1, 32), np.float32)
    refused(tiny_gguf(tmp_path / "long.gguf", tensors=[("n" * 64, row)]), "tensor name is 64 bytes")
    path = tiny_gguf(tmp_path / "offset.gguf", tensors=[("w", row), ("v", row)])
    data = bytearray(path.read_bytes())
    (tmp_path / "twice.gguf").write_bytes(data.replace(NAMED_V, NAMED_W))  # gguf-py's writer refuses to
    refused(tmp_path / "twice.gguf", "two tensors are named 'w'")
    at = data.index(NAMED_V) + 9 + 4 + 8 * 2 + 4  # after the name, n_dims, dims and type of "v"
    assert struct.unpack_from("<Q", data, at)[0] == 128
    for offset, match in ((256, "starts at offset 256, not 128"), (100, "not aligned"), (2**63, "not aligned|offset")):
        struct.pack_into("<Q", data, at, offset)
        (tmp_path / "bad.gguf").write_bytes(data)
        refused(tmp_path / "bad.gguf", match)
    struct.pack_into("<Q", data, at, 128)
    dims_at = data.index(NAMED_V) + 9 + 4
    struct.pack_into("<QQ", data, dims_at, 2**32, 2**32)
    (tmp_path / "huge.gguf").write_bytes(data)
    refused(tmp_path / "huge.gguf", "impossible shape|past the end")


def test_array_types_and_lengths(tmp_path: Path) -> None:
    import gguf

    def u8_tokens(writer: gguf.GGUFWriter) -> None:
        writer.add_array("tokenizer.ggml.token_type", [1.5, 2.5])

    refused(tiny_gguf(tmp_path / "float-types.gguf", extra=u8_tokens), "token_type should hold int32")
    path = tiny_gguf(tmp_path / "u8.gguf")
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4  # the array's element type
    assert struct.unpack_from("<I", data, at)[0] == 8
    struct.pack_into("<I", data, at, 0)  # the same bytes, read as an array of u8
    (tmp_path / "u8.gguf").write_bytes(data)
    refused(tmp_path / "u8.gguf", "tokenizer.ggml.tokens should hold strings but holds value type 0")


def test_a_hundred_million_empty_strings_are_refused_at_once(tmp_path: Path) -> None:
    """10^8 empty strings: 800 MB of zero lengths (a sparse file here), which the scan would walk for minutes."""
    path = tmp_path / "many.gguf"
    count = 10**8
    key = b"general.tags"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    header += struct.pack("<IIQ", 9, 8, count)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + 8 * count)
    start = time.monotonic()
    refused(path, "claims 100000000 entries")
    assert time.monotonic() - start < 1


def test_slim_run_refuses_an_aborting_file_with_one_line(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "no-layers.gguf", block_count=0)
    run = run_slim("run", str(path), "hi")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [
        f"error: {path} is damaged: llama.block_count is 0 (llama.cpp accepts 1 to 512 layers)"
    ]


# ---- chat templates: untrusted code from the GGUF --------------------------------------------


def test_a_template_that_loops_ten_billion_times_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    from slim.runtime.inference import chat_template
    from slim.runtime.inference.errors import TemplateError

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    start = time.monotonic()
    with pytest.raises(TemplateError, match=r"did not finish rendering in 0.3 s") as info:
        chat_template.render_chat(looping, messages)
    assert time.monotonic() - start < 2 and "\n" not in str(info.value)
    for template, match in (("{{ 'a' * 10**10 }}", "sequence of more than"), ("{{ 7 ** (10**10) }}", "number of")):
        with pytest.raises(TemplateError, match=match):
            chat_template.render_chat(template, messages)
    rendered = chat_template.render_chat(chat_template.FALLBACK_TEMPLATE, messages)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_template.render_chat("{{ 'ab' * 3 }}{{ 2 ** 10 }}", messages) == "ababab1024"


# ---- safetensors headers ----------------------------------------------------------------------


def safetensors_file(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    import json

    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def raw_file(path: Path, header_len: int, rest: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", header_len) + rest)
    return path


DUP = b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'  # one entry, to be written twice


def checkpoint_refused(tmp_path: Path, match: str) -> str:
    from slim.runtime.formats.checkpoint import Checkpoint, CheckpointError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=match) as info:
        Checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_hostile_safetensors_headers(tmp_path: Path) -> None:
    from slim.runtime.formats.checkpoint import Checkpoint

    def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
        return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}

    eight = bytes(8)
    cases: dict[str, tuple[Callable[[Path], Path], str]] = {
        "whole-file-header": (lambda p: safetensors_file(p, {"w": entry()}, eight, header_len=10**6), "truncated"),
        "file-size-minus-8": (lambda p: raw_file(p, 4096, b"{" + b" " * 4095), "corrupt safetensors header"),
        "huge-header": (lambda p: safetensors_file(p, {}, header_len=2**40), "claims a 1099511627776-byte header"),
        "a-list": (lambda p: safetensors_file(p, [1, 2, 3]), "not a JSON object"),
        "nested": (lambda p: raw_file(p, 200_000, b"[" * 200_000), "corrupt safetensors header"),
        "negative-offset": (
            lambda p: safetensors_file(p, {"w": entry(offsets=[-8, 0])}, eight),
            "invalid data_offsets",
        ),
        "past-the-end": (lambda p: safetensors_file(p, {"w": entry(offsets=[8, 16])}, eight), "ends past the end"),
        "reversed": (lambda p: safetensors_file(p, {"w": entry(shape=(0,), offsets=[8, 0])}, eight), "out of order"),
        "overlap": (
            lambda p: safetensors_file(p, {"w": entry(offsets=[0, 8]), "v": entry(offsets=[4, 12])}, bytes(12)),
            "overlap",
        ),
        "int64-wrap": (
            lambda p: safetensors_file(p, {"w": entry(shape=(2**32, 2**32), offsets=[0, 0])}),
            "impossible shape",
        ),
        "unknown-dtype": (lambda p: safetensors_file(p, {"w": entry(dtype="F8_E9M9")}, eight), "dtype 'F8_E9M9'"),
        # found by benchmarks/fuzz_files.py: a dtype that is not a string, an empty shape numpy cannot describe
        "list-dtype": (lambda p: safetensors_file(p, {"w": entry(dtype=["F32"])}, eight), r"dtype \['F32'\]"),
        "empty-huge": (lambda p: safetensors_file(p, {"w": entry(shape=(0, 2**62), offsets=[0, 0])}), "impossible"),
        "float-shape": (lambda p: safetensors_file(p, {"w": entry(shape=[2.0])}, eight), "invalid shape"),
        "duplicate-names": (lambda p: raw_file(p, 2 * len(DUP) + 3, b"{" + DUP + b"," + DUP + b"}" + eight), "corrupt"),
    }
    for name, (build, match) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        build(folder / "model.safetensors")
        checkpoint_refused(folder, match)
    good = tmp_path / "good"
    good.mkdir()
    safetensors_file(good / "model.safetensors", {"w": entry(), "__metadata__": {"format": "pt"}}, eight)
    (good / "config.json").write_text("{}")
    assert Checkpoint(good).tensors["w"].load().tolist() == [0.0, 0.0]


# ---- importance matrices ----------------------------------------------------------------------


def test_hostile_imatrix_files(tmp_path: Path) -> None:
    from slim.runtime.pipeline.calibrate import Calibration, CalibrationError

    def imatrix(name: str, sums: np.ndarray, count: float, counts_shape: tuple[int, ...] = (1, 1)) -> Path:
        import gguf

        path = tmp_path / f"{name}.imatrix.gguf"
        writer = gguf.GGUFWriter(path, arch="imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", ["t"])
        writer.add_uint32("imatrix.chunk_count", 1)
        writer.add_uint32("imatrix.chunk_size", 512)
        writer.add_tensor("blk.0.ffn_down.weight.in_sum2", sums.astype(np.float32))
        writer.add_tensor("blk.0.ffn_down.weight.counts", np.full(counts_shape, count, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    row = np.ones((1, 32))
    good = Calibration.load(imatrix("good", row, 512))
    assert good.counts == {"blk.0.ffn_down.weight": 512} and good.sums["blk.0.ffn_down.weight"].sum() == 32
    cases = {
        "nan": (imatrix("nan", np.where(np.arange(32) == 3, np.nan, row), 512), "non-finite"),
        "negative-sums": (imatrix("negative-sums", -row, 512), "negative"),
        "nan-count": (imatrix("nan-count", row, np.nan), "counts is nan"),
        "negative-count": (imatrix("negative-count", row, -5), "counts is -5"),
        "fractional-count": (imatrix("fractional-count", row, 2.5), "counts is 2.5"),
        "two-rows": (imatrix("two-rows", np.ones((2, 32)), 512), r"shape \[32, 2\]"),
        "expert-counts": (imatrix("expert-counts", row, 512, (2, 1)), r"shape \[32, 1\] where 2 row\(s\) of sums"),
        "no-counts": (imatrix("no-counts", row, 512, (0, 1)), "has no token counts"),
    }
    for name, (path, match) in cases.items():
        with pytest.raises(CalibrationError, match=match) as info:
            Calibration.load(path)
        assert "\n" not in str(info.value), name
    data = bytearray((tmp_path / "good.imatrix.gguf").read_bytes())
    (tmp_path / "cut.imatrix.gguf").write_bytes(data[: len(data) - 64])
    with pytest.raises(CalibrationError, match="truncated"):
        Calibration.load(tmp_path / "cut.imatrix.gguf")
    with pytest.raises(CalibrationError, match="has 32 columns for blk.0.ffn_down.weight, which has 64"):
        good.check_fits({"blk.0.ffn_down.weight": 64}, "the model")
    good.check_fits({"blk.0.ffn_down.weight": 32}, "the model")
