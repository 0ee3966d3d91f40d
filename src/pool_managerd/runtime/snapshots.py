"""The KV writer: each pool's snapshot in the KV bucket, written when what a reader shows changed.

Coalesced per pool (see :meth:`KvWriter.run`), stood down for fenced pools and while the server
is below the version floor, and drained side by side at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.contract.messages import PoolSnapshot, encode
from pool_managerd.runtime.pools import PoolRuntime

log = logging.getLogger(__name__)

KV_FINAL_AT_ONCE = 32
"""Final KV snapshot puts in flight at once during shutdown."""

KV_COALESCE_S = 0.05
"""Least time between two KV writes of one pool's snapshot (a reader's staleness bound, plus one put)."""

KV_PROBE_REFRESH_S = 30.0
"""How long probe bookkeeping alone (``last_heartbeat``, ``perf_hints``) may wait for a KV write.
30 s, the observers' health refresh period: at 5 s the refresh alone cost N/5 puts a second
(0.15 of a core at 1,000 pools) for fields no reader acts on."""


@dataclass(frozen=True, slots=True)
class _Written:
    """A snapshot as the KV writer compares it: whole, and without its probe bookkeeping."""

    full: bytes
    shown: bytes
    at: float

    @classmethod
    def of(cls, snapshot: PoolSnapshot, at: float) -> _Written:
        shown = msgspec.structs.replace(snapshot, last_heartbeat=None, perf_hints={})
        return cls(full=encode(snapshot), shown=encode(shown), at=at)


def _kv_due(last: _Written | None, now: _Written) -> float | None:
    """When ``now`` should be written given the ``last`` write: None when nothing changed."""
    if last is None:
        return now.at
    if last.full == now.full:
        return None
    wait = KV_COALESCE_S if last.shown != now.shown else KV_PROBE_REFRESH_S
    return max(now.at, last.at + wait)


class KvWriter:
    """Writes pools' snapshots to KV; :meth:`mark_dirty` says a pool may have changed.

    ``runtime`` and ``snapshots`` are read at each write (the daemon creates them during start-up),
    ``fenced`` names pools whose snapshots belong to another writer, and ``supported()`` is False
    while the server cannot fence writes."""

    def __init__(
        self,
        runtime: Callable[[], PoolRuntime | None],
        snapshots: Callable[[], SnapshotStore | None],
        fenced: Mapping[str, str],
        supported: Callable[[], bool],
    ) -> None:
        self._runtime = runtime
        self._snapshots = snapshots
        self._fenced = fenced
        self._supported = supported
        self.dirty: dict[str, None] = {}
        """Pools to look at, in the order they changed."""
        self.written: dict[str, _Written] = {}
        """What was last written of each pool, and when."""
        self._wake = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def mark_dirty(self, pool: str) -> None:
        """``pool`` may have changed: look at it on the writer's next round."""
        self.dirty[pool] = None
        self._wake.set()

    def scheduled(self, pool: str) -> bool:
        """Whether a later write of ``pool`` is already set (it will carry whatever changes now)."""
        return pool in self._timers

    def forget_written(self) -> None:
        """Write every pool anew (the server may have lost what was written)."""
        self.written.clear()

    async def run(self) -> None:
        """Write a pool's snapshot when something a reader shows has changed, coalesced.

        Steps that only record probe bookkeeping (``last_heartbeat``, ``perf_hints``: every probe
        of a loading engine is one) do not write by themselves; they ride along with the next
        write, or are written :data:`KV_PROBE_REFRESH_S` after the last one. Any other change is
        written at once, or :data:`KV_COALESCE_S` after the pool's previous write if that was
        more recent, so a burst of steps is one put and a reader is never more than
        ``KV_COALESCE_S`` plus one put behind while NATS is reachable."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                # A cancel that an await inside the put swallowed (Python 3.11's wait_for does,
                # when the reply lands as the cancel comes): stop anyway, or shutdown waits for
                # this task until it gives up.
                raise asyncio.CancelledError
            await self._wake.wait()
            self._wake.clear()
            while self.dirty:
                pool = next(iter(self.dirty))
                del self.dirty[pool]
                runtime, snapshots = self._runtime(), self._snapshots()
                if runtime is None or snapshots is None or pool not in runtime.actors:
                    continue
                if pool in self._fenced:
                    continue  # the snapshot belongs to the pool's new writer now
                if not self._supported():
                    self.dirty.clear()
                    break
                snapshot = runtime.snapshot(pool)
                now = loop.time()
                written = _Written.of(snapshot, now)
                due = _kv_due(self.written.get(pool), written)
                if due is None:
                    continue
                if due > now:
                    self._later(pool, due - now)
                    continue
                try:
                    await snapshots.put(snapshot)
                except Exception as exc:
                    log.warning("KV snapshot of %s not written (%s); retrying in 1 s", pool, exc)
                    self.dirty[pool] = None
                    loop.call_later(1.0, self._wake.set)
                    break
                self.written[pool] = written
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError

    def _later(self, pool: str, delay: float) -> None:
        """Mark ``pool`` dirty after ``delay``, unless an earlier wake-up is already set."""
        loop = asyncio.get_running_loop()
        pending = self._timers.get(pool)
        if pending is not None:
            if pending.when() <= loop.time() + delay:
                return
            pending.cancel()

        def fire() -> None:
            self._timers.pop(pool, None)
            self.mark_dirty(pool)

        self._timers[pool] = loop.call_later(delay, fire)

    async def drain(self, connected: bool) -> None:
        """Write every dirty pool now (shutdown), when ``connected``; ``mark_dirty`` them first."""
        # Every pool is written now, whatever was waiting to coalesce.
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        runtime, snapshots = self._runtime(), self._snapshots()
        if runtime is None or snapshots is None or not connected:
            return
        # Side by side, not one put after another (a thousand pools waited 9 s here).
        gate = asyncio.Semaphore(KV_FINAL_AT_ONCE)

        async def put(pool: str) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(snapshots.put(runtime.snapshot(pool)), 2.0)

        pools = [p for p in self.dirty if p not in self._fenced and p in runtime.actors]
        await asyncio.gather(*(put(pool) for pool in pools))
        self.dirty.clear()
