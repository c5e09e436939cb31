"""The store and downloads under collisions, concurrency and a lying server: distinct names keep distinct
files, concurrent index updates lose nothing, one download of a file at a time, and a resumed part that
does not continue the file on disk (Content-Range) or a file that fails its sha256 is discarded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hubstub import HubStub
from test_hostile_files import tiny_gguf

from slim.runtime import store
from slim.runtime.files import file_lock
from slim.runtime.store import hub


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIM_HOME", str(tmp_path / "slim"))
    return tmp_path / "slim"


def test_distinct_names_keep_distinct_files(home: Path) -> None:
    tagged, dashed = store.model_file("x:q8_0"), store.model_file("x-q8_0")
    assert tagged != dashed and tagged.name == "x+q8_0.gguf"
    for path in (tagged, dashed):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(path.name.encode())
    store.add("x:q8_0", tagged, "test")
    store.add("x-q8_0", dashed, "test")
    store.add("alias", dashed, "test")
    store.remove("x:q8_0")
    store.remove("x-q8_0")  # "alias" still names the file: it stays
    assert not tagged.exists() and dashed.read_bytes() == b"x-q8_0.gguf"
    assert set(store.entries()) == {"alias"}


def test_concurrent_index_updates_lose_nothing(home: Path) -> None:
    """Four processes each add 25 models at once; the index ends with all 100."""
    code = (
        "import sys; from pathlib import Path; from slim.runtime import store\n"
        "for i in range(25): store.add(f'm{sys.argv[1]}-{i}', Path('/dev/null'), 'test')\n"
    )
    env = {**os.environ, "SLIM_HOME": str(home)}
    workers = [subprocess.Popen([sys.executable, "-c", code, str(n)], env=env) for n in range(4)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
    assert len(store.entries()) == 100
    assert not [p for p in (home / "models").iterdir() if p.name.endswith(".partial")]


# ---- a server that lies -----------------------------------------------------------------------


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up on a lie is expected here


class LyingServer:
    """Serves `content` for any GET; answers a Range request with the Content-Range and bytes given."""

    def __init__(self, content: bytes, content_range: str | None = None, resumed_body: bytes = b"") -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                ranged = self.headers.get("Range") is not None
                body = server.resumed_body if ranged else server.content
                self.send_response(206 if ranged else 200)
                if ranged and server.content_range:
                    self.send_header("Content-Range", server.content_range)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.content, self.content_range, self.resumed_body = content, content_range, resumed_body
        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def remote(self, sha256: str) -> hub.RemoteFile:
        url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.gguf"
        return hub.RemoteFile("acme/x", "file.gguf", url, len(self.content), sha256)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lying() -> Iterator[list[LyingServer]]:
    servers: list[LyingServer] = []
    yield servers
    for server in servers:
        server.close()


def test_a_resume_that_does_not_continue_the_file_is_discarded(tmp_path: Path, lying: list[LyingServer]) -> None:
    content = bytes(range(256)) * 64
    sha = hashlib.sha256(content).hexdigest()
    dest = tmp_path / "file.part"
    cases = {
        "bytes 0-16383/16384": "Content-Range 'bytes 0-16383/16384' where bytes 1000- were asked",
        "bytes 1000-16383/99999": "Content-Range 'bytes 1000-16383/99999'",
        None: "Content-Range None",
    }
    for content_range, message in cases.items():
        server = LyingServer(content, content_range, content[1000:] if content_range else content)
        lying.append(server)
        dest.write_bytes(content[:1000])
        with pytest.raises(hub.HubError, match=message) as info:
            hub.download(server.remote(sha), dest)
        assert "\n" not in str(info.value) and not dest.exists()
    honest = LyingServer(content, "bytes 1000-16383/16384", content[1000:])
    lying.append(honest)
    dest.write_bytes(content[:1000])
    hub.download(honest.remote(sha), dest)
    assert dest.read_bytes() == content


def test_a_file_that_fails_its_sha256_is_discarded(tmp_path: Path, lying: list[LyingServer]) -> None:
    server = LyingServer(b"forged" * 100)
    lying.append(server)
    dest = tmp_path / "file.part"
    with pytest.raises(hub.HubError, match="does not match its sha256"):
        hub.download(server.remote(hashlib.sha256(b"the real file").hexdigest()), dest)
    assert not dest.exists()


# ---- concurrent pulls -------------------------------------------------------------------------


def start_pull(home: Path, endpoint: str, name: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home / "hf"), "SLIM_HOME": str(home)}
    env.pop("HF_TOKEN", None)
    command = [sys.executable, "-m", "slim.runtime.cli", "pull", "acme/tiny-GGUF", "--name", name]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_download_of_a_file_at_a_time(home: Path, tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    with HubStub({"acme/tiny-GGUF": {"tiny.gguf": model}}) as stub:
        lock = home / "models" / ".downloads" / f"{stub.etag(model)}.lock"
        with file_lock(lock):  # another pull of the file is under way
            waiting = start_pull(home, stub.endpoint, "first")
            time.sleep(3)
            assert waiting.poll() is None and not [r for r in stub.requests if r[0] == "GET" and "resolve" in r[1]]
        assert waiting.wait(timeout=120) == 0, waiting.stderr.read() if waiting.stderr else ""
        pulls = [start_pull(home, stub.endpoint, name) for name in ("second", "third")]
        assert [p.wait(timeout=120) for p in pulls] == [0, 0]
    entries = store.entries()
    assert set(entries) == {"first", "second", "third"}
    for entry in entries.values():
        assert entry.path.read_bytes() == model.read_bytes()
    assert not list((home / "models" / ".downloads").iterdir())  # no partial file and no lock left behind


def test_checkpoint_weights_are_checked_against_the_hubs_sha256(home: Path, tmp_path: Path) -> None:
    """huggingface_hub does not hash what it downloads: a damaged blob in its cache is caught and removed."""
    import struct

    (tmp_path / "config.json").write_text("{}")
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    code = (
        "import sys\nfrom slim.runtime.store.hub import HubError, download_checkpoint\n"
        "try:\n    print(download_checkpoint('acme/ckpt'))\n"
        "except HubError as exc:\n    sys.exit(f'error: {exc}')\n"
    )
    files = {name: tmp_path / name for name in ("config.json", "model.safetensors")}
    with HubStub({"acme/ckpt": files}) as stub:
        env = {
            **os.environ,
            "HF_ENDPOINT": stub.endpoint,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        blob = (Path(first.stdout.strip()) / "model.safetensors").resolve()
        assert blob.name == stub.etag(files["model.safetensors"])
        blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")  # one byte damaged in the cache
        second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and not blob.exists()
    assert second.stderr.strip().splitlines() == [
        "error: model.safetensors from acme/ckpt does not match its sha256 (a damaged download or cache); "
        "it was removed: run the command again"
    ]
