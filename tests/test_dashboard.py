"""The dashboard's server side: the static page server, its CLI, and the websocket listener of
the nats-server harness the page connects to. The page itself is tested in a real browser in
``test_dashboard_browser.py``."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.dashboard import STATIC_DIR, DashboardError, DashboardServer, PageConfig

ROOT = Path(__file__).resolve().parents[1]


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def served() -> DashboardServer:
    server = DashboardServer(PageConfig(server="ws://127.0.0.1:9222", prefix="poold")).start()
    yield server
    server.stop()


def test_the_page_its_script_and_the_published_lifecycle_table_are_served(served: DashboardServer) -> None:
    status, headers, body = get(served.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="app.js">' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for path, ctype in [
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("lifecycle.json", "application/json"),
    ]:
        status, headers, _ = get(served.url + path)
        assert (status, headers["Content-Type"].split(";")[0]) == (200, ctype)
    # The page rebuilds timelines with the published table: a copy, never a drifted one.
    _, _, served_table = get(served.url + "lifecycle.json")
    assert json.loads(served_table) == json.loads((ROOT / "schemas" / "lifecycle.json").read_text())
    _, _, config = get(served.url + "config.json")
    assert json.loads(config) == {"server": "ws://127.0.0.1:9222", "prefix": "poold"}
    status, headers, body = get(served.url + "app.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 10_000


# Parent-directory requests are spelt encoded: the server matches whole paths against its list, so
# any spelling is a 404, and the repository holds no literal path that climbs out of it.
@pytest.mark.parametrize(
    "path", ["nope", "%2e%2e/pyproject.toml", "%2E%2E%2Fpyproject.toml", "static/app.js", "api/pools", "app.js/x"]
)
def test_anything_else_is_not_found(served: DashboardServer, path: str) -> None:
    status, _, _ = get(served.url + path)
    assert status == 404


def test_nothing_is_loaded_from_another_origin() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not re.match(r"^[a-z]+://|^//", ref) for ref in refs), refs
    assert "https://" not in (STATIC_DIR / "style.css").read_text()


def test_an_unbuilt_page_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="make dashboard"):
        DashboardServer(PageConfig(server="ws://x:1"), static_dir=tmp_path).start()


def test_a_taken_port_is_a_clear_error(served: DashboardServer) -> None:
    with pytest.raises(DashboardError, match="cannot listen"):
        DashboardServer(PageConfig(server="ws://x:1"), port=served.port).start()


def test_the_cli_prints_the_url_serves_it_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pool_managerd", "dashboard", "--port", "0", "--nats", "ws://10.0.0.5:443"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
        assert match, line
        _, _, config = get(match.group(1) + "config.json")
        assert json.loads(config)["server"] == "ws://10.0.0.5:443"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--nats", "nats://127.0.0.1:4222"], "ws:// or wss://"), (["--prefix", "a.>"], "invalid --prefix"),
     (["--port", "70000"], "out of range")],
)  # fmt: skip
def test_the_cli_refuses_bad_arguments_with_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pool_managerd", "dashboard", *args],
                          check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr


def _ws_handshake(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        return s.recv(4096)


def test_the_nats_server_harness_listens_for_websockets_on_the_same_port_after_a_restart(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "s", websocket_port=0) as server:
        assert server.ws_url is not None and server.websocket_port
        assert _ws_handshake(server.host, server.websocket_port).startswith(b"HTTP/1.1 101")
        port = server.websocket_port
        server.restart()
        assert server.websocket_port == port
        assert _ws_handshake(server.host, port).startswith(b"HTTP/1.1 101")
    with NatsServer(store_dir=tmp_path / "t") as plain:
        assert plain.ws_url is None


def test_server_configuration_text_is_applied(tmp_path: Path) -> None:
    conf = "authorization { users = [ { user: a, password: b } ] }"
    with NatsServer(store_dir=tmp_path / "s", websocket_port=0, config=conf) as server:
        assert (tmp_path / "s" / "nats-server.conf").read_text().startswith(conf + "\n")
        # Unauthenticated clients are turned away: the users block is in force.
        with socket.create_connection((server.host, server.port), timeout=5) as s:
            s.recv(4096)  # INFO
            s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            reply = b""
            while b"\r\n" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert b"-ERR 'Authorization Violation'" in reply


def test_the_cli_serves_a_run_dirs_credentials_and_websocket_url(tmp_path: Path) -> None:
    from pool_managerd import accounts

    creds = accounts.ensure_credentials(tmp_path)
    accounts.publish_locations(tmp_path, creds, "nats://127.0.0.1:4222", "ws://127.0.0.1:4443")
    proc = subprocess.Popen([sys.executable, "-m", "pool_managerd", "dashboard", "--port", "0",
                             "--creds-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(
            r"dashboard: (http://127\.0\.0\.1:\d+/)\s+\(NATS websocket ws://127\.0\.0\.1:4443 as viewer\)", line
        )
        assert match, line
        _, headers, config = get(match.group(1) + "config.json")
        assert headers["Cache-Control"] == "no-store"
        want = {"server": "ws://127.0.0.1:4443", "prefix": "poold", "user": "viewer",
                "password": creds["viewer"].password, "inbox_prefix": "_INBOX.viewer"}  # fmt: skip
        assert json.loads(config) == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_cli_refuses_a_missing_credentials_dir_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pool_managerd", "dashboard", "--creds-dir", str(tmp_path / "nope")],
                          check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and "no credentials for 'viewer'" in done.stderr
