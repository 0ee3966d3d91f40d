"""The pools' ownership leases in JetStream KV bucket ``poold_owners`` (key ``<prefix>.<pool>``).

Every write is a compare-and-set on the key's revision (``Nats-Expected-Last-Subject-Sequence``
under the hood): a claim expects the revision it read (0: no key yet), a renewal the revision it
wrote last. A write that finds another revision raises :class:`LeaseLost`: someone else wrote the
key since, and the writer no longer holds the lease.

Records are never deleted: the epoch must outlive any lease, so the next claim continues from it.
That is also why expiry is not left to a per-key TTL (``allow_msg_ttl``, nats-server 2.11): a key
removed by the server would forget its epoch; holders and claimants judge expiry by their own
clocks instead (:mod:`pool_managerd.core.ownership`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from pool_managerd.adapters.kv_watch import KeyWatch
from pool_managerd.adapters.replication import open_bucket
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import OWNER_DECODER, OwnerRecord, encode
from pool_managerd.contract.subjects import OWNERS_BUCKET, Subjects

__all__ = ["LeaseCallback", "LeaseLost", "OwnerStore", "ReadLease"]

log = logging.getLogger(__name__)


class LeaseLost(PoolManagerError):
    """A compare-and-set on a pool's owner record found another revision: the lease is not ours."""

    code = "not_owner"

    def __init__(self, pool: str, expected: int) -> None:
        super().__init__(f"pool {pool!r}: the owner record changed since revision {expected}")
        self.pool = pool
        self.expected = expected


@dataclass(frozen=True, slots=True)
class ReadLease:
    """A pool's owner record as read: ``record`` None with ``revision`` 0 when there is no key,
    None with a revision when the value is unreadable (a claim may then overwrite it)."""

    record: OwnerRecord | None
    revision: int


LeaseCallback = Callable[[str, "ReadLease"], Awaitable[None] | None]
"""``callback(pool, lease)`` of :meth:`OwnerStore.watcher`."""


class OwnerStore:
    """Read and compare-and-set the owner records of one subject prefix."""

    def __init__(self, kv: KeyValue, subjects: Subjects) -> None:
        self.kv = kv
        self.subjects = subjects

    @classmethod
    async def open(
        cls, js: JetStreamContext, subjects: Subjects, *, bucket: str = OWNERS_BUCKET, replicas: int = 1
    ) -> OwnerStore:
        """Open (creating if needed: history 1, file storage) the bucket and wrap it."""
        config = api.KeyValueConfig(
            bucket=bucket,
            description="pool-managerd ownership leases (node, epoch) per pool",
            history=1,
            storage=api.StorageType.FILE,
            replicas=replicas,
        )
        # Opened once it has a leader: another daemon may be creating it this moment.
        kv = await open_bucket(js, config)
        return cls(kv, subjects)

    async def read(self, pool: str) -> ReadLease:
        """The pool's record and its revision (see :class:`ReadLease`)."""
        key = self.subjects.owner_key(pool)
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyDeletedError as exc:
            return ReadLease(None, exc.entry.revision if exc.entry and exc.entry.revision else 0)
        except nats.js.errors.KeyNotFoundError:
            return ReadLease(None, 0)
        return _lease(pool, entry.value, entry.revision or 0)

    def watcher(self, callback: LeaseCallback) -> KeyWatch:
        """A watch (not yet started) of every pool's record under this prefix: ``callback(pool,
        lease)`` for each record present at its start, then for each write."""
        prefix = f"{self.subjects.prefix}."

        async def on_entry(entry: KeyValue.Entry) -> None:
            pool = entry.key.removeprefix(prefix)
            revision = entry.revision or 0
            if entry.operation in ("DEL", "PURGE"):
                lease = ReadLease(None, revision)
            else:
                lease = _lease(pool, entry.value, revision)
            result = callback(pool, lease)
            if inspect.isawaitable(result):
                await result

        return KeyWatch(self.kv, f"{prefix}*", on_entry, name="owner-watch")

    async def write(self, pool: str, record: OwnerRecord, expect_revision: int) -> int:
        """Write ``record`` if the key is still at ``expect_revision``; returns the new revision.

        Raises :class:`LeaseLost` when it is not; transport errors (timeouts, no responders,
        a lost connection) are raised as they are: the write may or may not have happened."""
        key = self.subjects.owner_key(pool)
        try:
            return await self.kv.update(key, encode(record), last=expect_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise LeaseLost(pool, expect_revision) from None


def _lease(pool: str, value: bytes | None, revision: int) -> ReadLease:
    try:
        return ReadLease(OWNER_DECODER.decode(value or b""), revision)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("owner record of pool %s (revision %d) is unreadable: %s", pool, revision, exc)
        return ReadLease(None, revision)
