"""``pool-managerd dashboard``: serve the web dashboard and print its URL.

The page connects from the browser to a nats-server websocket listener (``--nats``); it needs
no access to the daemon other than the published NATS contract.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.subjects import Subjects
from pool_managerd.dashboard import DashboardError, DashboardServer, PageConfig

DEFAULT_WS = "ws://127.0.0.1:8080"
DEFAULT_PORT = 8900


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats",
        default=os.environ.get("POOL_MANAGERD_WS_URL"),
        help="websocket URL of the nats-server (default: $POOL_MANAGERD_WS_URL, the websocket URL in the "
        f"credentials file, else {DEFAULT_WS})",
    )
    parser.add_argument("--creds-dir", type=Path, default=os.environ.get("POOL_MANAGERD_CREDS_DIR"),
                        help="run dir (or auth dir) whose credentials the page connects with "
                        "(default $POOL_MANAGERD_CREDS_DIR); without it the page asks")  # fmt: skip
    parser.add_argument("--role", choices=["viewer", "operator", "admin"], default="viewer",
                        help="whose credentials from --creds-dir (default %(default)s)")  # fmt: skip
    parser.add_argument("--prefix", default="poold", help="subject prefix of the daemons (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to serve the page on (default %(default)s; 0 picks one)"
    )


def run(args: argparse.Namespace) -> int:
    creds = None
    if args.creds_dir is not None:
        from pool_managerd.accounts import CredentialError, load_credentials

        try:
            creds = load_credentials(Path(args.creds_dir), args.role)
        except CredentialError as exc:
            print(f"pool-managerd dashboard: {exc.message}", file=sys.stderr)
            return 2
    if args.nats is None:
        args.nats = (creds.websocket_url if creds is not None else None) or DEFAULT_WS
    if not str(args.nats).startswith(("ws://", "wss://")):
        print(f"pool-managerd dashboard: --nats must be a ws:// or wss:// URL, not {args.nats!r}", file=sys.stderr)
        return 2
    try:
        Subjects(args.prefix)
    except PoolManagerError as exc:
        print(f"pool-managerd dashboard: invalid --prefix: {exc.message}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"pool-managerd dashboard: --port {args.port} is out of range", file=sys.stderr)
        return 2
    page = PageConfig(server=args.nats, prefix=args.prefix)
    if creds is not None:
        page = PageConfig(server=args.nats, prefix=args.prefix, user=creds.user, password=creds.password,
                          inbox_prefix=creds.inbox_prefix)  # fmt: skip
    server = DashboardServer(page, host=args.host, port=args.port)
    try:
        server.start()
    except DashboardError as exc:
        print(f"pool-managerd dashboard: {exc}", file=sys.stderr)
        return 1
    who = f" as {creds.user}" if creds is not None else ""
    print(f"dashboard: {server.url}  (NATS websocket {args.nats}{who})", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0
