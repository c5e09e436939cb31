"""slim pull against a stand-in Hugging Face Hub on loopback (tests/hubstub.py).

huggingface_hub reads HF_ENDPOINT when it is imported, so every pull runs the real `slim` CLI in
a subprocess with HF_ENDPOINT pointing at the stub and HF_HOME / SLIM_HOME in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_llama_checkpoint, run_slim
from hubstub import HubStub

from slim.runtime.formats.gguf_file import open_gguf

GGUF_REPO = "acme/SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def pull_env(home: Path, endpoint: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home / "hf"),
        "SLIM_HOME": str(home / "slim"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_TOKEN", None)
    return env


def pull(home: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slim.runtime.cli", "pull", *args],
        env=pull_env(home, endpoint),
        capture_output=True,
        text=True,
        timeout=600,
    )


def store_list(home: Path) -> dict:
    result = run_slim("list", "--json", env={"SLIM_HOME": str(home / "slim")})
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)["models"]}


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_store_untouched(home: Path) -> None:
    models = home / "slim" / "models"
    assert not (models / "index.json").exists()
    assert not models.exists() or not list(models.glob("*.gguf"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_gguf_repo(smollm2_gguf: Path, home: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# a GGUF repo\n")
    with HubStub({GGUF_REPO: {"README.md": readme, GGUF_FILE: smollm2_gguf}}) as hub:
        result = pull(home, hub.endpoint, GGUF_REPO, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["name"] == "smollm2-135m-instruct"  # repo name, lower-cased, without -GGUF
    assert summary["type"] == "Q4_1" and summary["source"] == f"hub:{GGUF_REPO}"
    stored = store_list(home)["smollm2-135m-instruct"]
    assert stored["file"] == summary["file"] and stored["size_bytes"] == smollm2_gguf.stat().st_size
    assert sha256(Path(stored["file"])) == sha256(smollm2_gguf)
    assert not list((home / "slim" / "models" / ".downloads").iterdir())  # no partial left behind


def test_pull_picks_gguf_by_type(smollm2_gguf: Path, home: Path, tmp_path: Path) -> None:
    decoy = tmp_path / "decoy.gguf"
    decoy.write_bytes(b"GGUF not really")
    files = {"model-BF16.gguf": decoy, "model-Q4_K_S.gguf": decoy, "model-Q4_K_M.gguf": smollm2_gguf}
    with HubStub({"acme/Model-GGUF": files}) as hub:
        ambiguous = pull(home, hub.endpoint, "acme/Model-GGUF")
        no_match = pull(home, hub.endpoint, "acme/Model-GGUF", "--type", "F16")  # must not pick BF16
        broken = pull(home, hub.endpoint, "acme/Model-GGUF", "--type", "BF16")
        picked = pull(home, hub.endpoint, "acme/Model-GGUF", "--type", "q4_k_m")
    assert_one_line_error(ambiguous, 2, "several GGUFs", "--type", *files)
    assert_one_line_error(no_match, 2, "matches --type F16", "model-BF16.gguf")
    assert_one_line_error(broken, 1, "model-BF16.gguf", "not a usable GGUF")  # checked before it is stored
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.startswith("pulled model:q4_k_m: ")
    assert set(store_list(home)) == {"model:q4_k_m"}
    assert not list((home / "slim" / "models" / ".downloads").iterdir())


def test_pull_checkpoint_repo_converts(smollm2_tokenizer: Path, home: Path, tmp_path: Path) -> None:
    checkpoint = make_llama_checkpoint(tmp_path / "ckpt", smollm2_tokenizer, hidden=256, n_layer=2, tied=True)
    files = {p.name: p for p in checkpoint.iterdir()}
    with HubStub({"acme/Tiny-Llama": files}) as hub:
        result = pull(home, hub.endpoint, "acme/Tiny-Llama", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["name"] == "tiny-llama" and summary["type"] == "Q4_K_M"
    assert store_list(home)["tiny-llama"]["source"] == "hub:acme/Tiny-Llama"
    reader = open_gguf(summary["file"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert sum(t == "Q4_K" for t in types.values()) >= 6
    stored = sorted(p.name for p in (home / "slim" / "models").iterdir() if p.is_file())
    assert stored == ["index.json", "tiny-llama.gguf"]  # no temporary file left


def test_interrupted_download_resumes(smollm2_gguf: Path, home: Path) -> None:
    with HubStub({GGUF_REPO: {GGUF_FILE: smollm2_gguf}}) as hub:
        # More drops than one run reconnects (slim retries while it makes progress), fewer than two runs.
        hub.interrupt(GGUF_FILE, after_bytes=8_000_000, times=5)
        first = pull(home, hub.endpoint, GGUF_REPO)
        partial = [p.stat().st_size for p in (home / "slim" / "models" / ".downloads").iterdir()]
        after_first = store_list(home)
        first_gets = sum(1 for method, path, _ in hub.requests if method == "GET" and path.endswith(GGUF_FILE))
        second = pull(home, hub.endpoint, GGUF_REPO)
        resumed = [r for m, p, r in hub.requests if m == "GET" and p.endswith(GGUF_FILE)][first_gets:]
    assert_one_line_error(first, 1, GGUF_FILE, "stopped at 32.0 of 98.4 MB", "run the same command again")
    assert partial == [4 * 8_000_000]  # kept for the next run
    assert not after_first  # nothing registered by the failed run
    assert second.returncode == 0, second.stderr
    assert resumed[0] == f"bytes={4 * 8_000_000}-"  # the second run continued from the partial file
    stored = store_list(home)["smollm2-135m-instruct"]
    assert sha256(Path(stored["file"])) == sha256(smollm2_gguf)


def test_a_pull_killed_mid_download_leaves_no_model_and_the_next_one_resumes(smollm2_gguf: Path, home: Path) -> None:
    """SIGKILL while the bytes come in: nothing in the store, the bytes received kept for the next
    pull, which continues from them and ends with the file the hub has."""
    downloads = home / "slim" / "models" / ".downloads"
    with HubStub({GGUF_REPO: {GGUF_FILE: smollm2_gguf}}) as hub:
        hub.stall(GGUF_FILE, after_bytes=20_000_000)
        first = subprocess.Popen(
            [sys.executable, "-m", "slim.runtime.cli", "pull", GGUF_REPO, "-q"],
            env=pull_env(home, hub.endpoint),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while sum(p.stat().st_size for p in downloads.glob("*.part")) < 19_000_000:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        first.kill()
        assert first.wait(timeout=30) == -signal.SIGKILL
        (part,) = downloads.glob("*.part")
        received = part.stat().st_size
        assert not store_list(home) and not list((home / "slim" / "models").glob("*.gguf"))
        second = pull(home, hub.endpoint, GGUF_REPO, "-q")
        gets = [r for m, p, r in hub.requests if m == "GET" and p.endswith(GGUF_FILE)]
    assert second.returncode == 0, second.stderr
    assert gets[-1] == f"bytes={received}-"
    stored = store_list(home)["smollm2-135m-instruct"]
    assert sha256(Path(stored["file"])) == sha256(smollm2_gguf)
    assert not list(downloads.iterdir())


def test_unknown_repo(home: Path, tmp_path: Path) -> None:
    with HubStub({"acme/other": {}}) as hub:
        result = pull(home, hub.endpoint, "acme/missing-model")
    assert_one_line_error(result, 2, "acme/missing-model", "not found")
    assert_store_untouched(home)


def test_repo_without_model_files(home: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("nothing here\n")
    with HubStub({"acme/docs-only": {"README.md": readme}}) as hub:
        result = pull(home, hub.endpoint, "acme/docs-only")
    assert_one_line_error(result, 2, "neither a GGUF", "README.md")
    assert_store_untouched(home)


def test_unreachable_hub(home: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = pull(home, f"http://127.0.0.1:{port}", "acme/anything")
    assert_one_line_error(result, 1, "could not reach", "HF_ENDPOINT")
    assert_store_untouched(home)


@pytest.mark.parametrize(
    "args, words",
    [
        (["acme/x", "--name", "Bad Name"], "not a valid model name"),
        (["not-a-model"], "neither a catalog model"),
        (["smollm2-135m", "--type", "Q8_0"], "catalog model"),
    ],
)
def test_bad_input(home: Path, args: list[str], words: str) -> None:
    result = pull(home, "http://127.0.0.1:9", *args)
    assert_one_line_error(result, 2, words)
    assert_store_untouched(home)


def test_pull_catalog(smollm2_gguf: Path, home: Path) -> None:
    assets = home / "slim" / "assets"
    assets.mkdir(parents=True)
    try:  # the asset cache is checked by sha256 and reused: no 93 MB download in the test
        os.link(smollm2_gguf, assets / smollm2_gguf.name)
    except OSError:
        shutil.copy(smollm2_gguf, assets / smollm2_gguf.name)
    result = pull(home, "http://127.0.0.1:9", "smollm2-135m")  # the hub is not needed
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pulled smollm2-135m: ")
    stored = store_list(home)["smollm2-135m"]
    assert stored["source"].startswith("catalog:") and Path(stored["file"]).parent == assets.resolve()
