"""A minimal stand-in for the Hugging Face Hub on 127.0.0.1, for tests without the network.

It serves the few endpoints huggingface_hub 2.4 (and slim's resumable download) call:

    GET  /api/models/{repo}[/revision/{rev}]   model info: sha and siblings
    GET  /api/models/{repo}/tree/{rev}         file listing (snapshot_download)
    HEAD /{repo}/resolve/{rev}/{path}          ETag (sha256), Content-Length, X-Repo-Commit
    GET  /{repo}/resolve/{rev}/{path}          the bytes, with Range requests answered by 206

Unknown repos get 404 with X-Error-Code: RepoNotFound, as the real hub answers. `interrupt`
makes the next downloads of a file stop after some bytes by closing the connection mid-body;
`stall` makes the next one stop sending after some bytes and hold the connection open (a client
killed mid-download).

    with HubStub({"owner/name": {"model.gguf": path}}) as hub:
        env["HF_ENDPOINT"] = hub.endpoint
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+)|/tree/([^/]+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HubStub:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._interrupts: dict[str, list[int]] = {}  # filename -> [after_bytes, times left]
        self._stalls: dict[str, int] = {}  # filename -> after_bytes, for the next GET
        self._closing = threading.Event()
        self._sha256: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def interrupt(self, filename: str, after_bytes: int, times: int = 1) -> None:
        """The next `times` GETs of `filename` send at most `after_bytes` of the body, then hang up."""
        self._interrupts[filename] = [after_bytes, times]

    def stall(self, filename: str, after_bytes: int) -> None:
        """The next GET of `filename` sends `after_bytes` of the body, then sends nothing more (the
        connection stays open) until the stub is closed."""
        self._stalls[filename] = after_bytes

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def etag(self, path: Path) -> str:
        with self._lock:
            if path not in self._sha256:
                self._sha256[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            return self._sha256[path]

    def _take_interrupt(self, filename: str) -> int | None:
        with self._lock:
            plan = self._interrupts.get(filename)
            if not plan or plan[1] <= 0:
                return None
            plan[1] -= 1
            return plan[0]

    def _take_stall(self, filename: str) -> int | None:
        with self._lock:
            return self._stalls.pop(filename, None)


def _handler(hub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if match := _API.match(path):
                self._api(match.group(1), match.group(2) or match.group(3), tree=match.group(3) is not None)
            elif match := _RESOLVE.match(path):
                self._resolve(match.group(1), match.group(2), match.group(3), body)
            else:
                self._error(404, "NotFound", f"no route for {path}")

        def _api(self, repo: str, revision: str | None, tree: bool) -> None:
            if not self._known(repo, revision):
                return
            files = hub.repos[repo]
            if tree:
                data: object = [
                    {
                        "type": "file",
                        "path": name,
                        "size": path.stat().st_size,
                        "oid": hashlib.sha1(name.encode()).hexdigest(),
                    }
                    for name, path in files.items()
                ]
            else:
                data = {
                    "id": repo,
                    "modelId": repo,
                    "sha": hub.commit(repo),
                    "private": False,
                    "tags": [],
                    "siblings": [{"rfilename": name} for name in files],
                }
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo: str, revision: str, filename: str, body: bool) -> None:
            if not self._known(repo, revision):
                return
            path = hub.repos[repo].get(filename)
            if path is None:
                self._error(404, "EntryNotFound", f"{filename} not found", {"X-Repo-Commit": hub.commit(repo)})
                return
            size = path.stat().st_size
            headers = {
                "ETag": f'"{hub.etag(path)}"',
                "X-Repo-Commit": hub.commit(repo),
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            start, end, status = 0, size - 1, 200
            if body and (wanted := self.headers.get("Range")):
                match = _RANGE.match(wanted)
                if not match or int(match.group(1)) >= size:
                    self._error(416, "RangeNotSatisfiable", wanted, {"Content-Range": f"bytes */{size}"})
                    return
                start, end, status = int(match.group(1)), int(match.group(2) or size - 1), 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            stall = hub._take_stall(filename)
            cut = stall if stall is not None else hub._take_interrupt(filename)
            with open(path, "rb") as f:
                f.seek(start)
                remaining = end - start + 1 if cut is None else min(cut, end - start + 1)
                while remaining > 0:
                    chunk = f.read(min(remaining, 1 << 20))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            if stall is not None:
                self.wfile.flush()
                hub._closing.wait(timeout=120)
                self.close_connection = True
            elif cut is not None:
                self.wfile.flush()
                self.close_connection = True  # hang up mid-body: the client sees a short read

        def _known(self, repo: str, revision: str | None) -> bool:
            if repo not in hub.repos:
                self._error(404, "RepoNotFound", "Repository not found")
                return False
            if revision not in (None, "main", hub.commit(repo)):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return False
            return True

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, json.dumps({"error": message}).encode(), {**headers, **(extra or {})})

        def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
