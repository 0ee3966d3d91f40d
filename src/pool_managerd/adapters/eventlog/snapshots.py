"""Pool snapshots in the KV bucket: derived state for quick reads and live watches."""

from __future__ import annotations

import asyncio
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
from pool_managerd.adapters.kv_watch import WATCH_ATTEMPTS, KeyWatch
from pool_managerd.contract.errors import MalformedMessage
from pool_managerd.contract.limits import MAX_SNAPSHOT_BYTES, json_problem
from pool_managerd.contract.messages import SNAPSHOT_DECODER, PoolSnapshot, encode
from pool_managerd.contract.subjects import KV_BUCKET, validate_id

__all__ = ["WATCH_ATTEMPTS", "SnapshotCallback", "SnapshotStore"]

log = logging.getLogger(__name__)

SnapshotCallback = Callable[[str, PoolSnapshot | None], Awaitable[None] | None]
"""``callback(pool, snapshot)``; ``snapshot`` is None when the key was deleted or purged."""


class SnapshotStore:
    """Latest :class:`PoolSnapshot` per pool in KV bucket ``poold_pools`` (key = pool id).

    The bucket is derived state: readers use it for quick reads and live watches, never as the
    truth. The owner of a watch calls :meth:`restart_watch` from the client's reconnected
    callback (see :mod:`pool_managerd.adapters.kv_watch`).
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._callback: SnapshotCallback | None = None
        self._watch: KeyWatch | None = None
        self._watching = asyncio.Event()
        """Set once a watch has been set up (``wait_synced`` may be called before)."""

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
        self._watch = KeyWatch(self.kv, pools, self._on_entry, name="snapshot-watch")
        await self._watch.start()
        self._watching.set()

    async def restart_watch(self) -> None:
        """Re-create the watch (call from the NATS reconnected callback). No-op without a watch."""
        if self._watch is not None:
            await self._watch.restart()

    async def wait_synced(self) -> None:
        """Wait until the current watch has delivered every key's value present at its start."""
        await self._watching.wait()
        if self._watch is not None:
            await self._watch.wait_synced()

    async def stop_watch(self) -> None:
        """Stop watching."""
        self._callback = None
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()

    async def _on_entry(self, entry: KeyValue.Entry) -> None:
        callback = self._callback
        if callback is None:
            return
        snapshot: PoolSnapshot | None = None
        if entry.operation not in ("DEL", "PURGE") and entry.value:
            try:
                snapshot = _decode_snapshot(entry.value, entry.key)
            except MalformedMessage:
                log.warning("skipping malformed snapshot for key %r", entry.key)
                return
        result = callback(entry.key, snapshot)
        if inspect.isawaitable(result):
            await result

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
