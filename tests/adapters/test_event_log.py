"""The JetStream event log over a real nats-server: stream setup, fencing, retry, replay, KV."""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from pool_managerd.adapters.eventlog.errors import BacklogFull, PoolFenced, PublisherClosed
from pool_managerd.adapters.eventlog.jetstream import ERR_WRONG_LAST_SEQUENCE
from pool_managerd.adapters.eventlog.publisher import EventPublisher
from pool_managerd.adapters.eventlog.reading import last_event, last_pool_sequence, read_events
from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.adapters.eventlog.stream import ensure_kv, ensure_stream
from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    DaemonStarted,
    Event,
    HealthChanged,
    PoolSnapshot,
    encode,
)
from pool_managerd.contract.subjects import KV_BUCKET, STREAM_NAME, Subjects

if TYPE_CHECKING:
    from conftest import JsNamespace, NatsConnect
    from pool_managerd.adapters.embedded_nats import NatsServer

WAIT = 10.0
_ts = itertools.count(1)


def ev(pool: str | None, seq: int, *, node: str = "node-a", trace: str | None = None) -> Event:
    body = (
        HealthChanged(live=True, ready=seq % 2 == 0)
        if pool is not None
        else DaemonStarted(version="0", pools=[], simulated=True)
    )
    return Event(
        v=SCHEMA_VERSION,
        seq=seq,
        ts=1_700_000_000.0 + next(_ts),
        node=node,
        pool=pool,
        traceparent=trace,
        body=body,
    )


async def setup_stream(nc: NATS, ns: JsNamespace) -> None:
    await ensure_stream(nc.jetstream(), ns.subjects, None, stream=ns.stream)


def publisher(nc: NATS, ns: JsNamespace, **kw: object) -> EventPublisher:
    return EventPublisher(nc, ns.subjects, stream=ns.stream, **kw)  # type: ignore[arg-type]


async def collect(agen: object) -> list[tuple[int, Event]]:
    return [item async for item in agen]  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------
# stream and bucket setup
# -------------------------------------------------------------------------------------------


async def test_ensure_stream_is_idempotent_and_updates_max_age(nc: NATS, js_ns: JsNamespace) -> None:
    js = nc.jetstream()
    first = await ensure_stream(js, js_ns.subjects, None, stream=js_ns.stream)
    second = await ensure_stream(js, js_ns.subjects, None, stream=js_ns.stream)
    assert first.config.name == second.config.name == js_ns.stream
    assert sorted(second.config.subjects or []) == sorted(js_ns.subjects.stream_subjects)
    assert second.config.storage == nats.js.api.StorageType.FILE
    assert second.config.duplicate_window == pytest.approx(120.0)
    assert not second.config.max_age

    updated = await ensure_stream(js, js_ns.subjects, 3600.0, stream=js_ns.stream)
    assert updated.config.max_age == pytest.approx(3600.0)
    again = await js.stream_info(js_ns.stream)
    assert again.config.max_age == pytest.approx(3600.0)

    kv1 = await ensure_kv(js, bucket=js_ns.bucket)
    kv2 = await ensure_kv(js, bucket=js_ns.bucket)
    status = await kv2.status()
    assert kv1._name == kv2._name == js_ns.bucket
    assert status.history == 1


async def test_ensure_stream_races_and_short_max_age(nc: NATS, js_ns: JsNamespace) -> None:
    js = nc.jetstream()
    limits = (None, 60.0, None, 7200.0)
    results = await asyncio.gather(*(ensure_stream(js, js_ns.subjects, m, stream=js_ns.stream) for m in limits))
    assert {r.config.name for r in results} == {js_ns.stream}
    # A max_age under the 2 min dedupe window shortens the window (the server demands it).
    info = await ensure_stream(js, js_ns.subjects, 60.0, stream=js_ns.stream)
    assert info.config.max_age == pytest.approx(60.0)
    assert info.config.duplicate_window == pytest.approx(60.0)


async def test_default_names_on_a_fresh_server(fresh_nats_server: NatsServer, nats_connect: NatsConnect) -> None:
    nc = await nats_connect(fresh_nats_server.url)
    js = nc.jetstream()
    info = await ensure_stream(js, Subjects(), None)
    assert info.config.name == STREAM_NAME
    assert sorted(info.config.subjects or []) == ["poold.evt.>", "poold.node.*.evt.>"]
    await ensure_kv(js)
    assert (await js.stream_info(f"KV_{KV_BUCKET}")).config.max_msgs_per_subject == 1


# -------------------------------------------------------------------------------------------
# publishing: order, headers, dedupe
# -------------------------------------------------------------------------------------------


async def test_publish_two_pools_in_order_with_headers(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    js = nc.jetstream()
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    events = [ev("p1", 1), ev("p2", 1), ev("p1", 2, trace=trace), ev(None, 1), ev("p2", 2), ev("p1", 3)]
    async with publisher(nc, js_ns) as pub:
        futures = [pub.publish_nowait(e) for e in events]
        seqs = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    for lane in ("p1", "p2", None):  # in order within a pool; pools are written side by side
        mine = [s for s, e in zip(seqs, events, strict=True) if e.pool == lane]
        assert mine == sorted(mine)
    assert len(set(seqs)) == len(seqs)

    stored = [await js.get_msg(js_ns.stream, s) for s in seqs]
    prefix = js_ns.subjects.prefix
    assert [m.subject for m in stored] == [
        f"{prefix}.evt.p1.health_changed",
        f"{prefix}.evt.p2.health_changed",
        f"{prefix}.evt.p1.health_changed",
        f"{prefix}.node.node-a.evt.daemon_started",
        f"{prefix}.evt.p2.health_changed",
        f"{prefix}.evt.p1.health_changed",
    ]
    hdrs = [m.headers or {} for m in stored]
    assert [h["Nats-Msg-Id"] for h in hdrs] == ["p1:1", "p2:1", "p1:2", "node-a:node:1", "p2:2", "p1:3"]
    # Expected last subject sequence = stream seq of the pool's previous event (0 for the first).
    expected = [h.get("Nats-Expected-Last-Subject-Sequence") for h in hdrs]
    assert expected == ["0", "0", str(seqs[0]), None, str(seqs[1]), str(seqs[2])]
    assert [h.get("Nats-Expected-Last-Subject-Sequence-Subject") for h in hdrs] == [
        f"{prefix}.evt.p1.>",
        f"{prefix}.evt.p2.>",
        f"{prefix}.evt.p1.>",
        None,
        f"{prefix}.evt.p2.>",
        f"{prefix}.evt.p1.>",
    ]
    assert hdrs[2]["traceparent"] == trace
    assert "traceparent" not in hdrs[0]
    assert stored[0].data == encode(events[0])


async def test_pools_are_written_side_by_side_each_in_its_own_order(nc: NATS, js_ns: JsNamespace) -> None:
    """Pools do not wait for each other's acks (many publishes in flight at once, bounded), while
    within a pool each event still waits for the previous ack: its expected last subject
    sequence is that ack's stream sequence."""
    await setup_stream(nc, js_ns)
    pools = [f"q{i:03d}" for i in range(200)]
    async with publisher(nc, js_ns, max_in_flight=64) as pub:
        futures = [pub.publish_nowait(ev(pool, n)) for n in (1, 2, 3) for pool in pools]
        seqs = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        stats = pub.stats
    assert 1 < stats["peak_in_flight"] <= 64, stats
    assert stats["published"] == 600 and stats["backlog"] == 0
    stored = await collect(read_events(nc, js_ns.subjects, stream=js_ns.stream))
    assert sorted(s for s, _ in stored) == sorted(seqs)
    js = nc.jetstream()
    for pool in pools[:: len(pools) // 10]:
        mine = [(s, e.seq) for s, e in stored if e.pool == pool]
        assert [n for _, n in mine] == [1, 2, 3]
        hdrs = [(await js.get_msg(js_ns.stream, s)).headers or {} for s, _ in mine]
        assert [h["Nats-Expected-Last-Subject-Sequence"] for h in hdrs] == ["0", str(mine[0][0]), str(mine[1][0])]


async def test_msg_id_dedupe_same_event_stored_once(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    e = ev("p1", 1)
    async with publisher(nc, js_ns) as pub:
        s1 = await asyncio.wait_for(pub.publish(e), WAIT)
        s2 = await asyncio.wait_for(pub.publish(e), WAIT)
        assert pub.stats["duplicates"] == 1
    assert s1 == s2
    info = await nc.jetstream().stream_info(js_ns.stream)
    assert info.state.messages == 1


async def test_server_checks_expected_sequence_before_msg_id_dedupe(nc: NATS, js_ns: JsNamespace) -> None:
    """Fact (nats-server 2.15.1): a resend with a stale expected sequence gets 10071, not a dup ack."""
    await setup_stream(nc, js_ns)
    js = nc.jetstream()
    subject = js_ns.subjects.pool_event("p1", "health_changed")
    hdrs = {
        "Nats-Msg-Id": "p1:1",
        "Nats-Expected-Last-Subject-Sequence": "0",
        "Nats-Expected-Last-Subject-Sequence-Subject": js_ns.subjects.pool_events("p1"),
    }
    first = await js.publish(subject, b"x", headers=dict(hdrs))
    with pytest.raises(nats.js.errors.APIError) as err:
        await js.publish(subject, b"x", headers=dict(hdrs))
    assert err.value.err_code == ERR_WRONG_LAST_SEQUENCE
    assert err.value.description == f"wrong last sequence: {first.seq}"
    # With the right expected sequence the same Msg-Id is a duplicate, acked with the old seq.
    hdrs["Nats-Expected-Last-Subject-Sequence"] = str(first.seq)
    dup = await js.publish(subject, b"x", headers=dict(hdrs))
    assert dup.duplicate and dup.seq == first.seq


async def test_own_stored_event_with_lost_ack_is_not_fenced(nc: NATS, js_ns: JsNamespace) -> None:
    """A publisher with a stale view re-sends its own stored event: 10071, then recognised as ours."""
    await setup_stream(nc, js_ns)
    e1 = ev("p1", 1)
    fenced: list[str] = []
    async with (
        publisher(nc, js_ns) as writer,
        publisher(nc, js_ns, on_fenced=lambda p, r: fenced.append(p)) as stale,
    ):
        assert await stale.prime("p1") == 0
        stored = await asyncio.wait_for(writer.publish(e1), WAIT)
        # `stale` still expects 0, exactly like a retry whose first attempt was stored.
        again = await asyncio.wait_for(stale.publish(e1), WAIT)
        assert again == stored
        assert stale.stats["recovered_after_10071"] == 1
        assert not stale.is_fenced("p1")
        assert await asyncio.wait_for(stale.publish(ev("p1", 2)), WAIT) == stored + 1
    assert fenced == []


# -------------------------------------------------------------------------------------------
# fencing: two daemons, one pool
# -------------------------------------------------------------------------------------------


async def test_second_writer_is_fenced_with_10071(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    fenced: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def on_fenced(pool: str, reason: str) -> None:
        fenced.set_result((pool, reason))

    daemon_a = publisher(nc, js_ns)
    daemon_b = publisher(nc, js_ns, on_fenced=on_fenced)
    async with daemon_a, daemon_b:
        # Both learn the pool's (empty) history at start.
        await daemon_a.start(pools=["p1"])
        await daemon_b.start(pools=["p1"])
        a1 = await asyncio.wait_for(daemon_a.publish(ev("p1", 1, node="node-a")), WAIT)

        # B's events 1..3 for p1, plus one for another pool queued behind them.
        b_futs = [daemon_b.publish_nowait(ev("p1", n, node="node-b")) for n in (1, 2, 3)]
        other = daemon_b.publish_nowait(ev("p9", 1, node="node-b"))
        results = await asyncio.wait_for(asyncio.gather(*b_futs, return_exceptions=True), WAIT)
        assert all(isinstance(r, PoolFenced) for r in results), results
        pool, reason = await asyncio.wait_for(fenced, WAIT)
        assert pool == "p1"
        assert "wrong last sequence" in reason
        assert daemon_b.is_fenced("p1")
        assert set(daemon_b.fenced_pools) == {"p1"}
        assert daemon_b.stats["fenced_drops"] == 2
        with pytest.raises(PoolFenced):
            daemon_b.publish_nowait(ev("p1", 4, node="node-b"))
        # Other pools of the fenced daemon are unaffected; the owner keeps writing.
        assert await asyncio.wait_for(other, WAIT) > a1
        a2 = await asyncio.wait_for(daemon_a.publish(ev("p1", 2, node="node-a")), WAIT)
        assert a2 > a1

    p1 = await collect(read_events(nc, js_ns.subjects, "p1", stream=js_ns.stream))
    assert [(e.node, e.seq) for _, e in p1] == [("node-a", 1), ("node-a", 2)]


async def test_publisher_learns_last_sequence_at_start(nc: NATS, js_ns: JsNamespace) -> None:
    """A restarted daemon continues its pools: the expected sequence comes from the stream."""
    await setup_stream(nc, js_ns)
    async with publisher(nc, js_ns) as first_run:
        for n in (1, 2):
            await asyncio.wait_for(first_run.publish(ev("p1", n)), WAIT)
        await asyncio.wait_for(first_run.publish(ev("p2", 1)), WAIT)
        last = first_run.last_sequence("p1")
    assert last is not None
    assert await last_pool_sequence(nc, js_ns.subjects, "p1", stream=js_ns.stream) == last
    assert await last_pool_sequence(nc, js_ns.subjects, "nope", stream=js_ns.stream) == 0
    found = await last_event(nc, js_ns.subjects, "p1", stream=js_ns.stream)
    assert found is not None
    assert found[0] == last and found[1].seq == 2
    assert await last_event(nc, js_ns.subjects, "nope", stream=js_ns.stream) is None

    async with publisher(nc, js_ns) as second_run:
        seq = await asyncio.wait_for(second_run.publish(ev("p1", 3)), WAIT)
    assert seq > last
    stored = await nc.jetstream().get_msg(js_ns.stream, seq)
    assert (stored.headers or {})["Nats-Expected-Last-Subject-Sequence"] == str(last)


# -------------------------------------------------------------------------------------------
# backlog: retry across a kill -9, bounded size
# -------------------------------------------------------------------------------------------


async def test_backlog_survives_kill9_and_arrives_in_order_exactly_once(
    fresh_nats_server: NatsServer, nats_connect: NatsConnect
) -> None:
    server = fresh_nats_server
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats_connect(server.url, reconnected_cb=on_reconnect)
    subjects = Subjects()
    await ensure_stream(nc.jetstream(), subjects, None)
    pub = EventPublisher(nc, subjects, ack_timeout=0.5, retry_initial_s=0.02, retry_max_s=0.2)
    await pub.start()
    per_pool = {"p1": 0, "p2": 0}
    sent: list[Event] = []

    def submit(count: int) -> list[asyncio.Future[int]]:
        futs = []
        for i in range(count):
            pool = "p1" if i % 3 else "p2"
            per_pool[pool] += 1
            e = ev(pool, per_pool[pool])
            sent.append(e)
            futs.append(pub.publish_nowait(e))
        return futs

    # Kill mid-stream: a batch is in flight when the server dies.
    before = submit(30)
    await asyncio.wait_for(before[2], WAIT)
    server.kill()
    during = submit(30)  # queued while the server is down
    assert pub.backlog > 0
    assert not during[-1].done()
    await server.arestart()
    await asyncio.wait_for(reconnected.wait(), WAIT)
    seqs = await asyncio.wait_for(asyncio.gather(*before, *during), 20)

    assert len(set(seqs)) == len(seqs)
    assert pub.backlog == 0 and not pub.fenced_pools
    await pub.close()
    stored = await collect(read_events(nc, subjects))
    # Every event once, each pool's in submission order (pools are lanes of their own).
    assert sorted(s for s, _ in stored) == sorted(seqs)
    for pool in per_pool:
        assert [e for _, e in stored if e.pool == pool] == [e for e in sent if e.pool == pool]
    by_event = {(e.pool, e.seq): s for s, e in stored}
    assert [by_event[(e.pool, e.seq)] for e in sent] == seqs


async def test_ack_lost_after_store_is_recovered_not_duplicated(
    fresh_nats_server: NatsServer, nats_connect: NatsConnect
) -> None:
    """A frozen server times the publish out; on thaw it stores the first attempt and refuses the
    retry with 10071 (stale expected sequence). The publisher recognises its own event."""
    server = fresh_nats_server
    nc = await nats_connect(server.url)
    subjects = Subjects()
    await ensure_stream(nc.jetstream(), subjects, None)
    fenced: list[str] = []
    pub = EventPublisher(nc, subjects, ack_timeout=0.3, retry_max_s=0.05, on_fenced=lambda p, r: fenced.append(r))
    await pub.start(pools=["p1"])
    server.pause()
    try:
        fut = pub.publish_nowait(ev("p1", 1))
        deadline = asyncio.get_running_loop().time() + WAIT
        while pub.stats["retries"] < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)  # ok: retries are internal, no event to wait on
    finally:
        server.resume()
    seq = await asyncio.wait_for(fut, WAIT)
    assert await asyncio.wait_for(pub.publish(ev("p1", 2)), WAIT) == seq + 1
    assert pub.stats["recovered_after_10071"] >= 1, pub.stats
    assert fenced == []
    await pub.close()
    stored = await collect(read_events(nc, subjects))
    assert [(s, e.seq) for s, e in stored] == [(seq, 1), (seq + 1, 2)]


async def test_backlog_full_is_reported_not_dropped(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    pub = publisher(nc, js_ns, max_backlog=3)
    # publish_nowait is synchronous: the drain task cannot run between these calls.
    futs = [pub.publish_nowait(ev("p1", n)) for n in (1, 2, 3)]
    with pytest.raises(BacklogFull) as err:
        pub.publish_nowait(ev("p1", 4))
    assert err.value.limit == 3 and err.value.code == "unavailable"
    assert pub.backlog == 3
    await asyncio.wait_for(asyncio.gather(*futs), WAIT)
    assert await asyncio.wait_for(pub.publish(ev("p1", 4)), WAIT) > 0
    await pub.close()
    with pytest.raises(PublisherClosed):
        pub.publish_nowait(ev("p1", 5))
    events = await collect(read_events(nc, js_ns.subjects, "p1", stream=js_ns.stream))
    assert [e.seq for _, e in events] == [1, 2, 3, 4]


async def test_close_fails_what_cannot_be_written(fresh_nats_server: NatsServer, nats_connect: NatsConnect) -> None:
    nc = await nats_connect(fresh_nats_server.url)
    await ensure_stream(nc.jetstream(), Subjects(), None)
    pub = EventPublisher(nc, Subjects(), ack_timeout=0.2, retry_max_s=0.05)
    fresh_nats_server.kill()
    fut = pub.publish_nowait(ev("p1", 1))
    await pub.close(grace_s=0.3)
    with pytest.raises(PublisherClosed):
        await fut


# -------------------------------------------------------------------------------------------
# replay
# -------------------------------------------------------------------------------------------


async def test_read_events_filters_by_pool_and_range(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    plan = [ev("p1", 1), ev("p2", 1), ev(None, 1), ev("p1", 2), ev("p2", 2), ev("p1", 3)]
    async with publisher(nc, js_ns) as pub:
        seqs = [await asyncio.wait_for(pub.publish(e), WAIT) for e in plan]

    everything = await collect(read_events(nc, js_ns.subjects, stream=js_ns.stream))
    assert [s for s, _ in everything] == seqs
    assert [e for _, e in everything] == plan

    p1 = await collect(read_events(nc.jetstream(), js_ns.subjects, "p1", stream=js_ns.stream))
    assert [(s, e.seq) for s, e in p1] == [(seqs[0], 1), (seqs[3], 2), (seqs[5], 3)]

    ranged = await collect(
        read_events(nc, js_ns.subjects, "p1", from_seq=seqs[1], until_seq=seqs[4], stream=js_ns.stream)
    )
    assert [e.seq for _, e in ranged] == [2]
    tail = await collect(read_events(nc, js_ns.subjects, from_seq=seqs[4], stream=js_ns.stream))
    assert [s for s, _ in tail] == seqs[4:]
    head = await collect(read_events(nc, js_ns.subjects, until_seq=seqs[1], stream=js_ns.stream, batch=1))
    assert [s for s, _ in head] == seqs[:2]

    assert await collect(read_events(nc, js_ns.subjects, "ghost", stream=js_ns.stream)) == []
    assert await collect(read_events(nc, js_ns.subjects, from_seq=seqs[-1] + 1, stream=js_ns.stream)) == []


async def test_read_events_stops_at_last_sequence_at_call_time(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    async with publisher(nc, js_ns) as pub:
        for n in (1, 2, 3):
            await asyncio.wait_for(pub.publish(ev("p1", n)), WAIT)
        seen: list[int] = []
        async for _, e in read_events(nc, js_ns.subjects, "p1", stream=js_ns.stream, batch=1):
            seen.append(e.seq)
            if e.seq == 1:
                # Written after the read began: not part of this read.
                await asyncio.wait_for(pub.publish(ev("p1", 4)), WAIT)
    assert seen == [1, 2, 3]


async def test_read_events_on_empty_stream(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    assert await collect(read_events(nc, js_ns.subjects, stream=js_ns.stream)) == []


# -------------------------------------------------------------------------------------------
# snapshots (KV)
# -------------------------------------------------------------------------------------------


async def _expect(q: asyncio.Queue[tuple[str, PoolSnapshot | None]]) -> tuple[str, PoolSnapshot | None]:
    return await asyncio.wait_for(q.get(), WAIT)


async def test_snapshot_store_put_get_delete_watch(nc: NATS, js_ns: JsNamespace) -> None:
    store = await SnapshotStore.open(nc, bucket=js_ns.bucket)
    assert await store.get("p1") is None
    s1 = PoolSnapshot(pool="p1", node="node-a", state="ready", seq=4)
    assert await store.put(s1) > 0
    assert await store.get("p1") == s1

    q: asyncio.Queue[tuple[str, PoolSnapshot | None]] = asyncio.Queue()
    await store.watch(lambda pool, snap: q.put_nowait((pool, snap)))
    assert await _expect(q) == ("p1", s1)  # current values first
    await asyncio.wait_for(store.wait_synced(), WAIT)

    s2 = PoolSnapshot(pool="p2", state="preloading", seq=1)
    await store.put(s2)
    assert await _expect(q) == ("p2", s2)
    await store.delete("p1")
    assert await _expect(q) == ("p1", None)
    assert await store.get("p1") is None
    await store.close()


async def test_snapshot_watch_survives_server_restart(fresh_nats_server: NatsServer, nats_connect: NatsConnect) -> None:
    server = fresh_nats_server
    holder: list[SnapshotStore] = []
    restarted: asyncio.Queue[None] = asyncio.Queue()

    async def on_reconnect() -> None:
        # Per nats-py, KV watchers must be re-created after a reconnect; do it off the callback.
        async def redo() -> None:
            await holder[0].restart_watch()
            restarted.put_nowait(None)

        asyncio.get_running_loop().create_task(redo())

    nc = await nats_connect(server.url, reconnected_cb=on_reconnect)
    store = await SnapshotStore.open(nc)
    holder.append(store)
    q: asyncio.Queue[tuple[str, PoolSnapshot | None]] = asyncio.Queue()

    async def on_change(pool: str, snap: PoolSnapshot | None) -> None:
        await q.put((pool, snap))

    s1 = PoolSnapshot(pool="p1", state="ready", seq=1)
    await store.put(s1)
    await store.watch(on_change)
    assert await _expect(q) == ("p1", s1)

    server.kill()
    await server.arestart()
    await asyncio.wait_for(restarted.get(), WAIT)
    assert await _expect(q) == ("p1", s1)  # the new watch replays current values

    s2 = PoolSnapshot(pool="p1", state="draining", seq=2)
    await store.put(s2)
    assert await _expect(q) == ("p1", s2)
    assert await store.get("p1") == s2
    await store.close()


async def test_may_write_holds_the_backlog_in_order_until_it_allows(nc: NATS, js_ns: JsNamespace) -> None:
    """The daemon's gate for servers below the supported version: nothing is written while it
    says no, nothing is dropped, and the order holds once it says yes."""
    await setup_stream(nc, js_ns)
    allowed = False
    asked = asyncio.Event()
    calls = 0

    def may_write() -> bool:
        nonlocal calls
        calls += 1
        if calls >= 3:
            asked.set()
        return allowed

    async with publisher(nc, js_ns, may_write=may_write, retry_max_s=0.01) as pub:
        futs = [pub.publish_nowait(ev("p1", n)) for n in (1, 2)]
        await asyncio.wait_for(asked.wait(), WAIT)  # asked again and again, refused each time
        assert not any(f.done() for f in futs) and pub.backlog == 2
        assert (await nc.jetstream().stream_info(js_ns.stream)).state.messages == 0
        allowed = True
        seqs = await asyncio.wait_for(asyncio.gather(*futs), WAIT)
    assert seqs == sorted(seqs)
    assert [e.seq for _, e in await collect(read_events(nc, js_ns.subjects, "p1", stream=js_ns.stream))] == [1, 2]


async def test_a_backlog_episode_is_logged_once_not_per_step(
    nc: NATS, js_ns: JsNamespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pool_managerd.runtime import sink as sink_mod
    from pool_managerd.runtime.metrics import Metrics

    await setup_stream(nc, js_ns)
    writable = False
    pub = publisher(nc, js_ns, may_write=lambda: writable, retry_initial_s=0.01, retry_max_s=0.02)
    await pub.start()
    monkeypatch.setattr(sink_mod, "ACK_BOUND_S", 0.05)
    sink = sink_mod.JetStreamSink(pub, Metrics())
    caplog.set_level("INFO", logger=sink_mod.__name__)
    try:
        # The log is behind (writes held): twenty steps go on, one warning says so.
        for seq in range(1, 21):
            await sink.append(f"p{seq}", [ev(f"p{seq}", 1)])
        warnings = [r for r in caplog.records if "not yet acknowledged" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        writable = True
        async with asyncio.timeout(WAIT):
            await pub.flush()
        await sink.append("p21", [ev("p21", 1)])  # acked in time: the episode is over
        assert any("caught up: 20 step(s)" in r.getMessage() for r in caplog.records)
        # A new episode warns again.
        writable = False
        await sink.append("p22", [ev("p22", 1)])
        assert len([r for r in caplog.records if "not yet acknowledged" in r.getMessage()]) == 2
        writable = True
    finally:
        await pub.close()


async def test_read_events_by_pool_matches_one_read_per_pool(nc: NATS, js_ns: JsNamespace) -> None:
    await setup_stream(nc, js_ns)
    pub = publisher(nc, js_ns)
    await pub.start()
    try:
        for seq in range(1, 4):
            for pool in ("a", "b", "c"):
                await pub.publish(ev(pool, seq))
            await pub.publish(ev(None, seq))  # node events are not any pool's
    finally:
        await pub.close()
    from pool_managerd.adapters.eventlog.reading import read_events_by_pool

    batched = await read_events_by_pool(nc, js_ns.subjects, ["a", "c", "none"], stream=js_ns.stream)
    for pool in ("a", "c", "none"):
        one = await collect(read_events(nc, js_ns.subjects, pool=pool, stream=js_ns.stream))
        assert batched[pool] == one
    assert [e.seq for _, e in batched["a"]] == [1, 2, 3] and batched["none"] == []
    assert set(batched) == {"a", "c", "none"}


async def test_settle_waits_for_one_pools_backlog_to_be_stored(nc: NATS, js_ns: JsNamespace) -> None:
    """What a claim waits on before it reads a pool's history: that pool's queued events stored
    (or failed), however long the log is unwritable, and no other pool's."""
    await setup_stream(nc, js_ns)
    allowed = False
    async with publisher(nc, js_ns, may_write=lambda: allowed, retry_max_s=0.01) as pub:
        futs = [pub.publish_nowait(ev("p1", n)) for n in (1, 2, 3)]
        pub.publish_nowait(ev("p2", 1))
        assert pub.pending("p1") == 3 and pub.pending("p2") == 1 and pub.pending("p3") == 0
        settling = asyncio.ensure_future(pub.settle("p1"))
        done, _ = await asyncio.wait([settling], timeout=0.3)
        assert not done and pub.pending("p1") == 3  # the gate holds everything back
        allowed = True
        await asyncio.wait_for(settling, WAIT)
        assert pub.pending("p1") == 0 and all(f.done() and f.exception() is None for f in futs)
        await asyncio.wait_for(pub.settle("p3"), WAIT)  # nothing queued: returns at once
    assert [e.seq for _, e in await collect(read_events(nc, js_ns.subjects, "p1", stream=js_ns.stream))] == [1, 2, 3]
