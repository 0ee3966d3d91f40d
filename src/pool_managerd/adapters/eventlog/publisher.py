"""The fenced event publisher: one lane per pool, in order within a pool, retried from a bounded backlog.

Facts verified against nats-server 2.15.1 (see ``tests/adapters/test_event_log.py`` and ``docs/nats.md``):

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

One job, a long module: :class:`EventPublisher` is the lanes, the fence and the retries of one
backlog together; they share its state and cannot be read apart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pool_managerd.adapters.eventlog.errors import (
    BacklogFull,
    EventLogError,
    EventRejected,
    PoolFenced,
    PoolQuarantined,
    PublisherClosed,
)
from pool_managerd.adapters.eventlog.jetstream import (
    ERR_WRONG_LAST_SEQUENCE,
    HDR_EXPECTED_LAST_SUBJECT_SEQ,
    HDR_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    HDR_MSG_ID,
    HDR_TRACEPARENT,
)
from pool_managerd.adapters.eventlog.reading import last_msg, last_pool_sequence, node_msg_id
from pool_managerd.contract.messages import Event, LogCorrupt, encode
from pool_managerd.contract.subjects import STREAM_NAME, Subjects, msg_id, validate_id

__all__ = ["DEFAULT_MAX_BACKLOG", "DEFAULT_MAX_IN_FLIGHT", "ConflictInspector", "EventPublisher", "FencedCallback"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 10_000
DEFAULT_MAX_IN_FLIGHT = 32
"""Publishes awaiting their PubAck at once, over all pools (one per pool at most). Measured on
a 2-core machine, 3,000 events over 1,000 pools: 1 at a time 12.6 s, 16 2.8 s, 64 2.4 s, 256
2.1 s. More buys little and keeps a deeper queue at the server ahead of other requests (a KV
watch's consumer info, a status read)."""

ConflictInspector = Callable[[str, int, int, bytes], Awaitable[LogCorrupt | int | None]]
"""``inspect(pool, expected_last_stream_seq, next_pool_seq, payload)``: after a refused append, a
:class:`LogCorrupt` when only foreign messages were stored since, the stream sequence of
``payload`` when an earlier attempt stored it (foreign messages after it), None for another
writer."""

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

    def pending(self, pool: str) -> int:
        """How many of ``pool``'s events wait to be stored."""
        return len(self._lanes.get(pool) or ())

    async def settle(self, pool: str) -> None:
        """Wait until every event of ``pool`` queued so far is stored or failed (bound it with
        ``asyncio.timeout``)."""
        while lane := self._lanes.get(pool):
            await asyncio.wait([lane[-1].future])

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
            raw = await last_msg(self._js, self.stream, self.subjects.pool_events(pool))
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
