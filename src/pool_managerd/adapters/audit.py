"""The audit stream: refused commands, kept apart from the pools' history.

A refusal changes no state, so it is not an event: it goes to stream ``POOLD_AUDIT`` on
``<prefix>.audit.<node>.<code>``, which is bounded by size (``max_bytes``, the oldest records
discarded first) and by age like the event stream. Records are published on core NATS without
waiting for a PubAck (the stream captures the subject): a flood of refusals costs one write
each and never slows a pool. At most :data:`MAX_PENDING` records wait; past that they are
dropped and counted, since the audit trail is evidence, not the source of truth.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from pool_managerd.contract.messages import AuditRecord, Rejected, encode
from pool_managerd.contract.subjects import AUDIT_STREAM, Subjects

log = logging.getLogger(__name__)

MAX_PENDING = 1024
"""Records waiting to be written at most; newer ones are dropped (and counted) past it."""
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
LOG_EVERY_S = 10.0
"""At most one log line per this many seconds sums up the refusals since the last."""


async def ensure_audit_stream(
    js: JetStreamContext,
    subjects: Subjects,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_age_s: float | None = None,
    replicas: int = 1,
    stream: str = AUDIT_STREAM,
) -> api.StreamInfo:
    """Create stream ``stream`` or bring its limits to these (idempotent; file storage)."""
    want = api.StreamConfig(
        name=stream,
        description="pool-managerd refused commands (audit; bounded, oldest discarded)",
        subjects=[subjects.all_audit],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_bytes=max_bytes,
        max_age=max_age_s or 0.0,
        max_msg_size=4096,
        num_replicas=replicas,
    )
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            return await js.add_stream(want)
        except nats.js.errors.BadRequestError:
            info = await js.stream_info(stream)  # lost a creation race: compare below
    have = info.config
    if (have.max_bytes, round(have.max_age or 0.0, 3), have.subjects) != (
        want.max_bytes, round(want.max_age or 0.0, 3), want.subjects,
    ):  # fmt: skip
        return await js.update_stream(want)
    return info


def audit_record(node: str, rejected: Rejected, ts: float | None = None) -> AuditRecord:
    """The audit record of one rejection (its message cut to the record's bound)."""
    return AuditRecord(ts=time.time() if ts is None else ts, node=node, pool=rejected.pool, verb=rejected.verb,
                       command_id=rejected.command_id, code=rejected.code, message=rejected.message[:512],
                       state=rejected.state)  # fmt: skip


class AuditLog:
    """Writes :class:`AuditRecord` s in order through one task; bounded; never raises to callers."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        *,
        clock: Callable[[], float],
        on_drop: Callable[[], None] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._nc = nc
        self.subjects = subjects
        self._clock = clock
        self._on_drop = on_drop
        self.max_pending = max_pending
        self._pending: collections.deque[AuditRecord] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._since: collections.Counter[str] = collections.Counter()
        self._last_log = 0.0
        self.written = 0
        self.dropped = 0

    def record(self, record: AuditRecord) -> None:
        """Queue one refusal (dropped and counted when :attr:`max_pending` are waiting)."""
        self._since[record.code] += 1
        now = self._clock()
        if now - self._last_log >= LOG_EVERY_S:
            # One line for many refusals: a client hammering a pool must not flood the log.
            counts = ", ".join(f"{code} {n}" for code, n in self._since.most_common())
            log.info("commands refused since the last report: %s (latest: %s on %s: %s)", counts, record.verb,
                     record.pool, record.message[:160])  # fmt: skip
            self._since.clear()
            self._last_log = now
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        self._pending.append(record)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="audit-writer")

    async def _drain(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            record = self._pending.popleft()
            try:
                await self._nc.publish(self.subjects.audit(record.node, record.code), encode(record))
                self.written += 1
            except (nats.errors.Error, OSError, ValueError) as exc:
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()
                log.debug("audit record not written: %s", exc)

    async def close(self) -> None:
        """Stop the writer (what is still waiting is dropped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
