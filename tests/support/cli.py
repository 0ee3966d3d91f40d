"""The commands as a client runs them: ``pool-managerd`` as a subprocess (:func:`run_cli`) and a daemon
in-process to run them against (:func:`running_daemon`), shared by the command tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from pool_managerd.adapters.engines.procs import pid_alive
from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.config import load_config
from pool_managerd.contract.messages import (
    EngineSpawned,
)
from pool_managerd.contract.subjects import Subjects
from pool_managerd.runtime.daemon import Daemon
from support.deadlines import CLI_S


@dataclass(frozen=True)
class DaemonEnv:
    """A started daemon and the ids it serves."""

    daemon: Daemon
    url: str
    node: str
    pool: str
    """A fake engine that is healthy 0.2 s after it starts."""
    crashy: str
    """A fake engine that exits 0.2 s after it starts, parked in ``failed`` after 2 tries."""


def pool_configs(pool: str, crashy: str) -> list[dict[str, Any]]:
    return [
        {"id": pool, "engine": "fake", "extra_args": ["--load-time", "0.2"], "model_bytes": 1_000_000_000, "slots": 2},
        {
            "id": crashy,
            "engine": "fake",
            "extra_args": ["--load-time", "30", "--crash-after", "0.2"],
            "model_bytes": 1_000_000_000,
            "restart": {"initial_s": 0.05, "max_s": 0.1, "max_consecutive_failures": 2},
        },
    ]


@contextlib.asynccontextmanager
async def running_daemon(url: str, run_dir: Path, nc: NATS) -> AsyncIterator[DaemonEnv]:
    """Start a daemon on ``url`` with two fresh pools; stop it and check for leaked engines."""
    tag = uuid.uuid4().hex[:8]
    node, pool, crashy = f"n-{tag}", f"chat-{tag}", f"crashy-{tag}"
    config = load_config(
        None,
        node=node,
        run_dir=run_dir,
        gpus="sim:hetero-24g-48g",
        nats={"urls": [url]},
        pools=pool_configs(pool, crashy),
        heartbeat_s=60,
    )
    daemon = Daemon(config)
    await daemon.start()
    # start() returns before the server has surely processed the daemon's SUBs (its endpoints):
    # a request sent at once from another connection can meet "no responders". A round trip on
    # the daemon's own connection orders them before anything the test sends.
    assert daemon.nc is not None
    await daemon.nc.flush()
    try:
        yield DaemonEnv(daemon=daemon, url=url, node=node, pool=pool, crashy=crashy)
    finally:
        await daemon.stop()
        # Every engine the daemon spawned (the event log says which) is gone once stop returns.
        pids: list[int] = []
        for p in (pool, crashy):
            async for _, event in read_events(nc, Subjects(), pool=p):
                if isinstance(event.body, EngineSpawned):
                    pids.append(event.body.pid)
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"engines survived the daemon: {alive}"


def cli_env() -> dict[str, str]:
    """The test's environment without ``POOL_MANAGERD_*`` settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")}


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m pool_managerd ARGS`` as a subprocess, without blocking the loop (the daemon
    under test runs on it). Returns (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pool_managerd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env() if env is None else env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"pool-managerd {' '.join(args)} did not finish in {CLI_S} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows_of(table_text: str, pool: str) -> list[list[str]]:
    """The whitespace-split rows of a rendered table whose first cell is ``pool``."""
    return [line.split() for line in table_text.splitlines() if line.split()[:1] == [pool]]
