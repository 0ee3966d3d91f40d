"""What is in a pool's event subjects, judged message by message. Pure.

Only the daemon's identity may publish on event subjects, but a message that lands there anyway
(a misconfigured server, a leaked credential, a tool run as the daemon) must not kill the pool.
Each stored message is either one of the pool's events or *foreign*:

* it does not decode as an :class:`~pool_managerd.contract.messages.Event`;
* it names another pool (or none) than its subject, or another type than its subject's last token;
* its ``Nats-Msg-Id`` is not ``<pool>:<seq>``;
* its per-pool ``seq`` is not the next one (a replayed old event, a forged future one).

Foreign messages are never folded. A ``log_corrupt_acknowledged`` event names the stream
sequences an operator has looked at; foreign messages it names are *acknowledged*, the others
keep the pool quarantined (``log_corrupt``). Who may write a pool (ownership) is judged
elsewhere: a well-formed event that continues the sequence is an event here, whoever wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pool_managerd.contract.errors import MalformedMessage
from pool_managerd.contract.messages import MAX_ACK_SEQUENCES, Event, ForeignMessage, LogCorrupt, LogCorruptAcknowledged
from pool_managerd.core.upcast import decode_event

PREVIEW_CHARS = 64
"""How much of a foreign payload is shown, escaped."""
REASON_CHARS = 160


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One stored message as read from the stream: position, subject, Msg-Id header, bytes."""

    stream_seq: int
    subject: str
    data: bytes
    msg_id: str | None = None


@dataclass(slots=True)
class PoolScan:
    """A pool's messages sorted into its events and the foreign ones."""

    pool: str
    events: list[tuple[int, Event]] = field(default_factory=list)
    """``(stream_sequence, event)`` of every legitimate event, in stream order."""
    foreign: list[ForeignMessage] = field(default_factory=list)
    acknowledged: set[int] = field(default_factory=set)
    """Stream sequences named by a ``log_corrupt_acknowledged`` event."""
    last_stream_seq: int = 0
    """The stream sequence of the newest message on the pool's subjects, foreign ones included:
    what the next append's expected-last-subject-sequence must be."""

    @property
    def unacknowledged(self) -> list[ForeignMessage]:
        return [f for f in self.foreign if f.stream_seq not in self.acknowledged]

    def quarantine(self) -> LogCorrupt | None:
        """The ``log_corrupt`` status this scan leaves the pool in, or None when it may serve."""
        return quarantine_of(self.unacknowledged)


def quarantine_of(foreign: list[ForeignMessage]) -> LogCorrupt | None:
    """The ``log_corrupt`` status for these unacknowledged foreign messages (None: none)."""
    if not foreign:
        return None
    shown = foreign[:MAX_ACK_SEQUENCES]
    more = len(foreign) - len(shown)
    first = shown[0]
    reason = f"{len(foreign)} foreign message(s) in the pool's event stream; first at stream sequence "
    reason += f"{first.stream_seq} on {first.subject}: {first.reason}"
    if more:
        reason += f" (only the first {len(shown)} are listed; acknowledge them, then the rest)"
    return LogCorrupt(sequences=[f.stream_seq for f in shown], reason=reason[:512], messages=shown)


def preview(data: bytes) -> str:
    """A short, safe rendering of untrusted bytes: printable ASCII kept, the rest escaped."""
    head = data[:PREVIEW_CHARS]
    text = "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in head)
    return text[: PREVIEW_CHARS * 4] + ("..." if len(data) > PREVIEW_CHARS else "")


def _subject_parts(prefix: str, subject: str) -> tuple[str, str] | None:
    head = f"{prefix}.evt."
    if not subject.startswith(head):
        return None
    parts = subject[len(head) :].split(".")
    if len(parts) != 2:
        return None
    return parts[0], parts[1]


def judge(entry: LogEntry, prefix: str, pool: str | None, next_seq: int | None) -> tuple[Event | None, str | None]:
    """``(event, None)`` when ``entry`` is a legitimate event (of ``pool``, when given, whose
    next per-pool sequence is ``next_seq`` when known), else ``(None, why)``."""
    parts = _subject_parts(prefix, entry.subject)
    if parts is None:
        return None, f"subject {entry.subject[:120]!r} is not {prefix}.evt.<pool>.<event>"
    subject_pool, subject_type = parts
    try:
        event = decode_event(entry.data)
    except MalformedMessage as exc:
        return None, f"not an Event: {exc.message}"[:REASON_CHARS]
    if event.pool != subject_pool or (pool is not None and event.pool != pool):
        return None, f"an event of pool {event.pool!r} on pool {subject_pool!r}'s subject"[:REASON_CHARS]
    if event.type != subject_type:
        return None, f"a {event.type} event on subject type {subject_type!r}"[:REASON_CHARS]
    if entry.msg_id is not None and entry.msg_id != f"{event.pool}:{event.seq}":
        return None, f"Msg-Id {entry.msg_id[:64]!r} does not match seq {event.seq}"[:REASON_CHARS]
    if next_seq is not None and event.seq != next_seq:
        return None, f"seq {event.seq} where the pool's next is {next_seq}"
    return event, None


def foreign_message(entry: LogEntry, reason: str) -> ForeignMessage:
    return ForeignMessage(stream_seq=entry.stream_seq, subject=entry.subject[:256], size=len(entry.data),
                          preview=preview(entry.data), reason=reason)  # fmt: skip


def scan_pool(pool: str, entries: list[LogEntry], prefix: str, *, next_seq: int | None = None) -> PoolScan:
    """Sort one pool's stored messages (stream order) into events and foreign messages.

    ``next_seq`` is the per-pool sequence the first event must carry (None: whatever the first
    legitimate event says, as when the stream's retention has dropped the oldest)."""
    out = PoolScan(pool)
    for entry in entries:
        out.last_stream_seq = max(out.last_stream_seq, entry.stream_seq)
        event, why = judge(entry, prefix, pool, next_seq)
        if event is None:
            out.foreign.append(foreign_message(entry, why or "foreign"))
            continue
        out.events.append((entry.stream_seq, event))
        next_seq = event.seq + 1
        body = event.body
        if isinstance(body, LogCorruptAcknowledged):
            # Only what was stored before the acknowledgement can have been looked at.
            out.acknowledged |= {s for s in body.sequences if s < entry.stream_seq}
    return out


Conflict = str
"""How a refused append is explained: ``"ours"`` (the event was stored by an earlier attempt),
``"rival"`` (another writer appended legitimate events: fencing) or ``"foreign"`` (only
foreign messages: quarantine)."""


def explain_conflict(
    pool: str, entries: list[LogEntry], prefix: str, next_seq: int, own: bytes | None = None
) -> tuple[Conflict, list[ForeignMessage], int | None]:
    """What lies between the last message this writer knew and the pool's newest one.

    ``own`` is the payload being appended: found stored there (an earlier attempt whose ack was
    lost, foreign messages after it), it is ``"ours"`` with its stream sequence. Any other
    legitimate event continuing the pool's sequence means another writer: ``"rival"``.
    Otherwise, foreign messages: ``"foreign"`` with them. Nothing at all (the messages were
    removed meanwhile) is a ``"rival"`` too: the writer's view is stale and it must not guess."""
    if own is not None:
        for entry in entries:
            if entry.data == own and entry.msg_id in (None, f"{pool}:{next_seq}"):
                return "ours", [], entry.stream_seq
    scan = scan_pool(pool, entries, prefix, next_seq=next_seq)
    if scan.events or not scan.foreign:
        return "rival", scan.foreign, None
    return "foreign", scan.foreign, None


@dataclass(slots=True)
class StreamJudge:
    """Judges a whole stream (every pool and node) message by message, as ``replay`` reads it:
    each pool's sequence is followed on its own, and acknowledgements are collected."""

    prefix: str
    next_seq: dict[str, int] = field(default_factory=dict)
    foreign: list[ForeignMessage] = field(default_factory=list)
    acknowledged: set[int] = field(default_factory=set)

    def take(self, entry: LogEntry) -> Event | ForeignMessage:
        """The event ``entry`` is, or the foreign message it is (also kept in :attr:`foreign`)."""
        if entry.subject.startswith(f"{self.prefix}.node."):
            try:
                return decode_event(entry.data)
            except MalformedMessage as exc:
                return self._foreign(entry, f"not an Event: {exc.message}"[:REASON_CHARS])
        parts = _subject_parts(self.prefix, entry.subject)
        pool = parts[0] if parts is not None else None
        event, why = judge(entry, self.prefix, pool, self.next_seq.get(pool) if pool is not None else None)
        if event is None:
            return self._foreign(entry, why or "foreign")
        assert event.pool is not None
        self.next_seq[event.pool] = event.seq + 1
        if isinstance(event.body, LogCorruptAcknowledged):
            self.acknowledged |= {s for s in event.body.sequences if s < entry.stream_seq}
        return event

    def _foreign(self, entry: LogEntry, why: str) -> ForeignMessage:
        found = foreign_message(entry, why)
        self.foreign.append(found)
        return found

    @property
    def unacknowledged(self) -> list[ForeignMessage]:
        return [f for f in self.foreign if f.stream_seq not in self.acknowledged]
