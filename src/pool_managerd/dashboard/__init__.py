"""The web dashboard: static files served on a local address, and nothing else.

The page is a NATS client in the browser (the official JavaScript client over websockets,
bundled into ``static/app.js`` by ``make dashboard`` from ``web/``). It reads only the published
contract, so this server has no API: it serves a fixed list of files plus ``config.json``, which
tells the page which websocket URL and subject prefix to use and, when the server was given a
user's credentials file (``--creds-dir``), that user's name, password and inbox prefix, so the
page connects as that user without a login form. They are read on the host at start-up, never
built into the page.
"""

from __future__ import annotations

import http.server
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

__all__ = ["STATIC_DIR", "DashboardError", "DashboardServer", "PageConfig", "assets_built"]

STATIC_DIR = Path(__file__).parent / "static"
"""Where the built page lives (produced by ``make dashboard``; shipped in the package data)."""

_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/lifecycle.json": ("lifecycle.json", "application/json"),
}
"""URL path → (file in STATIC_DIR, content type). Anything else is a 404: no path from a request
ever reaches the file system."""

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DashboardError(RuntimeError):
    """The page cannot be served (its built files are missing, the address is taken)."""


def assets_built(static_dir: Path = STATIC_DIR) -> bool:
    """True when every file the page needs is present."""
    return all((static_dir / name).is_file() for name, _ in _FILES.values())


@dataclass(frozen=True)
class PageConfig:
    """What the page is told at load time: where NATS is and which prefix the daemons use."""

    server: str
    """A ``ws://`` or ``wss://`` URL of a nats-server websocket listener."""
    prefix: str = "poold"
    user: str | None = None
    password: str | None = None
    inbox_prefix: str | None = None
    """The user's own reply prefix (``_INBOX.<user>`` with the shipped permissions)."""

    def to_json(self) -> bytes:
        raw = {"server": self.server, "prefix": self.prefix}
        for key in ("user", "password", "inbox_prefix"):
            value = getattr(self, key)
            if value is not None:
                raw[key] = value
        return json.dumps(raw).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "pool-managerd-dashboard"
    sys_version = ""
    files: ClassVar[dict[str, bytes]] = {}
    config: ClassVar[bytes] = b"{}"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/config.json":
            body, ctype, cache = self.config, "application/json", "no-store"
        elif path in _FILES:
            body, ctype, cache = self.files[path], _FILES[path][1], "no-cache"
        else:
            body, ctype, cache = b"not found\n", "text/plain; charset=utf-8", "no-store"
            self.send_response(404)
            self._headers(ctype, len(body), cache)
            if send_body:
                self.wfile.write(body)
            return
        self.send_response(200)
        self._headers(ctype, len(body), cache)
        if send_body:
            self.wfile.write(body)

    def _headers(self, ctype: str, length: int, cache: str) -> None:
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines are noise on a wall-screen host; errors still surface as HTTP statuses.
        return None


class DashboardServer:
    """Serves the page on ``host:port`` from a background thread. ``port=0`` picks a free one.

    The files are read once at start, so a rebuild needs a restart and a half-written build is
    never served.
    """

    def __init__(self, page: PageConfig, *, host: str = "127.0.0.1", port: int = 0,
                 static_dir: Path = STATIC_DIR) -> None:  # fmt: skip
        self.page = page
        self.host = host
        self.port = port
        self.static_dir = static_dir
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (``http://host:port/``)."""
        return f"http://{self.host}:{self.port}/"

    def start(self) -> DashboardServer:
        """Bind and serve; raises :class:`DashboardError` when the page is not built or the port is taken."""
        if not assets_built(self.static_dir):
            raise DashboardError(
                f"the dashboard is not built ({self.static_dir} lacks its files): run `make dashboard`"
            )
        files = {path: (self.static_dir / name).read_bytes() for path, (name, _) in _FILES.items()}
        handler = type("Handler", (_Handler,), {"files": files, "config": self.page.to_json()})
        try:
            self._httpd = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise DashboardError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
