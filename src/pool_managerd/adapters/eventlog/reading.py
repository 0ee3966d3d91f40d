"""Reading the event stream: the last event of a pool, ranges of events, raw entries."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from pool_managerd.adapters.eventlog.jetstream import ERR_NO_MESSAGE_FOUND, HDR_MSG_ID, as_jetstream
from pool_managerd.contract.errors import MalformedMessage
from pool_managerd.contract.messages import EVENT_DECODER, Event
from pool_managerd.contract.subjects import STREAM_NAME, Subjects, validate_id
from pool_managerd.core.log_integrity import LogEntry

__all__ = [
    "last_event",
    "last_msg",
    "last_pool_sequence",
    "node_msg_id",
    "read_entries",
    "read_events",
    "read_events_by_pool",
    "read_subject_events",
]


def node_msg_id(node: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of a node event: ``<node>:node:<seq>``."""
    return f"{node}:node:{seq}"


async def last_msg(js: JetStreamContext, stream: str, filter_subject: str) -> api.RawStreamMsg | None:
    """The newest message on ``filter_subject`` read through the leader, or None when there is none."""
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
    raw = await last_msg(as_jetstream(js_or_nc), stream, subjects.pool_events(pool))
    return 0 if raw is None or raw.seq is None else raw.seq


async def last_event(
    js_or_nc: JetStreamContext | NATS, subjects: Subjects, pool: str, *, stream: str = STREAM_NAME
) -> tuple[int, Event] | None:
    """The newest event of ``pool`` with its stream sequence, or None. Recovery uses its ``seq``."""
    raw = await last_msg(as_jetstream(js_or_nc), stream, subjects.pool_events(pool))
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
        as_jetstream(js_or_nc), filter_subject, from_seq, until_seq, stream=stream, batch=batch,
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
        as_jetstream(js_or_nc), subjects.all_pool_events, None, None, stream=stream, batch=batch,
        fetch_timeout=fetch_timeout, wanted=lambda subj: subj[cut:].split(".", 1)[0] in out,
    ):  # fmt: skip
        out[subject[cut:].split(".", 1)[0]].append((seq, event))
    return out


async def read_subject_events(
    js_or_nc: JetStreamContext | NATS, subjects: Iterable[str], *, stream: str = STREAM_NAME, batch: int = 256
) -> list[tuple[int, Event]]:
    """Every event on each of ``subjects`` (exact subjects), merged in stream order: one consumer
    per subject, each reading only its own subject (a node's fault history, not its heartbeats)."""
    js = as_jetstream(js_or_nc)
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
    js = as_jetstream(js_or_nc)
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
