"""The JetStream event log (DESIGN.md §5): stream setup, the fenced publisher, replay, snapshots.

* :func:`ensure_stream` / :func:`ensure_kv` create or update stream ``POOLD_EVENTS`` (file
  storage) and KV bucket ``poold_pools`` idempotently; every daemon calls them at start.
* :class:`EventPublisher` appends :class:`~pool_managerd.contract.messages.Event` objects in order per
  pool: one at a time within a pool, many pools in flight at once. Pool events carry ``Nats-Msg-Id: <pool>:<seq>`` and
  ``Nats-Expected-Last-Subject-Sequence`` over ``poold.evt.<pool>.>``, so a second daemon
  writing the same pool is refused by the server (error 10071) and this publisher *fences* the
  pool. Transport failures are retried in order from a bounded backlog.
* :func:`read_events` replays a range of the stream (one pool or all) up to the sequence that
  was last when it was called.
* :class:`SnapshotStore` keeps the derived :class:`~pool_managerd.contract.messages.PoolSnapshot` per pool
  in the KV bucket and watches it.

Facts verified against nats-server 2.15.1 (see ``tests/test_event_log.py`` and ``docs/nats.md``):

* ``STREAM.MSG.GET`` with ``last_by_subj`` accepts a wildcard filter (``poold.evt.<pool>.>``)
  and returns the newest message over all matching subjects; 404 / err 10037 when none.
* The expected-last-subject-sequence check runs *before* ``Nats-Msg-Id`` dedupe: re-sending an
  event that was stored (its ack lost) with the same, now stale, expected sequence is refused
  with 10071, not acknowledged as a duplicate. The publisher therefore answers a 10071 by
  reading the pool's last message: if it carries this event's Msg-Id *and* its exact bytes, the
  event was stored and the publish succeeded; otherwise another writer appended and the pool is
  fenced.
* nats-server 2.11.x (the oldest supported, see ``pool_managerd.contract.nats_version``) dedupes first:
  the same resend is acked ``duplicate``. A duplicate ack is checked by bytes too, so either
  order ends the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from pool_managerd.adapters.replication import open_bucket, wait_for_leader
from pool_managerd.contract.errors import MalformedMessage, PoolManagerError
from pool_managerd.contract.limits import MAX_SNAPSHOT_BYTES, json_problem
from pool_managerd.contract.messages import EVENT_DECODER, SNAPSHOT_DECODER, Event, LogCorrupt, PoolSnapshot, encode
from pool_managerd.contract.subjects import KV_BUCKET, STREAM_NAME, Subjects, msg_id, validate_id
from pool_managerd.core.log_integrity import LogEntry

__all__ = [
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_MAX_IN_FLIGHT",
    "DUPLICATE_WINDOW_S",
    "ERR_NO_MESSAGE_FOUND",
    "ERR_WRONG_LAST_SEQUENCE",
    "BacklogFull",
    "EventLogError",
    "EventPublisher",
    "EventRejected",
    "FencedCallback",
    "PoolFenced",
    "PoolQuarantined",
    "PublisherClosed",
    "SnapshotCallback",
    "SnapshotStore",
    "ensure_kv",
    "ensure_stream",
    "last_event",
    "last_pool_sequence",
    "node_msg_id",
    "read_entries",
    "read_events",
]

log = logging.getLogger(__name__)

ERR_WRONG_LAST_SEQUENCE = 10071
"""JetStream ``JSStreamWrongLastSequenceErrF``: the expected last (subject) sequence is stale."""
ERR_NO_MESSAGE_FOUND = 10037
"""JetStream ``JSNoMessageFoundErr``: a message get matched nothing."""
ERR_STREAM_NAME_IN_USE = 10058
"""JetStream ``JSStreamNameExistErr``: add with a config that differs from the existing one."""

DUPLICATE_WINDOW_S = 120.0
"""Server-side ``Nats-Msg-Id`` dedupe window of the event stream."""
DEFAULT_MAX_BACKLOG = 10_000
DEFAULT_MAX_IN_FLIGHT = 32
"""Publishes awaiting their PubAck at once, over all pools (one per pool at most). Measured on
a 2-core machine, 3,000 events over 1,000 pools: 1 at a time 12.6 s, 16 2.8 s, 64 2.4 s, 256
2.1 s. More buys little and keeps a deeper queue at the server ahead of other requests (a KV
watch's consumer info, a status read)."""
WATCH_ATTEMPTS = 5
"""Times a KV watch is set up before its error is raised (each a 5 s JetStream API request)."""

HDR_MSG_ID = "Nats-Msg-Id"
HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
HDR_TRACEPARENT = "traceparent"


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class EventLogError(PoolManagerError):
    """Base of the event log's typed errors."""

    code = "unavailable"


class BacklogFull(EventLogError):
    """The publisher's bounded backlog is full: the event was *not* queued."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"event backlog full ({limit} events waiting for JetStream)")
        self.limit = limit


class PoolFenced(EventLogError):
    """Another writer appended to this pool's events; this publisher no longer writes it."""

    code = "fenced"

    def __init__(self, pool: str, reason: str) -> None:
        super().__init__(f"pool {pool!r} is fenced: {reason}")
        self.pool = pool
        self.reason = reason


class PoolQuarantined(EventLogError):
    """The append was refused because foreign messages (not events of this pool) were stored on
    the pool's subjects: the pool is quarantined (``log_corrupt``), not fenced."""

    code = "log_corrupt"

    def __init__(self, pool: str, corrupt: LogCorrupt) -> None:
        super().__init__(f"pool {pool!r} is quarantined: {corrupt.reason}")
        self.pool = pool
        self.corrupt = corrupt


ConflictInspector = Callable[[str, int, int, bytes], Awaitable[LogCorrupt | int | None]]
"""``inspect(pool, expected_last_stream_seq, next_pool_seq, payload)``: after a refused append, a
:class:`LogCorrupt` when only foreign messages were stored since, the stream sequence of
``payload`` when an earlier attempt stored it (foreign messages after it), None for another
writer."""


class PublisherClosed(EventLogError):
    """The publisher was closed (or its connection closed for good) before the event was stored."""


class EventRejected(EventLogError):
    """JetStream refused the event for a reason retrying cannot fix (e.g. payload too large)."""

    code = "internal"

    def __init__(self, event: Event, error: nats.js.errors.APIError) -> None:
        super().__init__(
            f"event {event.type} seq {event.seq} of {event.pool or event.node!r} refused: "
            f"err_code={error.err_code} {error.description}"
        )
        self.err_code = error.err_code
        self.description = error.description


# ------------------------------------------------------------------------------------------------
# Stream and bucket setup
# ------------------------------------------------------------------------------------------------


def _stream_config(
    subjects: Subjects, max_age_s: float | None, replicas: int, name: str, duplicate_window_s: float
) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        description="pool-managerd events (source of truth)",
        subjects=subjects.stream_subjects,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=max_age_s or 0.0,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        # Lets readers (dashboards, replay) use direct gets; the publisher itself reads through
        # the leader (STREAM.MSG.GET) because fencing needs the authoritative last sequence.
        allow_direct=True,
    )


def _needs_update(have: api.StreamConfig, want: api.StreamConfig) -> bool:
    def secs(v: float | None) -> float:
        return round(v or 0.0, 3)

    return (
        sorted(have.subjects or []) != sorted(want.subjects or [])
        or secs(have.max_age) != secs(want.max_age)
        or (have.num_replicas or 1) != (want.num_replicas or 1)
        or secs(have.duplicate_window) != secs(want.duplicate_window)
        or bool(have.allow_direct) != bool(want.allow_direct)
    )


async def ensure_stream(
    js: JetStreamContext,
    subjects: Subjects,
    max_age_s: float | None = None,
    replicas: int = 1,
    *,
    stream: str = STREAM_NAME,
    duplicate_window_s: float = DUPLICATE_WINDOW_S,
) -> api.StreamInfo:
    """Create stream ``stream`` (file storage) or bring its limits to the given ones.

    Idempotent and safe to race: two daemons starting together both succeed. ``max_age_s``
    None or 0 keeps events forever. The storage type cannot change on an existing stream; a
    stream created elsewhere with memory storage raises ``BadRequestError`` on update.
    """
    if max_age_s:
        # The server refuses a duplicate window longer than max_age (err 10052).
        duplicate_window_s = min(duplicate_window_s, max_age_s)
    want = _stream_config(subjects, max_age_s, replicas, stream, duplicate_window_s)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            created = await js.add_stream(want)
            await wait_for_leader(js, stream)
            return created
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
            # Lost a creation race against a daemon with other limits: fall through to update.
            info = await js.stream_info(stream)
    if info.config.storage not in (None, api.StorageType.FILE):
        raise EventLogError(f"stream {stream!r} exists with {info.config.storage} storage; need file")
    if _needs_update(info.config, want):
        return await js.update_stream(want)
    return info


async def ensure_kv(js: JetStreamContext, *, bucket: str = KV_BUCKET, replicas: int = 1) -> KeyValue:
    """Open KV bucket ``bucket`` (default ``poold_pools``), creating it (history 1, file) if absent."""
    config = api.KeyValueConfig(
        bucket=bucket,
        description="pool-managerd pool snapshots (derived from the event stream)",
        history=1,
        storage=api.StorageType.FILE,
        replicas=replicas,
    )
    return await open_bucket(js, config)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _jetstream(js_or_nc: JetStreamContext | NATS) -> JetStreamContext:
    return js_or_nc.jetstream() if isinstance(js_or_nc, NATS) else js_or_nc


def node_msg_id(node: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of a node event: ``<node>:node:<seq>``."""
    return f"{node}:node:{seq}"


async def _last_msg(js: JetStreamContext, stream: str, filter_subject: str) -> api.RawStreamMsg | None:
    try:
        # Leader read (not a direct get): the answer must be authoritative for fencing.
        return await js.get_last_msg(stream, filter_subject)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code in (ERR_NO_MESSAGE_FOUND, None):
            return None
        raise


async def last_pool_sequence(
    js_or_nc: JetStreamContext | NATS, subjects: Subjects, pool: str, *, stream: str = STREAM_NAME
) -> int:
    """Stream sequence of the newest event of ``pool`` (0 if it has none).

    Uses ``STREAM.MSG.GET`` with ``last_by_subj`` set to the wildcard ``poold.evt.<pool>.>``,
    which nats-server 2.15 answers with the newest message over every matching subject.
    """
    raw = await _last_msg(_jetstream(js_or_nc), stream, subjects.pool_events(pool))
    return 0 if raw is None or raw.seq is None else raw.seq


async def last_event(
    js_or_nc: JetStreamContext | NATS, subjects: Subjects, pool: str, *, stream: str = STREAM_NAME
) -> tuple[int, Event] | None:
    """The newest event of ``pool`` with its stream sequence, or None. Recovery uses its ``seq``."""
    raw = await _last_msg(_jetstream(js_or_nc), stream, subjects.pool_events(pool))
    if raw is None or raw.seq is None:
        return None
    return raw.seq, _decode_event(raw.data or b"", raw.seq)


def _decode_event(data: bytes, seq: int) -> Event:
    try:
        return EVENT_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(f"stream sequence {seq} is not an Event: {exc}") from exc


async def read_events(
    js_or_nc: JetStreamContext | NATS,
    subjects: Subjects,
    pool: str | None = None,
    from_seq: int | None = None,
    until_seq: int | None = None,
    *,
    stream: str = STREAM_NAME,
    batch: int = 256,
    fetch_timeout: float = 5.0,
) -> AsyncIterator[tuple[int, Event]]:
    """Yield ``(stream_sequence, event)`` in stream order, for one pool or (``pool=None``) all.

    The range is ``[from_seq, until_seq]`` in *stream* sequences, both inclusive, and never goes
    past the stream's last sequence at call time, so a live stream does not make it run forever.
    Reads through an ephemeral pull consumer (memory state, no acks) deleted when done.
    Raises :class:`~pool_managerd.contract.errors.MalformedMessage` on a message that is no Event.
    """
    filter_subject = None if pool is None else subjects.pool_events(pool)
    async for seq, _subject, event in _read(
        _jetstream(js_or_nc), filter_subject, from_seq, until_seq, stream=stream, batch=batch,
        fetch_timeout=fetch_timeout,
    ):  # fmt: skip
        yield seq, event


async def read_events_by_pool(
    js_or_nc: JetStreamContext | NATS,
    subjects: Subjects,
    pools: Iterable[str],
    *,
    stream: str = STREAM_NAME,
    batch: int = 1024,
    fetch_timeout: float = 5.0,
) -> dict[str, list[tuple[int, Event]]]:
    """Every event of each of ``pools`` (``(stream_sequence, event)`` in stream order), read in
    one pass over the pool events instead of one consumer per pool: a restart with a thousand
    pools makes one read, not a thousand round trips. A pool is the one its subject names, as
    with :func:`read_events`. Raises like :func:`read_events`; a caller wanting one bad message
    to spoil only its own pool reads the pools one by one after that."""
    wanted = {p: validate_id(p, "pool") for p in pools}
    out: dict[str, list[tuple[int, Event]]] = {p: [] for p in wanted}
    cut = len(subjects.prefix) + len(".evt.")
    async for seq, subject, event in _read(
        _jetstream(js_or_nc), subjects.all_pool_events, None, None, stream=stream, batch=batch,
        fetch_timeout=fetch_timeout, wanted=lambda subj: subj[cut:].split(".", 1)[0] in out,
    ):  # fmt: skip
        out[subject[cut:].split(".", 1)[0]].append((seq, event))
    return out


async def read_subject_events(
    js_or_nc: JetStreamContext | NATS, subjects: Iterable[str], *, stream: str = STREAM_NAME, batch: int = 256
) -> list[tuple[int, Event]]:
    """Every event on each of ``subjects`` (exact subjects), merged in stream order: one consumer
    per subject, each reading only its own subject (a node's fault history, not its heartbeats)."""
    js = _jetstream(js_or_nc)
    out: list[tuple[int, Event]] = []
    for subject in subjects:
        async for seq, _subject, event in _read(js, subject, None, None, stream=stream, batch=batch,
                                                fetch_timeout=5.0):  # fmt: skip
            out.append((seq, event))
    return sorted(out, key=lambda item: item[0])


async def _read(
    js: JetStreamContext,
    filter_subject: str | None,
    from_seq: int | None,
    until_seq: int | None,
    *,
    stream: str,
    batch: int,
    fetch_timeout: float,
    wanted: Callable[[str], bool] | None = None,
) -> AsyncIterator[tuple[int, str, Event]]:
    """``(stream_sequence, subject, event)`` through an ephemeral pull consumer; messages whose
    subject ``wanted`` refuses are skipped undecoded."""
    async for entry in read_entries(js, filter_subject, from_seq, until_seq, stream=stream, batch=batch,
                                    fetch_timeout=fetch_timeout, wanted=wanted):  # fmt: skip
        yield entry.stream_seq, entry.subject, _decode_event(entry.data, entry.stream_seq)


async def read_entries(
    js_or_nc: JetStreamContext | NATS,
    filter_subject: str | None,
    from_seq: int | None = None,
    until_seq: int | None = None,
    *,
    stream: str = STREAM_NAME,
    batch: int = 256,
    fetch_timeout: float = 5.0,
    wanted: Callable[[str], bool] | None = None,
    limit: int | None = None,
) -> AsyncIterator[LogEntry]:
    """Every stored message of the range as a :class:`~pool_managerd.core.log_integrity.LogEntry`
    (bytes undecoded, ``Nats-Msg-Id`` kept), so a caller can judge foreign ones itself; at most
    ``limit`` of them when given."""
    js = _jetstream(js_or_nc)
    taken = 0
    info = await js.stream_info(stream)
    end = info.state.last_seq
    if until_seq is not None:
        end = min(end, until_seq)
    start = max(from_seq or 1, info.state.first_seq, 1)
    if end == 0 or start > end:
        return

    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=api.AckPolicy.NONE,
        mem_storage=True,
        num_replicas=1,
        # Cleans up after a reader that died mid-way; a live reader deletes it itself.
        inactive_threshold=30.0,
    )
    if filter_subject is not None:
        config.filter_subject = filter_subject
    ci = await js.add_consumer(stream, config)
    name = ci.name
    if not ci.num_pending:
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(stream, name)
        return
    sub = await js.pull_subscribe_bind(name, stream=stream)
    try:
        while True:
            msgs = await sub.fetch(batch, timeout=fetch_timeout)
            for msg in msgs:
                meta = msg.metadata
                seq = meta.sequence.stream
                if seq > end:
                    return
                if wanted is None or wanted(msg.subject):
                    yield LogEntry(seq, msg.subject, msg.data, (msg.headers or {}).get(HDR_MSG_ID))
                    taken += 1
                if seq >= end or meta.num_pending == 0 or (limit is not None and taken >= limit):
                    return
    finally:
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await sub.unsubscribe()
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await js.delete_consumer(stream, name)


# ------------------------------------------------------------------------------------------------
# Publishing
# ------------------------------------------------------------------------------------------------

FencedCallback = Callable[[str, str], Awaitable[None] | None]
"""``on_fenced(pool, reason)``; may be a plain function or a coroutine function."""


@dataclass(slots=True)
class _Pending:
    event: Event
    subject: str
    msg_id: str
    payload: bytes
    future: asyncio.Future[int]
    attempts: int = 0


class _Retry(Exception):
    """Internal: the current head of the backlog must be retried later."""


@dataclass(slots=True)
class _Stats:
    published: int = 0
    duplicates: int = 0
    retries: int = 0
    rejected: int = 0
    recovered_after_10071: int = 0
    fenced_drops: int = 0
    peak_in_flight: int = 0


class EventPublisher:
    """Append events to JetStream in order per pool, fenced per pool, retried from a bounded backlog.

    Each pool (and the node's own events) is a lane: its drain task publishes the lane's head,
    waits for its PubAck, then moves on, so a pool's events are stored in the order they were
    submitted. Lanes run concurrently (at most ``max_in_flight`` publishes awaiting acks at
    once), so one pool's slow ack never holds the next pool: a thousand preloads proceed at the
    rate the server acks in parallel, not one round trip after another. Order across pools is
    not kept (nothing reads it: every reader folds one pool's subject). Within a pool the next
    event must wait for the previous ack, because its expected last subject sequence is that
    ack's stream sequence. A failure that retrying can fix (disconnect, ack timeout, no
    responders, 503) keeps the lane's head in place and retries it with backoff; the
    ``Nats-Msg-Id`` makes the retry safe. When ``max_backlog`` events are waiting over all
    lanes, new ones are refused with :class:`BacklogFull`, never dropped.

    A pool event's expected last subject sequence is the stream sequence of this pool's previous
    event (learned from the stream on first use, then from each PubAck; 0 for a pool without
    events). A 10071 refusal that is not our own already-stored event fences the pool: the
    ``on_fenced(pool, reason)`` callback runs once, the event and every later event of the pool
    fail with :class:`PoolFenced`, and new ones are refused at once.

    Cancelling an awaiting :meth:`publish` does not withdraw the event: once queued it is part
    of the log's order and will be written.

    ``may_write()``, when given, is asked before every write; while it says no the backlog waits
    exactly as it does while disconnected (the daemon uses it to write nothing to a server below
    its supported version).
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        *,
        stream: str = STREAM_NAME,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        on_fenced: FencedCallback | None = None,
        ack_timeout: float = 5.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 1.0,
        may_write: Callable[[], bool] | None = None,
        inspect_conflict: ConflictInspector | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_backlog < 1 or max_in_flight < 1:
            raise ValueError("max_backlog and max_in_flight must be at least 1")
        self._nc = nc
        self._js = nc.jetstream(timeout=ack_timeout)
        self.subjects = subjects
        self.stream = stream
        self.max_backlog = max_backlog
        self.on_fenced = on_fenced
        self.ack_timeout = ack_timeout
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.may_write = may_write
        self.inspect_conflict = inspect_conflict
        # One lane per pool (None: the node's events), each drained by its own task while it
        # holds events; _count is the backlog over all lanes.
        self._lanes: dict[str | None, collections.deque[_Pending]] = {}
        self._workers: dict[str | None, asyncio.Task[None]] = {}
        self._count = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_seq: dict[str, int] = {}
        self._fenced: dict[str, str] = {}
        self._closed = False
        self._stats = _Stats()
        self._callback_tasks: set[asyncio.Task[Any]] = set()

    # --------------------------------------------------------------------------------- metrics

    @property
    def backlog(self) -> int:
        """Events accepted but not yet acknowledged by JetStream (including those in flight)."""
        return self._count

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context this publisher writes through."""
        return self._js

    @property
    def fenced_pools(self) -> dict[str, str]:
        """Fenced pools and the reason each was fenced."""
        return dict(self._fenced)

    def is_fenced(self, pool: str) -> bool:
        """Whether ``pool`` is fenced (its events are refused)."""
        return pool in self._fenced

    def last_sequence(self, pool: str) -> int | None:
        """Stream sequence of the pool's last stored event as this publisher knows it, or None."""
        return self._last_seq.get(pool)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: published, duplicates, retries, rejected, recovered_after_10071, fenced_drops,
        peak_in_flight (most publishes awaiting acks at once), backlog."""
        s = self._stats
        return {
            "published": s.published,
            "duplicates": s.duplicates,
            "retries": s.retries,
            "rejected": s.rejected,
            "recovered_after_10071": s.recovered_after_10071,
            "fenced_drops": s.fenced_drops,
            "peak_in_flight": s.peak_in_flight,
            "backlog": self.backlog,
        }

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self, pools: Iterable[str] = ()) -> Self:
        """Learn the last stream sequence of ``pools`` now (others lazily, at their first event)."""
        for pool in pools:
            await self.prime(pool)
        return self

    async def prime(self, pool: str) -> int:
        """Learn (again) the stream sequence of ``pool``'s newest event; returns it (0 if none)."""
        seq = await last_pool_sequence(self._js, self.subjects, pool, stream=self.stream)
        self._last_seq[pool] = seq
        return seq

    def assume(self, pool: str, stream_seq: int) -> None:
        """Take ``stream_seq`` as the stream sequence of ``pool``'s last event: what this daemon
        recovered from, so a write by another daemon since then fences this one at its first
        write (0: the pool has no events yet)."""
        self._last_seq[pool] = stream_seq

    def unfence(self, pool: str) -> None:
        """Forget a fence (this node holds the pool's lease again); its last sequence is re-learned."""
        self._fenced.pop(pool, None)
        self._last_seq.pop(pool, None)

    async def flush(self) -> None:
        """Wait until every accepted event is stored or failed (bound it with ``asyncio.timeout``)."""
        await self._idle.wait()

    async def close(self, grace_s: float | None = 5.0) -> None:
        """Refuse new events, give the backlog ``grace_s`` seconds to drain, then stop.

        Events still waiting afterwards fail with :class:`PublisherClosed`.
        """
        self._closed = True
        if self._count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(PublisherClosed("event publisher closed"))
        for task in list(self._callback_tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --------------------------------------------------------------------------------- publish

    def publish_nowait(self, event: Event) -> asyncio.Future[int]:
        """Queue ``event``; the future resolves to its stream sequence once JetStream acked it.

        Raises at once :class:`BacklogFull`, :class:`PoolFenced`, :class:`PublisherClosed` or
        ``InvalidId``/``InvalidSubject`` for an event that cannot be queued. The future fails
        with :class:`PoolFenced`, :class:`EventRejected` or :class:`PublisherClosed`.
        """
        if self._closed or self._nc.is_closed:
            raise PublisherClosed("event publisher closed")
        if event.pool is not None and event.pool in self._fenced:
            raise PoolFenced(event.pool, self._fenced[event.pool])
        if self._count >= self.max_backlog:
            raise BacklogFull(self.max_backlog)
        if event.pool is not None:
            subject = self.subjects.pool_event(event.pool, event.type)
            mid = msg_id(event.pool, event.seq)
        else:
            subject = self.subjects.node_event(event.node, event.type)
            mid = node_msg_id(validate_id(event.node, "node"), event.seq)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        key = event.pool
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = collections.deque()
        lane.append(_Pending(event, subject, mid, encode(event), future))
        self._count += 1
        self._idle.clear()
        if key not in self._workers:
            name = f"event-publisher-{key}" if key is not None else "event-publisher-node"
            self._workers[key] = asyncio.get_running_loop().create_task(self._drain(key, lane), name=name)
        return future

    async def publish(self, event: Event) -> int:
        """Queue ``event`` and wait until it is stored; returns its stream sequence."""
        # Shielded: a caller that stops waiting must not cancel the event out of the log's order.
        return await asyncio.shield(self.publish_nowait(event))

    # -------------------------------------------------------------------------------- internals

    def _take(self, lane: collections.deque[_Pending], item: _Pending) -> None:
        """Remove ``item`` from the head of its lane (unless a fence or close emptied it)."""
        if lane and lane[0] is item:
            lane.popleft()
            self._count -= 1

    async def _drain(self, key: str | None, lane: collections.deque[_Pending]) -> None:
        """Publish one lane's events in order until it is empty, then end."""
        delay = self.retry_initial_s
        try:
            while lane:
                item = lane[0]
                pool = item.event.pool
                if pool is not None and pool in self._fenced:
                    self._take(lane, item)
                    self._stats.fenced_drops += 1
                    _settle(item.future, exc=PoolFenced(pool, self._fenced[pool]))
                    continue
                try:
                    async with self._slots:
                        self._in_flight += 1
                        self._stats.peak_in_flight = max(self._stats.peak_in_flight, self._in_flight)
                        try:
                            seq = await self._publish_one(item)
                        finally:
                            self._in_flight -= 1
                except _Retry:
                    if self._nc.is_closed:
                        self._fail_all(PublisherClosed("NATS connection closed"))
                        return
                    item.attempts += 1
                    self._stats.retries += 1
                    await asyncio.sleep(delay)  # ok: backoff between retries, no event to wait on
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                except PoolFenced as exc:
                    self._take(lane, item)
                    self._fence(exc.pool, exc.reason)
                    _settle(item.future, exc=exc)
                    continue
                except PoolQuarantined as exc:
                    self._take(lane, item)
                    self._drop_pool(exc.pool, exc)
                    _settle(item.future, exc=exc)
                    continue
                except EventRejected as exc:
                    self._take(lane, item)
                    self._stats.rejected += 1
                    log.error("%s", exc.message)
                    _settle(item.future, exc=exc)
                    continue
                delay = self.retry_initial_s
                self._take(lane, item)
                self._stats.published += 1
                _settle(item.future, result=seq)
        finally:
            if self._workers.get(key) is asyncio.current_task():
                del self._workers[key]
            if not lane and self._lanes.get(key) is lane:
                del self._lanes[key]
            if self._count == 0:
                self._idle.set()

    async def _publish_one(self, item: _Pending) -> int:
        # Sending while the client is reconnecting would only park a copy in its pending buffer
        # that is flushed later next to our retry; wait for the connection instead.
        if not self._nc.is_connected or (self.may_write is not None and not self.may_write()):
            raise _Retry
        event = item.event
        pool = event.pool
        headers: dict[str, str] = {HDR_MSG_ID: item.msg_id}
        if event.traceparent:
            headers[HDR_TRACEPARENT] = event.traceparent
        expected = 0
        if pool is not None:
            try:
                if pool not in self._last_seq:
                    await self.prime(pool)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                if isinstance(exc, nats.js.errors.APIError) and not _retryable(exc):
                    raise EventRejected(event, exc) from exc
                raise _Retry from exc
            expected = self._last_seq[pool]
            headers[HDR_EXPECTED_LAST_SUBJECT_SEQ] = str(expected)
            headers[HDR_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = self.subjects.pool_events(pool)
        try:
            ack = await self._js.publish(
                item.subject, item.payload, timeout=self.ack_timeout, stream=self.stream, headers=headers
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == ERR_WRONG_LAST_SEQUENCE and pool is not None:
                return await self._after_wrong_last_sequence(item, pool, expected, exc)
            if _retryable(exc):
                raise _Retry from exc
            raise EventRejected(event, exc) from exc
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise _Retry from exc
        if ack.duplicate:
            self._stats.duplicates += 1
            if pool is not None:
                await self._check_duplicate_is_ours(item, pool, ack.seq)
        if pool is not None:
            self._last_seq[pool] = ack.seq
        return ack.seq

    async def _check_duplicate_is_ours(self, item: _Pending, pool: str, seq: int) -> None:
        # A rival daemon numbers the pool's events the same way, so "duplicate" may mean its event
        # N holds our Msg-Id: then our event was never stored and we must stop acting on the pool.
        try:
            raw = await self._js.get_msg(self.stream, seq)
        except (TimeoutError, nats.errors.Error, OSError) as err:
            raise _Retry from err
        if raw.data != item.payload:
            raise PoolFenced(
                pool,
                f"Msg-Id {item.msg_id} is already stored at stream sequence {seq} by another writer",
            )

    async def _after_wrong_last_sequence(
        self, item: _Pending, pool: str, expected: int, exc: nats.js.errors.APIError
    ) -> int:
        # The server checks the expected sequence before Msg-Id dedupe, so our own earlier
        # attempt (stored, ack lost) also yields 10071. Only a foreign last message means fencing.
        try:
            raw = await _last_msg(self._js, self.stream, self.subjects.pool_events(pool))
        except (TimeoutError, nats.errors.Error, OSError) as err:
            raise _Retry from err
        # Msg-Id alone is not proof: a rival daemon numbers the pool's events the same way, so
        # its event N has our Msg-Id. Identical bytes (node and timestamp included) are ours.
        if (
            raw is not None
            and raw.seq is not None
            and (raw.headers or {}).get(HDR_MSG_ID) == item.msg_id
            and raw.data == item.payload
        ):
            self._stats.recovered_after_10071 += 1
            self._last_seq[pool] = raw.seq
            return raw.seq
        if self.inspect_conflict is not None:
            try:
                verdict = await self.inspect_conflict(pool, expected, item.event.seq, item.payload)
            except (TimeoutError, nats.errors.Error, OSError) as err:
                raise _Retry from err
            if isinstance(verdict, int):
                # Stored by an earlier attempt; what follows it is the next append's to meet.
                self._stats.recovered_after_10071 += 1
                self._last_seq[pool] = verdict
                return verdict
            if verdict is not None:
                raise PoolQuarantined(pool, verdict)
        found = "none" if raw is None else f"{raw.seq} ({(raw.headers or {}).get(HDR_MSG_ID)!r})"
        raise PoolFenced(
            pool,
            f"another writer appended to {self.subjects.pool_events(pool)}: expected last sequence "
            f"{expected}, server says {exc.description!r}; last message {found}",
        )

    def _fence(self, pool: str, reason: str) -> None:
        if pool in self._fenced:
            return
        self._fenced[pool] = reason
        log.warning("pool %s fenced: %s", pool, reason)
        # Later events of the pool fail now rather than when they reach the head.
        lane = self._lanes.get(pool)
        while lane:
            self._count -= 1
            self._stats.fenced_drops += 1
            _settle(lane.popleft().future, exc=PoolFenced(pool, reason))
        if self._count == 0:
            self._idle.set()
        if self.on_fenced is None:
            return
        try:
            result = self.on_fenced(pool, reason)
        except Exception:
            log.exception("on_fenced callback failed for pool %s", pool)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_done)

    def _drop_pool(self, pool: str, exc: EventLogError) -> None:
        # Later events of a quarantined pool were built on the refused one: they fail with it.
        lane = self._lanes.get(pool)
        while lane:
            self._count -= 1
            _settle(lane.popleft().future, exc=exc)
        if self._count == 0:
            self._idle.set()

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_fenced callback failed", exc_info=task.exception())

    def _fail_all(self, exc: EventLogError) -> None:
        for lane in self._lanes.values():
            while lane:
                _settle(lane.popleft().future, exc=exc)
        self._count = 0
        self._idle.set()


def _retryable(exc: nats.js.errors.APIError) -> bool:
    # 503: JetStream not (yet) available, e.g. just after a restart; 500: transient server error;
    # 10059 stream not found / 10037 can appear while a restarted server recovers its streams.
    return isinstance(exc, nats.js.errors.ServiceUnavailableError | nats.js.errors.ServerError) or (
        exc.err_code in (10059,)
    )


def _settle(future: asyncio.Future[int], *, result: int = 0, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
        # Fire-and-forget callers may drop the future; they learn of fencing via on_fenced.
        future.add_done_callback(_consume_exception)
    else:
        future.set_result(result)


def _consume_exception(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()


# ------------------------------------------------------------------------------------------------
# Snapshots (KV)
# ------------------------------------------------------------------------------------------------

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
        return cls(await ensure_kv(_jetstream(js_or_nc), bucket=bucket, replicas=replicas))

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
