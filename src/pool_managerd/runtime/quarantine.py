"""Quarantine (``log_corrupt``): a pool whose event subjects hold foreign messages keeps its
engine and keeps answering ``status``, writes nothing, and waits for an operator's
``ack_corrupt`` naming exactly the foreign stream sequences it reports.

* Live: an append refused by the subject-sequence fence is explained by reading what was stored
  since (:func:`inspector`); only foreign messages there quarantine the pool, a legitimate event
  of another writer still fences it.
* Start-up: :func:`read_pool_entries` reads every pool's messages undecoded and
  :func:`~pool_managerd.core.log_integrity.scan_pool` sorts them; a pool with unacknowledged
  foreign messages is restored from its events and quarantined.
* While quarantined, a step that would append is undone: a command gets ``log_corrupt``, a fact
  (an exit, a timer, a health change) is parked in order and applied after the acknowledgement.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from pool_managerd.adapters.event_log import EventPublisher, read_entries
from pool_managerd.contract.messages import MAX_ACK_SEQUENCES, ForeignMessage, LogCorrupt
from pool_managerd.contract.subjects import STREAM_NAME, Subjects
from pool_managerd.core.log_integrity import LogEntry, explain_conflict, foreign_message, judge, quarantine_of

MAX_PARKED_HEALTH = 64
"""Health reports kept while quarantined; older ones are dropped (newer probes replace them)."""
INSPECT_LIMIT = MAX_ACK_SEQUENCES + 1
"""Messages read to explain one refused append."""


class Parked:
    """Facts that arrived while the pool could not write, in arrival order."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._health = 0

    def park(self, item: Any, *, health: bool) -> bool:
        """Keep ``item``; False when it is a health report past :data:`MAX_PARKED_HEALTH`."""
        if health:
            if self._health >= MAX_PARKED_HEALTH:
                return False
            self._health += 1
        self._items.append((item, health))
        return True

    def take(self) -> Any | None:
        """The oldest parked item, or None."""
        if not self._items:
            return None
        item, health = self._items.popleft()
        if health:
            self._health -= 1
        return item

    def __len__(self) -> int:
        return len(self._items)


def merged(old: LogCorrupt | None, new: LogCorrupt) -> LogCorrupt:
    """A quarantine that also names ``new``'s messages (a second batch found before the ack)."""
    if old is None:
        return new
    seen: dict[int, ForeignMessage] = {m.stream_seq: m for m in old.messages}
    for message in new.messages:
        seen.setdefault(message.stream_seq, message)
    out = quarantine_of(sorted(seen.values(), key=lambda m: m.stream_seq))
    assert out is not None
    return out


def ack_problem(pool: str, corrupt: LogCorrupt | None, sequences: list[int]) -> str | None:
    """Why an ``ack_corrupt`` naming ``sequences`` does not fit the quarantine (None: it fits)."""
    if corrupt is None:
        return "is not quarantined: there are no foreign messages to acknowledge"
    if sorted(set(sequences)) != sorted(corrupt.sequences):
        want = ",".join(str(s) for s in corrupt.sequences)
        got = ",".join(str(s) for s in sorted(set(sequences)))
        return f"acknowledge exactly the foreign stream sequences {want} (got {got}); see its status"
    return None


def refusal(corrupt: LogCorrupt) -> str:
    """The message of a ``log_corrupt`` rejection."""
    seqs = ",".join(str(s) for s in corrupt.sequences)
    return (f"is quarantined (log_corrupt): foreign messages at stream sequence(s) {seqs}; nothing is written "
            f"until an operator acknowledges them (pool-managerd ctl ack-corrupt <pool> {seqs})")  # fmt: skip


def inspector(nc: NATS, subjects: Subjects, *, stream: str = STREAM_NAME) -> Any:
    """The publisher's ``inspect_conflict``: what was stored on the pool's subjects after the
    last message this daemon knew, judged by :func:`explain_conflict`."""

    async def inspect(pool: str, expected: int, next_seq: int, payload: bytes) -> LogCorrupt | int | None:
        found = read_entries(nc, subjects.pool_events(pool), expected + 1, stream=stream, limit=INSPECT_LIMIT)
        entries = [entry async for entry in found]
        kind, foreign, own_seq = explain_conflict(pool, entries, subjects.prefix, next_seq, payload)
        if kind == "ours":
            return own_seq
        return quarantine_of(foreign) if kind == "foreign" else None

    return inspect


SKIP_LIMIT = 100_000
"""Messages one acknowledgement reads past the acknowledged ones at most."""


async def skip_acknowledged(
    publisher: EventPublisher, pool: str, corrupt: LogCorrupt, next_seq: int
) -> LogCorrupt | None:
    """Point the publisher past the acknowledged messages and the foreign ones stored after
    them, so the acknowledgement's own append lands after all of them; returns those later
    foreign messages (the next batch to acknowledge), or None.

    A legitimate event among them (another writer) stops the skip there: the append is then
    refused and the fence decides, as for any append."""
    last = max(corrupt.sequences)
    follow, count = last, 0
    foreign: list[ForeignMessage] = []
    entries = read_entries(publisher.js, publisher.subjects.pool_events(pool), last + 1, stream=publisher.stream,
                           limit=SKIP_LIMIT)  # fmt: skip
    # What recovery (or an earlier append) already read includes the pool's own older events,
    # an earlier acknowledgement among them: only what lies beyond is judged against next_seq.
    known = publisher.last_sequence(pool) or 0
    async for entry in entries:
        seen = entry.stream_seq <= known
        event, why = judge(entry, publisher.subjects.prefix, pool, None if seen else next_seq)
        if event is not None:
            if seen:
                follow = entry.stream_seq
                continue
            break
        count += 1
        if len(foreign) < MAX_ACK_SEQUENCES:
            foreign.append(foreign_message(entry, why or "foreign"))
        follow = entry.stream_seq
    publisher.assume(pool, follow)
    remaining = quarantine_of(foreign)
    if remaining is not None and count > len(foreign):
        remaining = msgspec.structs.replace(remaining, reason=f"{count} more foreign message(s); " + remaining.reason)
    return remaining


async def read_pool_entries(
    nc: NATS, subjects: Subjects, pools: Iterable[str], *, stream: str = STREAM_NAME
) -> dict[str, list[LogEntry]]:
    """Every message on the event subjects of each of ``pools``, undecoded, in one pass."""
    out: dict[str, list[LogEntry]] = {p: [] for p in pools}
    cut = len(subjects.prefix) + len(".evt.")

    def pool_of(subject: str) -> str | None:
        # Only what the pool's fencing filter <prefix>.evt.<pool>.> covers belongs to it.
        pool, dot, _rest = subject[cut:].partition(".")
        return pool if dot else None

    async for entry in read_entries(nc, subjects.all_pool_events, stream=stream, batch=1024,
                                    wanted=lambda subject: pool_of(subject) in out):  # fmt: skip
        pool = pool_of(entry.subject)
        assert pool is not None
        out[pool].append(entry)
    return out
