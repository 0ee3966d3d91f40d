"""The recovery rig: the daemon as a real subprocess (``pool-managerd run``) on a fresh nats-server,
SIGKILLed and started again on the same config and run dir, and the event wire it is watched on
(``e2e/test_recovery.py``, ``e2e/test_fleet_ownership.py``, ``e2e/test_permissions.py``,
``e2e/test_nats_compat.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.engines.procs import group_members
from pool_managerd.contract.messages import (
    REPLY_DECODER,
    Accepted,
    DaemonStarted,
    EngineAdopted,
    EngineSpawned,
    Event,
    EventBody,
    PoolSnapshot,
    StateChanged,
    StatusReply,
)
from pool_managerd.testing.event_wire import EventWire
from pool_managerd.testing.toml_config import toml_value
from support.procs import track_pid

NODE = "node-a"


START_S = 20.0
"""Deadline for a daemon to publish ``daemon_started`` (Python start-up, imports, recovery)."""


STOP_S = 20.0
"""Deadline for a daemon to exit after SIGTERM (engines get ``stop_grace_s`` = 2 s)."""


EVENT_S = 15.0
"""Default deadline for an awaited event."""


MATCH = "live check: the KV snapshots match the rebuilt states"


def fake_pool(pool: str, *, load_time: float | str = 0.1, **extra: Any) -> dict[str, Any]:
    return {
        "id": pool,
        "engine": "fake",
        "extra_args": ["--load-time", str(load_time)],
        "model_bytes": 1_000_000_000,
        "stop_grace_s": 2.0,
        **extra,
    }


def render_config(url: str, run_dir: Path, pools: list[dict[str, Any]], **top: Any) -> str:
    settings = {"node": NODE, "run_dir": str(run_dir), "gpus": "sim:hetero-24g-48g", "heartbeat_s": 30.0, **top}
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    lines += ["", "[nats]", f"urls = {toml_value([url])}"]
    for pool in pools:
        lines += ["", "[[pools]]", *(f"{k} = {toml_value(v)}" for k, v in pool.items())]
    return "\n".join(lines) + "\n"


class Wire(EventWire):
    """Every pool and node event seen on the wire, with waiters; learns engine pids as they appear."""

    def __init__(self) -> None:
        super().__init__()
        self.engine_pids: list[int] = []

    def seen(self, event: Event) -> None:
        body = event.body
        if isinstance(body, EngineSpawned | EngineAdopted) and body.pid not in self.engine_pids:
            self.engine_pids.append(body.pid)
            track_pid(body.pid)  # not our child: the leak guard checks it by pid

    def summary(self) -> str:
        return "\n".join(f"  {e.pool or 'node'} #{e.seq} {_describe(e.body)}" for e in self.items)


def _describe(body: EventBody) -> str:
    if isinstance(body, StateChanged):
        return f"{body.trigger}: {body.src} -> {body.dst} {body.reason}"
    return str(body)[:160]


def changed(pool: str, *, dst: str | None = None, trigger: str | None = None) -> Callable[[Event], bool]:
    def pred(e: Event) -> bool:
        b = e.body
        return (e.pool == pool and isinstance(b, StateChanged) and dst in (None, b.dst)
                and trigger in (None, b.trigger))  # fmt: skip

    return pred


def body_of(cls: type, pool: str | None = None, **fields: Any) -> Callable[[Event], bool]:
    def pred(e: Event) -> bool:
        return (isinstance(e.body, cls) and (pool is None or e.pool == pool)
                and all(getattr(e.body, k) == v for k, v in fields.items()))  # fmt: skip

    return pred


class Rig:
    """One test's daemon process (started, killed, restarted on the same config and run dir)."""

    def __init__(self, tmp: Path, server: NatsServer, nc: NATS, wire: Wire) -> None:
        self.tmp = tmp
        self.server = server
        self.nc = nc
        self.wire = wire
        self.run_dir = tmp / "run"
        self.config_path = tmp / "poold.toml"
        self.log_path = tmp / "daemon.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.extra_groups: list[int] = []
        """Process groups started by the test itself (orphans), killed at teardown too."""
        self.finished = False
        """The test got through :func:`after_stop`: anything still running now is a leak."""

    def configure(self, pools: list[dict[str, Any]], **top: Any) -> None:
        self.config_path.write_text(render_config(self.server.url, self.run_dir, pools, **top))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no daemon log)"

    def fail(self, why: str) -> None:
        pytest.fail(f"{why}\nevents seen:\n{self.wire.summary()}")

    async def start(self, env: dict[str, str] | None = None) -> Event:
        """Start the daemon; returns its ``daemon_started`` event (published after recovery).
        ``env`` is added to the daemon's environment (e.g. a fault point)."""
        assert self.proc is None or self.proc.returncode is not None, "a daemon is already running"
        mark = self.wire.mark()
        self.starts += 1
        with self.log_path.open("a") as fh:
            fh.write(f"===== daemon start #{self.starts} at {time.time():.3f}\n")
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pool_managerd", "run", "--config", str(self.config_path),
                "--log-format", "text",
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        finally:
            os.close(fd)
        started = asyncio.ensure_future(self.wire.wait(body_of(DaemonStarted), START_S, start=mark))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({started, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not started.done():
            started.cancel()
            self.fail(f"the daemon exited with {self.proc.returncode} before it started")
        if started.exception() is not None:
            self.fail(f"no daemon_started within {START_S} s")
        return started.result()

    async def kill(self) -> None:
        """SIGKILL the daemon (only the daemon: its engines lead groups of their own)."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self) -> int:
        """SIGTERM the daemon and return its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_S)
        except TimeoutError:
            self.fail(f"the daemon did not exit within {STOP_S} s of SIGTERM")
            raise

    async def wait(self, pred: Callable[[Event], bool], what: str, *, start: int = 0,
                   timeout: float = EVENT_S) -> Event:  # fmt: skip
        try:
            return await self.wire.wait(pred, timeout, start)
        except TimeoutError:
            self.fail(f"timed out after {timeout} s waiting for {what}")
            raise

    async def request(self, pool: str, verb: str, **payload: Any) -> Any:
        payload.setdefault("command_id", uuid.uuid4().hex)
        msg = await self.nc.request(f"poold.cmd.{pool}.{verb}", json.dumps(payload).encode(), timeout=10)
        return REPLY_DECODER.decode(msg.data)

    async def accepted(self, pool: str, verb: str, **payload: Any) -> Accepted:
        reply = await self.request(pool, verb, **payload)
        assert isinstance(reply, Accepted), reply
        return reply

    async def status(self, pool: str) -> PoolSnapshot:
        msg = await self.nc.request(f"poold.cmd.{pool}.status", b"", timeout=10)
        reply = REPLY_DECODER.decode(msg.data)
        assert isinstance(reply, StatusReply), reply
        return reply.pool

    async def preload_ready(self, *pools: str) -> dict[str, int]:
        """Preload ``pools`` together and wait until each is ready; returns their engine pids."""
        mark = self.wire.mark()
        for pool in pools:
            await self.accepted(pool, "preload")
        pids = {}
        for pool in pools:
            spawned = await self.wait(body_of(EngineSpawned, pool), f"{pool}: engine_spawned", start=mark)
            await self.wait(changed(pool, dst="ready"), f"{pool}: ready", start=mark)
            pids[pool] = body(spawned).pid
        return pids

    async def cleanup(self) -> list[str]:
        """Kill whatever is left, by process group, and show the logs (pytest prints them on
        failure). Returns what had to be killed."""
        killed = []
        if self.proc is not None and self.proc.returncode is None:
            killed.append(f"daemon pid {self.proc.pid}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        for pgid in [*self.wire.engine_pids, *self.extra_groups]:
            # Engines lead their own group (pgid == pid); a group with no member is gone for good.
            members = group_members(pgid)
            if members:
                killed.append(f"process group {pgid}: {members}")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        print(f"----- events seen on the wire\n{self.wire.summary()}")
        print(f"----- daemon log {self.log_path}\n{self.log()}")
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            print(f"----- engine log {path}\n{path.read_text(errors='replace')[-4000:]}")
        return killed


async def replay_check_live(url: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", "replay", "--url", url, "--check-live",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, f"replay --check-live exited {proc.returncode}:\n{text}\n{err.decode()}"
    assert MATCH in text and "live difference" not in text, text
    return text


def body(event: Event) -> Any:
    """An event's body, untyped: the predicate that found the event has checked its class."""
    return event.body
