"""The daemon end to end over a real nats-server with real fake-engine processes."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import FAKE, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.contract.messages import (
    EVENT_DECODER,
    MAX_PAYLOAD_BYTES,
    REPLY_DECODER,
    SCHEMA_VERSION,
    Accepted,
    Event,
    HealthChanged,
    HealthReport,
    LifecycleReply,
    NodeHeartbeat,
    PoolsReply,
    Rejected,
    StateChanged,
    StatusReply,
    encode,
)
from pool_managerd.contract.subjects import Subjects
from pool_managerd.core.fold import fold
from pool_managerd.runtime.daemon import Daemon
from support.daemon_wire import cid, follow, reached, ready_pool, req
from support.deadlines import until


async def test_preload_is_accepted_events_flow_and_the_pool_becomes_ready(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    events = await follow(nc_fresh)
    reply = await req(nc_fresh, "poold.cmd.chat.preload", {"command_id": "p-1"})
    assert isinstance(reply, Accepted)
    # The pool's first event is its ownership claim, written with the step that first uses it.
    assert (reply.command_id, reply.state, reply.seq, reply.last_seq) == ("p-1", "preloading", 1, 2)
    await events.wait(reached("chat", "ready"))
    assert [(c.src, c.dst) for c in events.state_changes("chat")] == [
        ("unready", "preloading"),
        ("preloading", "ready"),
    ]
    status = await req(nc_fresh, "poold.cmd.chat.status")
    assert isinstance(status, StatusReply)
    snap = status.pool
    assert snap.state == "ready" and snap.health_ready and snap.engine is not None
    assert snap.placement is not None and snap.placement.simulated
    # The KV snapshot follows (derived, written after the step).
    kv = await nc_fresh.jetstream().key_value("poold_pools")
    for _ in range(200):
        entry = await kv.get("chat")
        if b'"state":"ready"' in (entry.value or b""):
            break
        await asyncio.sleep(0.02)  # ok: the KV write is asynchronous and has no event to wait on
    assert b'"state":"ready"' in (entry.value or b"")


async def test_drain_with_and_without_a_lease(fresh_nats_server: NatsServer, start_daemon: StartDaemon,
                                             nc_fresh: NATS) -> None:  # fmt: skip
    await start_daemon(fresh_nats_server.url, pools=[{"id": "chat", **FAKE, "slots": 2}])
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events)
    # Without leases the drain completes at once.
    reply = await req(nc_fresh, "poold.cmd.chat.drain", {"command_id": cid()})
    assert isinstance(reply, Accepted) and reply.state == "unready"
    await ready_pool(nc_fresh, events)
    lease = await req(nc_fresh, "poold.cmd.chat.lease", {"command_id": cid(), "ttl_s": 30})
    assert isinstance(lease, Accepted) and lease.lease_id
    reply = await req(nc_fresh, "poold.cmd.chat.drain", {"command_id": cid(), "deadline_s": 30})
    assert isinstance(reply, Accepted) and reply.state == "draining"
    refused = await req(nc_fresh, "poold.cmd.chat.lease", {"command_id": cid()})
    assert isinstance(refused, Rejected) and refused.code == "draining"
    done = await req(nc_fresh, "poold.cmd.chat.release", {"command_id": cid(), "lease_id": lease.lease_id})
    assert isinstance(done, Accepted) and done.state == "unready"


async def test_reload_stop_and_reset_after_failed(fresh_nats_server: NatsServer, start_daemon: StartDaemon,
                                                  nc_fresh: NATS) -> None:  # fmt: skip
    crashy = {"id": "crashy", "engine": "fake", "extra_args": ["--load-time", "0.05", "--crash-after", "0.1"],
              "restart": {"initial_s": 0.01, "max_consecutive_failures": 2}}  # fmt: skip
    await start_daemon(fresh_nats_server.url, pools=[{"id": "chat", **FAKE}, crashy])
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events)
    first = (await req(nc_fresh, "poold.cmd.chat.status")).pool.engine.pid
    reply = await req(nc_fresh, "poold.cmd.chat.reload", {"command_id": cid(), "model": "chat-v2"})
    assert isinstance(reply, Accepted)
    await events.wait(lambda e: reached("chat", "ready")(e) and e.seq > reply.seq)
    snap = (await req(nc_fresh, "poold.cmd.chat.status")).pool
    assert snap.model == "chat-v2" and snap.engine is not None and snap.engine.pid != first
    stopped = await req(nc_fresh, "poold.cmd.chat.stop", {"command_id": cid()})
    assert isinstance(stopped, Accepted) and stopped.state == "unready"
    # A crash loop parks the pool in failed; reset acknowledges it.
    await req(nc_fresh, "poold.cmd.crashy.preload", {"command_id": cid()})
    await events.wait(reached("crashy", "failed"))
    reset = await req(nc_fresh, "poold.cmd.crashy.reset", {"command_id": cid()})
    assert isinstance(reset, Accepted) and reset.state == "unready"


async def test_retry_with_the_same_command_id_is_applied_once(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    events = await follow(nc_fresh)
    payload = json.dumps({"command_id": "same"}).encode()
    first = await nc_fresh.request("poold.cmd.chat.preload", payload, timeout=10)
    again = await nc_fresh.request("poold.cmd.chat.preload", payload, timeout=10)
    assert first.data == again.data
    await events.wait(reached("chat", "ready"))
    assert sum(1 for c in events.state_changes("chat") if c.trigger == "preload") == 1
    clash = await req(nc_fresh, "poold.cmd.chat.drain", {"command_id": "same"})
    assert isinstance(clash, Rejected) and clash.code == "command_id_conflict"
    assert (await req(nc_fresh, "poold.cmd.chat.status")).pool.state == "ready"


async def test_a_retry_is_the_same_command_when_it_decodes_the_same(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    events = await follow(nc_fresh)
    first = await nc_fresh.request("poold.cmd.chat.preload", b'{"type":"preload","command_id":"k1"}', timeout=10)
    # Another key order, another client's spacing, a default written out: the same command.
    for again in (b'{"command_id":"k1","type":"preload"}', b'{ "command_id" : "k1" }\n',
                  b'{"command_id":"k1","device_mask":null}'):  # fmt: skip
        retry = await nc_fresh.request("poold.cmd.chat.preload", again, timeout=10)
        assert retry.data == first.data, (again, retry.data)
    await events.wait(reached("chat", "ready"))
    assert sum(1 for c in events.state_changes("chat") if c.trigger == "preload") == 1
    # Another value of a field is another command.
    clash = await req(nc_fresh, "poold.cmd.chat.preload", {"command_id": "k1", "model": "other"})
    assert isinstance(clash, Rejected) and clash.code == "command_id_conflict", clash


async def test_events_a_command_causes_carry_its_id_and_traceparent_until_the_next_command(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    events = await follow(nc_fresh)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    reply = await req(nc_fresh, "poold.cmd.chat.preload", {"command_id": "pre-1"}, headers={"traceparent": trace})
    assert isinstance(reply, Accepted)
    await events.wait(reached("chat", "ready"))
    caused = [(e, h) for e, h in events.items if e.pool == "chat"]
    kinds = {e.type for e, _ in caused}
    assert {"engine_spawned", "state_changed", "health_changed"} <= kinds, kinds
    for event, headers in caused:
        assert (event.command_id, event.traceparent) == ("pre-1", trace), event
        assert headers.get("traceparent") == trace
    # Only the command's own step carries its fingerprint.
    assert [e.fingerprint is not None for e, _ in caused][:1] == [True]
    ready = next(e for e, _ in caused if isinstance(e.body, StateChanged) and e.body.dst == "ready")
    assert ready.fingerprint is None
    # The next command takes over.
    mark = len(events.items)
    stop = await req(nc_fresh, "poold.cmd.chat.stop", {"command_id": "stop-1"})
    assert isinstance(stop, Accepted)
    await events.wait(lambda e: e.pool == "chat" and e.type == "engine_exited")
    later = [e for e, _ in events.items[mark:] if e.pool == "chat"]
    assert later and all(e.command_id == "stop-1" and e.traceparent is None for e in later), later


async def test_illegal_transition_allows_only_verbs_a_client_may_send(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events)
    reply = await req(nc_fresh, "poold.cmd.chat.preload", {"command_id": cid()})
    assert isinstance(reply, Rejected) and reply.code == "illegal_transition", reply
    assert reply.allowed == ["drain", "reload", "stop", "lease", "release", "status"]
    for fact in ("engine_ready", "engine_exited", "health_lost", "internal_error"):
        assert fact not in reply.message
    assert "allowed: drain, reload, stop, lease, release, status" in reply.message


@pytest.mark.parametrize(
    ("subject", "payload", "code"),
    [
        ("poold.cmd.chat.drain", b'{"command_id": ', "bad_request"),
        ("poold.cmd.chat.drain", b'{"command_id": "x", "deadline_s": "soon"}', "bad_request"),
        ("poold.cmd.chat.launch", b'{"command_id": "x"}', "unknown_verb"),
        ("poold.cmd.nobody.status", b"", "unknown_pool"),
        ("poold.cmd.Not_Valid.status", b"", "invalid_id"),
        ("poold.cmd.chat.drain", b'{"command_id": "x"}', "illegal_transition"),
        ("poold.cmd.chat.preload", b'{"command_id": "x", "model": "' + b"m" * MAX_PAYLOAD_BYTES + b'"}',
         "payload_too_large"),
    ],
)  # fmt: skip
async def test_bad_input_gets_a_typed_rejection_and_changes_nothing(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS, subject: str, payload: bytes, code: str
) -> None:
    daemon = await start_daemon(fresh_nats_server.url)
    before = daemon.runtime.lifecycle.registry.snapshot("chat") if daemon.runtime else None
    reply = await req(nc_fresh, subject, payload)
    assert isinstance(reply, Rejected), reply
    assert reply.code == code
    assert "Error(" not in reply.message and "Traceback" not in reply.message  # never a repr
    after = (await req(nc_fresh, "poold.cmd.chat.status")).pool
    assert before is not None and after.state == before.state == "unready"
    if code == "illegal_transition":
        assert reply.allowed == ["preload", "status"] and reply.state == "unready"


async def test_a_second_daemon_configured_with_the_same_pool_is_fenced(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url, node="node-a")
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events)
    b = await start_daemon(fresh_nats_server.url, node="node-b")
    assert "chat" in b.fenced and b.runtime is not None and "chat" not in b.runtime.actors
    pools = await req(nc_fresh, "poold.node.node-b.cmd.pools")
    assert isinstance(pools, PoolsReply) and pools.pools == []
    # Commands still reach the owner only.
    status = await req(nc_fresh, "poold.cmd.chat.status")
    assert status.pool.node == "node-a" and status.pool.state == "ready"


async def test_the_server_refuses_a_stale_writer(fresh_nats_server: NatsServer, start_daemon: StartDaemon,
                                                 nc_fresh: NATS) -> None:  # fmt: skip
    # The log's second fence, behind the lease: node-a is made to ignore its lease (its keeper
    # neither renews nor stops it, as a buggy or partitioned owner might), so node-b claims the
    # pool once the lease lapses; node-a's next write carries a stale expected sequence and the
    # server refuses it.
    ownership = {"lease_ttl_s": 1.0, "lease_margin_s": 0.2}
    a = await start_daemon(fresh_nats_server.url, node="node-a", ownership=ownership)
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events)
    assert a.ownership is not None and a.runtime is not None
    await a.ownership.close()
    held = a.ownership.held["chat"]
    a.ownership.serving = lambda pool: True  # type: ignore[method-assign]
    b = await start_daemon(fresh_nats_server.url, node="node-b", ownership=ownership)
    claimed = await events.wait(lambda e: e.pool == "chat" and e.type == "pool_claimed" and e.node == "node-b",
                                timeout=10)  # fmt: skip
    assert claimed.epoch == held.epoch + 1
    await a.runtime.command("chat", msgspec.convert({"command_id": cid(), "type": "drain"}, _drain()))
    for _ in range(200):
        if "chat" in a.fenced:
            break
        await asyncio.sleep(0.02)  # ok: the refusal arrives with the PubAck, asynchronously
    assert "chat" in a.fenced and "another writer" in a.fenced["chat"], a.fenced
    refused = await a.runtime.command("chat", msgspec.convert({"command_id": cid(), "type": "stop"}, _stop()))
    assert isinstance(refused, Rejected) and refused.code == "fenced"
    # node-a stood down: its engine is stopped outside the lifecycle and nothing more is written.
    for _ in range(300):
        if not a.runtime.actors["chat"].engines:
            break
        await asyncio.sleep(0.02)  # ok: the stop runs in the stand-down task, no event to wait on
    assert not a.runtime.actors["chat"].engines
    assert b.runtime is not None and "chat" in b.runtime.actors


def _preload() -> type:
    from pool_managerd.contract.messages import PreloadCmd

    return PreloadCmd


def _drain() -> type:
    from pool_managerd.contract.messages import DrainCmd

    return DrainCmd


def _stop() -> type:
    from pool_managerd.contract.messages import StopCmd

    return StopCmd


async def test_discovery_lists_the_endpoints(fresh_nats_server: NatsServer, start_daemon: StartDaemon,
                                             nc_fresh: NATS) -> None:  # fmt: skip
    await start_daemon(fresh_nats_server.url)
    info = json.loads((await nc_fresh.request("$SRV.INFO.pool-managerd", b"", timeout=5)).data)
    subjects = {ep["subject"] for ep in info["endpoints"]}
    assert subjects == {"poold.cmd.*.*", "poold.node.node-a.cmd.*"}  # one endpoint for all pools, one for the node
    ping = json.loads((await nc_fresh.request("$SRV.PING.pool-managerd", b"", timeout=5)).data)
    assert ping["name"] == "pool-managerd"
    table = await req(nc_fresh, "poold.node.node-a.cmd.lifecycle")
    assert isinstance(table, LifecycleReply) and "ready" in table.states


async def test_external_health_reports_are_validated_and_foreign_ones_counted(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    daemon = await start_daemon(fresh_nats_server.url)
    await nc_fresh.publish("poold.health.elsewhere", encode(HealthReport(pool="elsewhere", ts=1.0, ok=True)))
    await nc_fresh.publish("poold.health.chat", b"not json")
    await nc_fresh.flush()
    for _ in range(200):
        if daemon.metrics.health_ignored._value.get() >= 2:
            break
        await asyncio.sleep(0.01)  # ok: counted by a subscription callback, no event to wait on
    assert daemon.metrics.health_ignored._value.get() >= 2
    assert (await req(nc_fresh, "poold.cmd.chat.status")).pool.state == "unready"


async def _ignored_reach(daemon: Daemon, count: float) -> None:
    for _ in range(500):
        if daemon.metrics.health_ignored._value.get() >= count:
            return
        await asyncio.sleep(0.01)  # ok: counted by a subscription callback, no event to wait on
    raise AssertionError(f"only {daemon.metrics.health_ignored._value.get()} of {count} reports counted")


async def test_forged_health_changes_nothing_unless_a_pool_opts_in(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    slow = {**FAKE, "extra_args": ["--load-time", "60"]}
    pools = [{"id": "chat", **FAKE}, {"id": "slow", **slow}, {"id": "open", **FAKE, "external_health": True}]
    daemon = await start_daemon(fresh_nats_server.url, pools=pools)
    events = await follow(nc_fresh)
    for pool in ("chat", "slow", "open"):
        assert isinstance(await req(nc_fresh, f"poold.cmd.{pool}.preload", {"command_id": cid()}), Accepted)
    await events.wait(reached("chat", "ready"))
    await events.wait(reached("open", "ready"))
    await events.wait(reached("slow", "preloading"))
    chat_pid = (await req(nc_fresh, "poold.cmd.chat.status")).pool.engine.pid

    # A loading pool is never made ready from outside, and a ready pool never restarted by default.
    base = daemon.metrics.health_ignored._value.get()
    for i in range(5):
        await nc_fresh.publish("poold.health.slow", encode(HealthReport(pool="slow", ts=float(i), ok=True)))
    for i in range(12):
        await nc_fresh.publish("poold.health.chat", encode(HealthReport(pool="chat", ts=float(i), ok=False)))
    # An opted-in pool still never takes readiness from outside.
    await nc_fresh.publish("poold.health.open", encode(HealthReport(pool="open", ts=1.0, ok=True)))
    await nc_fresh.flush()
    await _ignored_reach(daemon, base + 18)
    slow_now = (await req(nc_fresh, "poold.cmd.slow.status")).pool
    chat_now = (await req(nc_fresh, "poold.cmd.chat.status")).pool
    assert slow_now.state == "preloading"
    assert chat_now.state == "ready" and chat_now.engine.pid == chat_pid and chat_now.restarts == 0

    # Where a pool opts in, outside failures count toward health_lost like failed probes.
    for i in range(3):
        await nc_fresh.publish("poold.health.open", encode(HealthReport(pool="open", ts=float(i), ok=False)))
    await nc_fresh.flush()
    lost = await events.wait(lambda e: e.pool == "open" and isinstance(e.body, StateChanged)
                             and e.body.trigger == "health_lost")  # fmt: skip
    assert lost.body.src == "ready"


async def test_traceparent_travels_from_command_to_events_and_metrics_are_served(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    daemon = await start_daemon(fresh_nats_server.url, metrics_addr="127.0.0.1:0")
    events = await follow(nc_fresh)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    reply = await req(nc_fresh, "poold.cmd.chat.preload", {"command_id": cid()}, headers={"traceparent": trace})
    assert isinstance(reply, Accepted)
    event = await events.wait(reached("chat", "preloading"))
    assert event.traceparent == trace
    headers = next(h for e, h in events.items if e is event)
    assert headers.get("traceparent") == trace
    await events.wait(reached("chat", "ready"))
    server = daemon.metrics._server
    host, port = server.server_address[:2]
    scraped: list[str] = []

    async def shows_ready() -> bool:
        # Metrics are derived after the step's acks: the ready event may be on the wire a moment
        # before the gauge moves.
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
        )
        scraped.append(body.decode())
        return 'poold_pool_state{pool="chat",state="ready"} 1.0' in scraped[-1]

    await until(shows_ready, "the pool-state gauge to say ready")
    assert "poold_transitions_total" in scraped[-1]


@pytest.fixture
async def nc_fresh(fresh_nats_server: NatsServer, nats_connect: Any) -> NATS:
    client: NATS = await nats_connect(fresh_nats_server.url)
    return client


async def test_two_daemons_on_a_fresh_pool_only_one_holds_and_serves_it(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    # The pool has no events yet. Only one daemon wins its ownership lease (compare-and-set on
    # the record); the other never serves it, so no status read is answered by both.
    events = await follow(nc_fresh)
    a = await start_daemon(fresh_nats_server.url, node="node-a")
    b = await start_daemon(fresh_nats_server.url, node="node-b")
    assert a.runtime is not None and b.runtime is not None
    assert "chat" in a.runtime.actors and "chat" not in b.runtime.actors
    assert "chat" in b.fenced and "node-a" in b.fenced["chat"]
    replies: list[Msg] = []
    inbox = nc_fresh.new_inbox()

    async def on_reply(msg: Msg) -> None:
        replies.append(msg)

    sub = await nc_fresh.subscribe(inbox, cb=on_reply)
    for _ in range(30):
        await nc_fresh.publish("poold.cmd.chat.status", b"", reply=inbox)
    await nc_fresh.flush()
    for _ in range(200):
        if len(replies) >= 30:
            break
        await asyncio.sleep(0.02)  # ok: replies to fire-and-forget requests; a second one would also come here
    await nc_fresh.flush()
    await sub.unsubscribe()
    nodes = [_node_of(r.data) for r in replies]
    assert nodes == ["node-a"] * 30, nodes
    first = await a.runtime.command("chat", msgspec.convert({"command_id": cid(), "type": "preload"}, _preload()))
    assert isinstance(first, Accepted)
    await events.wait(reached("chat", "ready"))
    claims = [(e.node, e.epoch) for e, _ in events.items if e.pool == "chat" and e.type == "pool_claimed"]
    assert claims == [("node-a", 1)]
    spawners = {e.node for e, _ in events.items if e.pool == "chat" and e.type == "engine_spawned"}
    assert spawners == {"node-a"}


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_export_then_offline_replay_matches_the_live_replay(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS, tmp_path: Path
) -> None:
    await start_daemon(fresh_nats_server.url, pools=[{"id": "chat", **FAKE}, {"id": "embed", **FAKE}])
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events, "chat")
    await ready_pool(nc_fresh, events, "embed")
    await req(nc_fresh, "poold.cmd.embed.stop", {"command_id": cid()})
    url = fresh_nats_server.url
    out = tmp_path / "events.jsonl"
    rc, _, err = await _cli("export", "--url", url, "--out", str(out))
    assert rc == 0, err
    lines = out.read_text().splitlines()
    assert lines and all(json.loads(line)["v"] == 1 for line in lines)
    rc, live, err = await _cli("replay", "--url", url, "--json")
    assert rc == 0, err
    rc, offline, err = await _cli("replay", "--file", str(out), "--json")
    assert rc == 0, err
    assert json.loads(offline)["pools"] == json.loads(live)["pools"]
    assert json.loads(offline)["pools"]["embed"]["state"] == "unready"
    assert json.loads(offline)["pools"]["chat"]["state"] == "ready"
    rc, only_chat, _ = await _cli("export", "--url", url, "--out", "-", "--pool", "chat")
    assert rc == 0 and {json.loads(line)["pool"] for line in only_chat.splitlines()} == {"chat"}


async def test_node_events_never_restart_at_one_when_their_last_message_is_foreign(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    from pool_managerd.adapters.eventlog.stream import ensure_stream

    js = nc_fresh.jetstream()
    await ensure_stream(js, Subjects())
    for _ in range(3):
        await js.publish("poold.node.node-a.evt.daemon_stopping", b"{}")
    junk = await js.publish("poold.node.node-a.evt.heartbeat", b"not an event")
    # A foreign message does not keep the daemon from starting: its node events continue past
    # every sequence the stream holds, so no Msg-Id can repeat one it wrote before.
    daemon = await start_daemon(fresh_nats_server.url)
    started = await js.get_last_msg("POOLD_EVENTS", "poold.node.node-a.evt.daemon_started")
    event = EVENT_DECODER.decode(started.data)
    assert event.seq > junk.seq and daemon.node_events.seq >= event.seq


async def test_probe_results_reach_the_pool_directly_and_observers_see_changes_only(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    # Probes every 20 ms: the pool gets every result without NATS; observers see the first
    # outcomes and then nothing until the outcome changes or health_publish_s passes.
    shown: list[HealthReport] = []

    async def on_health(msg: Msg) -> None:
        shown.append(msgspec.json.decode(msg.data, type=HealthReport))

    await nc_fresh.subscribe("poold.health.chat", cb=on_health)
    puts: list[bytes] = []

    async def on_put(msg: Msg) -> None:
        puts.append(msg.data)

    await nc_fresh.subscribe("$KV.*.chat", cb=on_put)

    events = await follow(nc_fresh)
    daemon = await start_daemon(fresh_nats_server.url, pools=[{"id": "chat", **FAKE, "probe_interval_s": 0.02}],
                                health_publish_s=300.0)  # fmt: skip
    await ready_pool(nc_fresh, events)
    assert daemon.runtime is not None
    actor = daemon.runtime.actors["chat"]
    (engine,) = actor.engines.values()
    prober = engine.prober
    assert prober is not None
    async with asyncio.timeout(20):
        # Until the ready snapshot is written (the put is acked, so it reached us before the
        # flush's PONG): from then on only healthy probes happen.
        while True:
            written = daemon.kv.written.get("chat")
            if written is not None and b'"health_ready":true' in written.full and "chat" not in daemon.kv.dirty:
                break
            await asyncio.sleep(0.02)  # ok: the KV writer announces nothing
    await nc_fresh.flush()
    start, puts_before = prober.probes, len(puts)
    async with asyncio.timeout(20):
        while prober.probes < start + 50:
            await asyncio.sleep(0.05)  # ok: probes are counted, not announced
    await nc_fresh.flush()
    # Healthy probes change nothing a reader shows: no snapshot of their own (at most the probe
    # bookkeeping's refresh, every 5 s, should a slow machine take that long for 50 probes).
    assert len(puts) - puts_before <= 1, f"{len(puts) - puts_before} KV puts for 50 healthy probes"
    oks = [r for r in shown if r.ok]
    assert len(oks) == 1, f"{len(oks)} healthy reports shown for {prober.probes} probes"
    assert all(not r.ok for r in shown[: shown.index(oks[0])])
    # The pool saw the later probes all the same.
    seen = daemon.runtime.lifecycle.registry.get("chat").health.last_report_at
    assert seen is not None and seen > oks[0].ts
    assert (await req(nc_fresh, "poold.cmd.chat.status")).pool.state == "ready"


async def test_a_node_with_many_pools_pages_its_pools_and_keeps_discovery_small(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    from pool_managerd.client import PoolClient
    from pool_managerd.contract.messages import POOLS_PAGE_MAX

    count = POOLS_PAGE_MAX * 2 + 50
    names = [f"p{i:04d}" for i in range(count)]
    await start_daemon(fresh_nats_server.url, pools=[{"id": n, **FAKE} for n in names])
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        body = {} if after is None else {"after": after}
        msg = await nc_fresh.request("poold.node.node-a.cmd.pools", json.dumps(body).encode(), timeout=10)
        assert len(msg.data) <= nc_fresh.max_payload
        page = REPLY_DECODER.decode(msg.data)
        assert isinstance(page, PoolsReply) and page.total == count, page
        assert len(page.pools) <= POOLS_PAGE_MAX
        seen += [s.pool for s in page.pools]
        pages += 1
        if page.next is None:
            break
        after = page.next
    assert seen == names and pages == 3
    merged = await PoolClient(nc_fresh, timeout=10).node("node-a", "pools")
    assert isinstance(merged, PoolsReply) and [s.pool for s in merged.pools] == names
    bad = await req(nc_fresh, "poold.node.node-a.cmd.pools", {"limit": POOLS_PAGE_MAX + 1})
    assert isinstance(bad, Rejected) and bad.code == "bad_request", bad

    # One endpoint for every pool of the node: discovery does not grow with the pool count.
    info = await nc_fresh.request("$SRV.INFO.pool-managerd", b"", timeout=5)
    stats = await nc_fresh.request("$SRV.STATS.pool-managerd", b"", timeout=5)
    assert len(json.loads(info.data)["endpoints"]) == 2
    assert len(info.data) < 4096 and len(stats.data) < 4096, (len(info.data), len(stats.data))
    # Commands still reach each pool, and unknown pools are still answered.
    assert (await req(nc_fresh, f"poold.cmd.{names[-1]}.status")).pool.pool == names[-1]
    unknown = await req(nc_fresh, "poold.cmd.nope.status")
    assert isinstance(unknown, Rejected) and unknown.code == "unknown_pool", unknown


def _node_of(data: bytes) -> str:
    """The node a status reply came from (or the code of a rejection)."""
    reply = msgspec.json.decode(data)
    if reply.get("type") == "status":
        return str(reply["pool"]["node"])
    return f"{reply.get('type')}:{reply.get('code')}"


async def test_a_forged_event_and_heartbeat_never_give_the_pool_away(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    # Ownership comes from the lease record alone: a well-formed event "written" by a made-up
    # node, and that node's fresh heartbeat, leave the pool with its owner across a restart,
    # and replay reports the forged write as one made without the lease.
    a = await start_daemon(fresh_nats_server.url, node="node-a")
    events = await follow(nc_fresh)
    await ready_pool(nc_fresh, events)
    last = (await req(nc_fresh, "poold.cmd.chat.status")).pool.seq
    js = nc_fresh.jetstream()
    forged = Event(v=SCHEMA_VERSION, seq=last + 1, ts=0.0, node="evil", pool="chat", epoch=99,
                   body=HealthChanged(live=True, ready=True))  # fmt: skip
    await js.publish("poold.evt.chat.health_changed", encode(forged))
    heartbeat = NodeHeartbeat(gpus=8, memory_total=1, memory_free=1, simulated=False, period_s=3600.0)
    beat = Event(v=SCHEMA_VERSION, seq=1, ts=0.0, node="evil", body=heartbeat)
    await js.publish("poold.node.evil.evt.heartbeat", encode(beat))
    await a.stop()
    again = await start_daemon(fresh_nats_server.url, node="node-a")
    assert again.runtime is not None and "chat" in again.runtime.actors and "chat" not in again.fenced
    status = await req(nc_fresh, "poold.cmd.chat.status")
    assert isinstance(status, StatusReply) and status.pool.node == "node-a"

    history = fold([event async for _, event in read_events(nc_fresh, Subjects(), pool="chat")])
    assert [(v.code, v.seq) for v in history.violations if "evil" in v.message] == [("two_writers", last + 1)]


async def test_an_unknown_pool_is_answered_once_by_a_fleet_and_a_standby_pool_by_its_owner_only(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url, node="node-a")
    await start_daemon(fresh_nats_server.url, node="node-b")
    for subject, want in (("poold.cmd.nobody.status", "rejected:unknown_pool"), ("poold.cmd.chat.status", "node-a")):
        replies: list[Msg] = []
        inbox = nc_fresh.new_inbox()

        async def on_reply(msg: Msg, into: list[Msg] = replies) -> None:
            into.append(msg)

        sub = await nc_fresh.subscribe(inbox, cb=on_reply)
        for _ in range(10):
            await nc_fresh.publish(subject, b"", reply=inbox)
        await nc_fresh.flush()
        for _ in range(200):
            if len(replies) >= 10:
                break
            await asyncio.sleep(0.02)  # ok: counting fire-and-forget replies
        await asyncio.sleep(0.2)  # ok: room for a second node's duplicate answer to arrive
        await sub.unsubscribe()
        assert [_node_of(r.data) for r in replies] == [want] * 10, subject
