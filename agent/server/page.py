"""The fleet page: three static files, answered from the WebSocket server's HTTP hook.

Rules and guarantees:

* Only the paths in :data:`FILES` are served, each mapped to a fixed file name in
  ``static/``; no part of a request reaches the filesystem, so there is no
  directory traversal. Anything else is the caller's 404.
* The files hold no data: the page gets everything over ``/v1/ws`` as an
  operator, with the token from its URL fragment (``/#token=...``), which the
  browser never sends in a request. A bad token gets the static files and
  nothing more (``AUTH_FAILED`` on the WebSocket, as for any client).
* Every answer carries ``Cache-Control: no-store``, ``X-Content-Type-Options:
  nosniff`` and a Content-Security-Policy that allows only this origin's script
  and style and WebSocket connections (no inline script, no CDN).
* Files are read once, on first request, then kept (about 20 KB); a package
  installed without its static files answers 404 with the reason.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

STATIC = Path(__file__).resolve().with_name("static")
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
       "script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
PAGE_TOKEN_TTL_S = 12 * 3600
PAGE_SUBJECT = "page"


@functools.cache
def _read(name: str) -> Optional[bytes]:
    try:
        return (STATIC / name).read_bytes()
    except OSError:
        return None


def _response(status: int, reason: str, content_type: str, body: bytes) -> Response:
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Security-Policy", CSP),
        ("Referrer-Policy", "no-referrer"),
        ("Connection", "close"),
    ])
    return Response(status, reason, headers, body)


def plain(status: int, reason: str, text: str) -> Response:
    """A short plain-text answer (``/healthz``), with the same headers as the page's files."""
    return _response(status, reason, "text/plain; charset=utf-8", text.encode())


def response(path: str) -> Optional[Response]:
    """The answer for a GET of ``path`` (without query), or None if it is not a page file."""
    entry: Optional[Tuple[str, str]] = FILES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    body = _read(name)
    if body is None:
        return _response(404, "Not Found", "text/plain; charset=utf-8",
                         f"the fleet page is not installed ({STATIC / name} is missing)\n"
                         .encode())
    return _response(200, "OK", content_type, body)


def page_url(ws_url: str, token: str) -> str:
    """The page's address for a server at ``ws_url``, the operator token in the fragment."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return f"{scheme}://{parts.netloc}/#token={token}"
