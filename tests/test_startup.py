"""Start-up: `slim run` imports only what it needs before its first token.

gguf-py and slim.kernels (and numpy with them) cost a quarter of a second of start-up that
llama-cpp-python's own path does not pay, so the run command, the store, the engine module and
check_gguf must not import them. These tests check which modules load, not how long they take.
check_gguf keeps GGUF's value types and tensor block sizes as literals for that reason; the
tests here hold those literals equal to gguf-py's constants.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from slim.runtime.formats import gguf_file

HEAVY = ("gguf", "numpy", "slim.kernels")


def loaded_heavy_modules(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running `code`."""
    probe = code + (
        "\nimport json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def write_gguf(path: Path) -> None:
    """A small GGUF with one metadata value of every scalar type, strings, arrays and two tensors."""
    writer = gguf.GGUFWriter(path, arch="llama")
    for vtype in gguf.GGUFWriter._simple_value_packing:
        writer.add_key_value(f"test.{vtype.name.lower()}", True if vtype == gguf.GGUFValueType.BOOL else 1, vtype)
    writer.add_key_value("test.string", "hello", gguf.GGUFValueType.STRING)
    writer.add_array("test.numbers", [1, 2, 3])
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("f32", np.ones((2, 32), dtype=np.float32))
    q8 = gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_value_type_literals_equal_gguf_constants() -> None:
    packing = {int(vtype): "<" + fmt for vtype, fmt in gguf.GGUFWriter._simple_value_packing.items()}
    assert gguf_file._SCALARS == packing
    assert gguf_file._STRING == gguf.GGUFValueType.STRING
    assert gguf_file._ARRAY == gguf.GGUFValueType.ARRAY
    assert set(gguf.GGUFValueType) == set(gguf_file._SCALARS) | {gguf_file._STRING, gguf_file._ARRAY}


def test_tensor_type_sizes_equal_gguf_constants() -> None:
    assert gguf_file._TENSOR_TYPE_SIZES == {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}
    assert set(gguf_file._TENSOR_TYPE_SIZES) == {int(t) for t in gguf.GGMLQuantizationType}


def test_check_gguf_reads_what_gguf_py_writes(tmp_path: Path) -> None:
    path = tmp_path / "every-type.gguf"
    write_gguf(path)
    metadata = gguf_file.check_gguf(path)
    expected = {
        key: field.contents()
        for key, field in gguf.GGUFReader(path).fields.items()
        if not key.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert {key: metadata[key] for key in expected} == expected
    assert metadata["test.bool"] is True and metadata["test.string"] == "hello"


def test_run_command_path_imports_no_gguf_numpy_or_kernels(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    code = (
        "from slim.runtime import cli\n"
        "command = cli.main.get_command(None, 'run')\n"
        "from slim.runtime import store\n"
        f"resolved = store.resolve({str(path)!r})\n"
        "from slim.runtime import inference\n"
        "from slim.runtime.formats.gguf_file import check_gguf\n"
        "check_gguf(resolved)\n"
    )
    assert loaded_heavy_modules(code) == []


def test_chat_command_path_imports_nothing_heavy() -> None:
    assert loaded_heavy_modules("from slim.runtime import cli\ncli.main.get_command(None, 'chat')\n") == []


def test_slim_run_never_imports_gguf_or_kernels(smollm2_gguf: Path) -> None:
    """The whole `slim run` to its last token (llama-cpp-python brings numpy; slim adds nothing heavy)."""
    run = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "slim.runtime.cli",
            "run",
            str(smollm2_gguf),
            "Hi",
            "--max-tokens",
            "1",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "llama_cpp" in imported
    assert not [m for m in imported if m == "gguf" or m.startswith(("gguf.", "slim.kernels"))]
