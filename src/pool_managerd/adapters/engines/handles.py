"""Handles on running engines, spawned by this daemon or adopted from the spawn record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pool_managerd.adapters.engines.procs import (
    kill_group,
    proc_start_ticks,
    wait_child,
    wait_group_gone,
    wait_pid_exit,
)
from pool_managerd.adapters.engines.record import SpawnEntry, SpawnRecord

log = logging.getLogger(__name__)

__all__ = ["AdoptedProcess", "EngineHandle", "EngineProcess", "ExitInfo", "OnExit"]


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How an engine ended. Exactly one of ``exit_code``/``signal`` is set for a spawned child;
    both are None for an adopted process (a non-child's status cannot be read)."""

    exit_code: int | None
    signal: int | None
    expected: bool = False
    """True when the exit followed our own stop request."""
    ended_at: float = field(default_factory=time.time)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        return "exited (status unknown)"


OnExit = Callable[["EngineHandle", ExitInfo], None]


class EngineHandle:
    """What the pool actor holds for a running engine, spawned or adopted.

    ``exited`` resolves (never fails) with the :class:`ExitInfo` once the leader is gone and the
    group has been SIGKILLed; ``on_exit`` (sync, called once, exceptions logged) fires just
    before. ``stop`` is idempotent, safe after exit, and shared by concurrent callers.
    """

    def __init__(
        self,
        *,
        pool: str,
        pid: int,
        port: int,
        host: str,
        started_at: float,
        argv: list[str],
        log_path: Path | None,
        record: SpawnRecord | None,
        on_exit: OnExit | None,
    ) -> None:
        self.pool = pool
        self.pid = pid
        self.pgid = pid
        self.port = port
        self.host = host
        self.started_at = started_at
        self.argv = argv
        self.log_path = log_path
        self.stop_requested = False
        self.exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._record = record
        self._on_exit = on_exit
        self._group_gone = False
        self._stop_task: asyncio.Task[ExitInfo] | None = None
        self._recorded_gone = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def entry(self) -> SpawnEntry:
        return SpawnEntry(
            pool=self.pool,
            pid=self.pid,
            pgid=self.pgid,
            port=self.port,
            host=self.host,
            started_at=self.started_at,
            argv=list(self.argv),
            log_path=None if self.log_path is None else str(self.log_path),
            start_ticks=proc_start_ticks(self.pid),
        )

    async def wait(self) -> ExitInfo:
        """Wait for the engine to exit (cancelling this does not affect the engine)."""
        return await asyncio.shield(self.exited)

    def signal_group(self, sig: int) -> bool:
        """Signal the engine's group unless it is known to be gone (its id may be reused)."""
        if self._group_gone:
            return False
        return kill_group(self.pgid, sig)

    async def stop(self, grace_s: float, *, settle_s: float = 1.0) -> ExitInfo:
        """SIGTERM the group, wait up to ``grace_s`` for the leader, then SIGKILL the group.

        Returns once the leader has been reaped and the group SIGKILLed, having waited up to
        ``settle_s`` for the other members to vanish (so GPU memory and ports are released).
        Worst case ``grace_s + settle_s`` plus scheduling. Cancelling a caller does not cancel
        the stop.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(
                self._stop(grace_s, settle_s), name=f"stop-engine-{self.pool}-{self.pid}"
            )
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float, settle_s: float) -> ExitInfo:
        if not self.exited.done():
            self.stop_requested = True
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
            except TimeoutError:
                log.info("engine %s pid %d ignored SIGTERM for %.1fs: SIGKILL", self.pool, self.pid, grace_s)
                self.signal_group(signal.SIGKILL)
        info = await asyncio.shield(self.exited)
        if not self._group_gone:
            self.signal_group(signal.SIGKILL)
            self._group_gone = await wait_group_gone(self.pgid, settle_s)
        # A stopped engine is out of the spawn record when stop() returns.
        await self._recorded_gone.wait()
        return info

    async def _finish(self, info: ExitInfo) -> None:
        # The leader is gone: kill the rest of the group before anything else can run, so no
        # grandchild survives an engine that crashed or exited on its own.
        with contextlib.suppress(ValueError):
            self.signal_group(signal.SIGKILL)
        # Report the exit first: the fsync of the spawn record and the /proc scan below cost
        # milliseconds each, and the exit must reach the lifecycle before them. A dead pid left
        # in the record for a moment is harmless: adoption checks the process start time.
        if self._on_exit is not None:
            try:
                self._on_exit(self, info)
            except Exception:
                log.exception("on_exit callback of engine %s pid %d failed", self.pool, self.pid)
        self.exited.set_result(info)
        await asyncio.sleep(0)
        try:
            if self._record is not None:
                await self._record.remove_async(self.pid)
        except OSError:
            log.exception("cannot update spawn record %s", self._record.path if self._record else "?")
        finally:
            self._recorded_gone.set()
        if self._stop_task is None:
            self._group_gone = await wait_group_gone(self.pgid, 1.0)


class EngineProcess(EngineHandle):
    """An engine spawned by this daemon (see :func:`spawn`); exit is observed by ``wait()``.

    A gated engine (``gate`` is the write end of its gate pipe) is held before ``exec`` until
    :meth:`release`; it never runs if the daemon dies first (the pipe closes and the gate exits)."""

    def __init__(self, proc: subprocess.Popen[bytes], *, gate: int | None = None, **kw: Any) -> None:
        super().__init__(pid=proc.pid, **kw)
        self.proc = proc
        self._gate = gate
        self._watch_task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"watch-engine-{kw['pool']}-{proc.pid}"
        )

    @property
    def gated(self) -> bool:
        """Whether the engine still waits at its gate."""
        return self._gate is not None

    def release(self) -> None:
        """Let a gated engine run (a no-op for one that runs already)."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        try:
            os.write(gate, b"go\n")
        except OSError as exc:
            # The gate is gone (the process was killed meanwhile): its exit is reported as usual.
            log.warning("engine %s pid %d: gate not opened: %s", self.pool, self.pid, exc)
        finally:
            os.close(gate)

    def _close_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            with contextlib.suppress(OSError):
                os.close(gate)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _watch(self) -> None:
        rc = await wait_child(self.proc)
        self._close_gate()
        info = (
            ExitInfo(exit_code=None, signal=-rc, expected=self.stop_requested)
            if rc < 0
            else ExitInfo(exit_code=rc, signal=None, expected=self.stop_requested)
        )
        log.info("engine %s pid %d %s", self.pool, self.pid, info.describe())
        await self._finish(info)


class AdoptedProcess(EngineHandle):
    """An engine from the spawn record, left running by a previous daemon; not our child, so
    its exit status is unknown (``ExitInfo(None, None)``). Create with :meth:`adopt`."""

    def __init__(self, entry: SpawnEntry, record: SpawnRecord | None, on_exit: OnExit | None) -> None:
        super().__init__(
            pool=entry.pool,
            pid=entry.pid,
            port=entry.port,
            host=entry.host,
            started_at=entry.started_at,
            argv=list(entry.argv),
            log_path=None if entry.log_path is None else Path(entry.log_path),
            record=record,
            on_exit=on_exit,
        )
        self.pgid = entry.pgid
        self._watch_task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"watch-adopted-{entry.pool}-{entry.pid}"
        )

    @classmethod
    def adopt(
        cls, entry: SpawnEntry, *, record: SpawnRecord | None = None, on_exit: OnExit | None = None
    ) -> AdoptedProcess | None:
        """Take over ``entry`` if its process is still the one recorded, else None.

        Must be called with a running event loop. Refuses groups 0/1 and the daemon's own group.
        """
        if entry.pgid <= 1 or entry.pgid == os.getpgrp() or not entry.is_live():
            return None
        return cls(entry, record, on_exit)

    async def _watch(self) -> None:
        await wait_pid_exit(self.pid, None)
        await self._finish(ExitInfo(exit_code=None, signal=None, expected=self.stop_requested))
