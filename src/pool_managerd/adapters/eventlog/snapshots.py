"""Pool snapshots in the KV bucket: derived state for quick reads and live watches."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from pool_managerd.adapters.eventlog.jetstream import as_jetstream
from pool_managerd.adapters.eventlog.stream import ensure_kv
from pool_managerd.contract.errors import MalformedMessage
from pool_managerd.contract.limits import MAX_SNAPSHOT_BYTES, json_problem
from pool_managerd.contract.messages import SNAPSHOT_DECODER, PoolSnapshot, encode
from pool_managerd.contract.subjects import KV_BUCKET, validate_id

__all__ = ["WATCH_ATTEMPTS", "SnapshotCallback", "SnapshotStore"]

log = logging.getLogger(__name__)

WATCH_ATTEMPTS = 5
"""Times a KV watch is set up before its error is raised (each a 5 s JetStream API request)."""

SnapshotCallback = Callable[[str, PoolSnapshot | None], Awaitable[None] | None]
"""``callback(pool, snapshot)``; ``snapshot`` is None when the key was deleted or purged."""


class SnapshotStore:
    """Latest :class:`PoolSnapshot` per pool in KV bucket ``poold_pools`` (key = pool id).

    The bucket is derived state: readers use it for quick reads and live watches, never as the
    truth. A watch does not survive a server restart reliably in nats-py, so the owner calls
    :meth:`restart_watch` from the client's reconnected callback; the new watch first delivers
    the current value of every key again, then live updates.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._callback: SnapshotCallback | None = None
        self._keys = ">"
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._restart_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, js_or_nc: JetStreamContext | NATS, *, bucket: str = KV_BUCKET, replicas: int = 1
    ) -> SnapshotStore:
        """Open (creating if needed) the bucket and wrap it."""
        return cls(await ensure_kv(as_jetstream(js_or_nc), bucket=bucket, replicas=replicas))

    async def put(self, snapshot: PoolSnapshot) -> int:
        """Store ``snapshot`` under its pool id; returns the KV revision."""
        return await self.kv.put(validate_id(snapshot.pool, "pool"), encode(snapshot))

    async def get(self, pool: str) -> PoolSnapshot | None:
        """The stored snapshot of ``pool``, or None if absent or deleted."""
        try:
            entry = await self.kv.get(validate_id(pool, "pool"))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return _decode_snapshot(entry.value, pool)

    async def delete(self, pool: str) -> None:
        """Delete ``pool``'s snapshot (a delete marker; watchers see None)."""
        await self.kv.delete(validate_id(pool, "pool"))

    async def watch(self, callback: SnapshotCallback, pools: str = ">") -> None:
        """Call ``callback(pool, snapshot_or_None)`` for every current key, then for each change.

        ``pools`` is a key filter (``>`` for all). Returns once the watch is set up.
        """
        await self.stop_watch()
        self._callback = callback
        self._keys = pools
        await self._start_watch()

    async def restart_watch(self) -> None:
        """Re-create the watch (call from the NATS reconnected callback). No-op without a watch.

        Serialised: two reconnects in quick succession must not leave two watchers running."""
        async with self._restart_lock:
            if self._callback is None:
                return
            await self._stop_current()
            await self._start_watch()

    async def wait_synced(self) -> None:
        """Wait until the current watch has delivered every key's value present at its start."""
        await self._synced.wait()

    async def stop_watch(self) -> None:
        """Stop watching."""
        self._callback = None
        await self._stop_current()

    async def _start_watch(self) -> None:
        self._synced.clear()
        delay = 0.2
        for attempt in range(WATCH_ATTEMPTS):
            try:
                watcher = await self.kv.watch(self._keys)
                break
            except (TimeoutError, nats.errors.TimeoutError) as exc:
                # A server busy storing a burst of events (a thousand pools recovering at once)
                # can answer the watch's consumer info late; nats-py has unsubscribed by then.
                if attempt + 1 == WATCH_ATTEMPTS:
                    raise
                log.warning("KV watch not set up (%s); retrying in %.1f s", exc or "timeout", delay)
                await asyncio.sleep(delay)  # ok: backoff before asking a busy server again
                delay = min(delay * 2, 2.0)
        self._watcher = watcher
        self._task = asyncio.get_running_loop().create_task(self._pump(watcher), name="snapshot-watch")

    async def _stop_current(self) -> None:
        watcher, task = self._watcher, self._task
        self._watcher = self._task = None
        if watcher is not None:
            # The old subscription may belong to a connection that is gone; stopping is best-effort.
            with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                await watcher.stop()  # type: ignore[no-untyped-call]
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pump(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:
                # nats-py's marker: every value present at watch start has been delivered.
                self._synced.set()
                continue
            callback = self._callback
            if callback is None:
                continue
            snapshot: PoolSnapshot | None = None
            if entry.operation not in ("DEL", "PURGE") and entry.value:
                try:
                    snapshot = _decode_snapshot(entry.value, entry.key)
                except MalformedMessage:
                    log.warning("skipping malformed snapshot for key %r", entry.key)
                    continue
            try:
                result = callback(entry.key, snapshot)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("snapshot watch callback failed for %r", entry.key)

    async def close(self) -> None:
        """Stop the watch, if any."""
        await self.stop_watch()


def _decode_snapshot(data: bytes, key: str) -> PoolSnapshot:
    # Anyone allowed to put in the bucket could write a value nested past the decoder's recursion.
    problem = json_problem(data, MAX_SNAPSHOT_BYTES)
    if problem is not None:
        raise MalformedMessage(f"KV value of {key!r} is not a PoolSnapshot: {problem[1]}")
    try:
        return SNAPSHOT_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(f"KV value of {key!r} is not a PoolSnapshot: {exc}") from exc
