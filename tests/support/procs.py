"""Helpers for tests that run real engine subprocesses: leak checks and a fake-engine launcher.

``leak_guard()`` is the body of ``tests/conftest.py``'s autouse ``_no_leaks`` fixture, which every
test that is not ``unit`` gets. It fails a test after which a child process of the test runner
(one that did not exist before the test) or a tracked grandchild (``track_pid``) is still alive,
and kills the leftovers by pid so one leak does not cascade into the following tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pool_managerd.adapters.engines.handles import EngineProcess
from pool_managerd.adapters.engines.ports import allocate_port
from pool_managerd.adapters.engines.procs import pid_alive
from pool_managerd.adapters.engines.spawn import spawn
from pool_managerd.adapters.http_probe import HealthProber, ProbeResult
from support.deadlines import ENGINE_S, LEAK_S

FAKE = [sys.executable, "-m", "pool_managerd.testing.fake_engine"]

_tracked: list[int] = []


def track_pid(pid: int) -> None:
    """Register a pid (e.g. an engine's grandchild) that must be dead when the test ends."""
    _tracked.append(pid)


def _stat(pid: int) -> tuple[int, str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[1]), fields[0].decode()


def children_of(parent: int) -> dict[int, str]:
    """{pid: state} of the processes whose parent is ``parent`` (zombies included)."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] == parent:
                out[int(name)] = st[1]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _leftovers(before: set[int]) -> tuple[dict[int, str], list[int]]:
    kids = {p: s for p, s in children_of(os.getpid()).items() if p not in before}
    return kids, [p for p in _tracked if pid_alive(p)]


def leak_guard() -> Iterator[None]:
    """Generator body of an autouse fixture; see the module docstring."""
    before = set(children_of(os.getpid()))
    _tracked.clear()
    yield
    deadline = time.monotonic() + LEAK_S
    kids, grandkids = _leftovers(before)
    # Reaping happens in asyncio's watcher thread, and killed non-children vanish on their own
    # schedule; neither gives us an event to wait on.
    while (kids or grandkids) and time.monotonic() < deadline:
        time.sleep(0.01)  # ok: no event exists for another process to be reaped/vanish
        kids, grandkids = _leftovers(before)
    _tracked.clear()
    if kids or grandkids:
        described = [f"child {p} [{s}] {_cmdline(p)}" for p, s in kids.items()]
        described += [f"tracked {p} {_cmdline(p)}" for p in grandkids]
        for p in list(kids) + grandkids:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        pytest.fail("processes survived the test:\n  " + "\n  ".join(described))


async def wait_ready(engine: EngineProcess, within_s: float = ENGINE_S) -> list[ProbeResult]:
    """Probe ``engine`` until the first 200; fail if it exits first or the deadline passes.

    Returns every probe result seen, the ok one last.
    """
    results: list[ProbeResult] = []
    ok = asyncio.Event()

    async def on_result(r: ProbeResult) -> None:
        results.append(r)
        if r.ok:
            ok.set()

    prober = HealthProber(engine.host, engine.port, on_result=on_result, steady_interval_s=3600)
    prober.start()
    ok_wait: asyncio.Future[Any] = asyncio.ensure_future(ok.wait())
    exited: asyncio.Future[Any] = engine.exited
    try:
        done, _ = await asyncio.wait({ok_wait, exited}, timeout=within_s, return_when="FIRST_COMPLETED")
    finally:
        ok_wait.cancel()
        await prober.stop()
    if ok_wait not in done or not ok.is_set():
        why = engine.exited.result().describe() if engine.exited.done() else "deadline passed"
        pytest.fail(f"engine pid {engine.pid} never became ready ({why}); log:\n{read_log(engine)}")
    return results


def read_log(engine: EngineProcess) -> str:
    return "" if engine.log_path is None else engine.log_path.read_text(errors="replace")


async def wait_for_file(path: Path, engine: EngineProcess, within_s: float = ENGINE_S) -> str:
    """Content of ``path`` once it exists. The engines write such files before they listen, so
    callers normally check them after :func:`wait_ready`; this covers the rest."""
    deadline = time.monotonic() + within_s
    while not path.exists():
        if engine.exited.done() or time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared; log:\n{read_log(engine)}")
        await asyncio.sleep(0.005)  # ok: no event for another process creating a file
    return path.read_text()


class FakeEngines:
    """Starts fake engines on free ports with logs under ``tmp``; ``close()`` stops them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[EngineProcess] = []

    async def start(
        self,
        *knobs: str,
        pool: str = "p",
        port: int | None = None,
        load_time: float = 0.0,
        **spawn_kw: Any,
    ) -> EngineProcess:
        port = allocate_port() if port is None else port
        argv: Sequence[str] = [*FAKE, "--port", str(port), "--load-time", str(load_time), *knobs]
        spawn_kw.setdefault("log_path", self.tmp / f"{pool}-{len(self.started)}.log")
        engine = await spawn(argv, pool=pool, port=port, **spawn_kw)
        self.started.append(engine)
        return engine

    async def close(self) -> None:
        await asyncio.gather(*(e.stop(0.5) for e in self.started))
