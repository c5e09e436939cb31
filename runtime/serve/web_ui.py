"""The chat page at GET /: a person's way in, next to the APIs that apps use.

The page is plain files in web/ (HTML, one stylesheet, ES modules), served from the package with
nothing fetched from anywhere else; its Content-Security-Policy lets it load only this server's own
files and talk only to this server. It talks to the same routes an app would (/v1/models, /health,
/v1/chat/completions streamed), so it needs nothing of its own on the server.

GET / answers the page to a browser (Accept: text/html) and Ollama's "slim is running" to everyone
else (Ollama's clients ask GET / whether the server is up), and with the page turned off
(`slim serve --no-ui`).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

router = APIRouter(include_in_schema=False)

ASSET_PREFIX = "/ui/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _asset(name: str) -> Response | None:
    """One of web/'s files with its type and the page's security headers; None if there is none."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _TYPES:
        return None
    file = resources.files("slim.runtime.serve").joinpath("web", name)
    if not file.is_file():
        return None
    headers = {
        "Content-Security-Policy": _POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # a new slim's page replaces the old one at once
    }
    return Response(file.read_bytes(), media_type=_TYPES[suffix], headers=headers)


def _ui_on(request: Request) -> bool:
    return bool(request.app.state.ui)


@router.get("/")
async def root(request: Request) -> Response:
    if _ui_on(request) and "text/html" in request.headers.get("accept", ""):
        page = _asset("index.html")
        if page is not None:
            return page
    return Response("slim is running", media_type="text/plain")


@router.get(ASSET_PREFIX + "{name}")
async def asset(name: str, request: Request) -> Response:
    found = _asset(name) if _ui_on(request) else None
    if found is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return found
