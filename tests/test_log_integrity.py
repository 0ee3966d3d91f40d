"""The pure judgement of what is stored on a pool's event subjects (core/log_integrity.py)."""

from __future__ import annotations

from pool_managerd.contract.messages import SCHEMA_VERSION, Event, HealthChanged, LogCorruptAcknowledged, encode
from pool_managerd.core.log_integrity import LogEntry, StreamJudge, explain_conflict, preview, scan_pool

P = "poold"


def ev(seq: int, pool: str = "chat", body: object | None = None, node: str = "n1") -> Event:
    return Event(v=SCHEMA_VERSION, seq=seq, ts=1.0, node=node, pool=pool,
                 body=body or HealthChanged(live=True, ready=True))  # type: ignore[arg-type]  # fmt: skip


def entry(stream_seq: int, event: Event | bytes, subject: str | None = None, msg_id: str | None = None) -> LogEntry:
    if isinstance(event, Event):
        data = encode(event)
        subject = subject or f"{P}.evt.{event.pool}.{event.type}"
        msg_id = msg_id if msg_id is not None else f"{event.pool}:{event.seq}"
    else:
        data = event
    assert subject is not None
    return LogEntry(stream_seq, subject, data, msg_id)


def test_events_pass_and_every_kind_of_foreign_message_is_named() -> None:
    entries = [
        entry(1, ev(1)),
        entry(2, b"{}", f"{P}.evt.chat.junk"),
        entry(3, ev(1, pool="other"), f"{P}.evt.chat.health_changed"),
        entry(4, ev(2), f"{P}.evt.chat.state_changed"),
        entry(5, ev(2), msg_id="chat:99"),
        entry(6, ev(7)),
        entry(7, ev(1)),  # an old event sent again
        entry(8, ev(2)),
        entry(9, ev(3), f"{P}.evt.chat.a.b"),
    ]
    scan = scan_pool("chat", entries, P)
    assert [s for s, _ in scan.events] == [1, 8]
    reasons = {f.stream_seq: f.reason for f in scan.foreign}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 9]
    assert reasons[2].startswith("not an Event")
    assert "pool 'other'" in reasons[3]
    assert "subject type 'state_changed'" in reasons[4]
    assert "Msg-Id 'chat:99'" in reasons[5]
    assert reasons[6] == "seq 7 where the pool's next is 2" and reasons[7] == "seq 1 where the pool's next is 2"
    assert "is not poold.evt.<pool>.<event>" in reasons[9]
    assert scan.last_stream_seq == 9
    corrupt = scan.quarantine()
    assert corrupt is not None and corrupt.sequences == [2, 3, 4, 5, 6, 7, 9]


def test_an_acknowledgement_clears_exactly_what_it_names_and_only_before_it() -> None:
    entries = [
        entry(1, ev(1)),
        entry(2, b"junk", f"{P}.evt.chat.x"),
        entry(3, b"junk", f"{P}.evt.chat.x"),
        entry(4, ev(2, body=LogCorruptAcknowledged(sequences=[2, 5]))),
        entry(5, b"later", f"{P}.evt.chat.x"),
    ]
    scan = scan_pool("chat", entries, P)
    assert [f.stream_seq for f in scan.unacknowledged] == [3, 5]
    corrupt = scan.quarantine()
    assert corrupt is not None and corrupt.sequences == [3, 5]
    acked = entry(3, ev(2, body=LogCorruptAcknowledged(sequences=[2])))
    assert scan_pool("chat", [*entries[:2], acked], P).quarantine() is None


def test_a_refused_append_is_another_writer_only_when_a_legitimate_event_is_there() -> None:
    junk = entry(5, b"{}", f"{P}.evt.chat.junk")
    rival = entry(6, ev(4, node="n2"))
    assert explain_conflict("chat", [junk], P, next_seq=4)[0] == "foreign"
    assert explain_conflict("chat", [junk, rival], P, next_seq=4)[0] == "rival"
    assert explain_conflict("chat", [], P, next_seq=4)[0] == "rival"
    # A forged event that does not continue the sequence is foreign, not a rival.
    kind, foreign, _ = explain_conflict("chat", [entry(6, ev(9, node="n2"))], P, next_seq=4)
    assert kind == "foreign" and foreign[0].stream_seq == 6
    # Our own event, stored by an attempt whose ack was lost, then junk: ours, at its sequence.
    mine = entry(5, ev(4))
    assert explain_conflict("chat", [mine, junk], P, next_seq=4, own=mine.data) == ("ours", [], 5)


def test_a_stream_judge_follows_each_pool_and_names_unreadable_node_events() -> None:
    judge = StreamJudge(P)
    assert isinstance(judge.take(entry(1, ev(1, pool="a"))), Event)
    assert isinstance(judge.take(entry(2, ev(1, pool="b"))), Event)
    judge.take(entry(3, b"\x00", f"{P}.node.n1.evt.heartbeat"))
    judge.take(entry(4, ev(1, pool="a")))
    judge.take(entry(5, ev(2, pool="a", body=LogCorruptAcknowledged(sequences=[3]))))
    assert [f.stream_seq for f in judge.foreign] == [3, 4]
    assert [f.stream_seq for f in judge.unacknowledged] == [4]


def test_previews_are_short_and_escaped() -> None:
    assert preview(b"ok\n\x00") == "ok\\x0a\\x00"
    long = preview(b"x" * 500)
    assert long == "x" * 64 + "..."
