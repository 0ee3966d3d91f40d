"""The published contract (schemas/ and the README) against the daemon, over a real nats-server.

Each test drives a real daemon with real fake-engine processes and checks what a client that
knows only ``schemas/`` would see: every reply is one its channel declares, state-bearing fields
are always there, rejections follow the nats micro error convention, and KV snapshots are written
when something a reader shows changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import FAKE, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.contract.messages import REJECT_STATUS
from pool_managerd.runtime import daemon as daemon_module
from pool_managerd.runtime.daemon import Daemon
from support.contract import README, Example, channel_of, matching_reply, message_schema, parse
from support.deadlines import until

# --- the daemon ---------------------------------------------------------------------------------


@pytest.fixture
async def client(fresh_nats_server: NatsServer, nats_connect: Any) -> NATS:
    nc: NATS = await nats_connect(fresh_nats_server.url)
    return nc


async def raw_req(nc: NATS, subject: str, payload: dict[str, Any] | bytes | None = None) -> Msg:
    data = payload if isinstance(payload, bytes) else (json.dumps(payload).encode() if payload is not None else b"")
    return await nc.request(subject, data, timeout=10)


async def req(nc: NATS, subject: str, payload: dict[str, Any] | bytes | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads((await raw_req(nc, subject, payload)).data)
    return reply


def cid() -> str:
    return uuid.uuid4().hex


async def state_is(nc: NATS, pool: str, state: str) -> bool:
    return bool((await req(nc, f"poold.cmd.{pool}.status"))["pool"]["state"] == state)


# --- a client may send as soon as start() returns ---------------------------------------------


async def test_start_returns_after_a_ping_that_follows_every_subscription(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What start() promises (a request sent right after meets the pool's endpoint) holds only if
    # the server has answered a PING written after the endpoints' SUBs. nats-py writes PINGs
    # straight to the socket and SUBs through its flusher task, so the order is checked on the
    # daemon's own wire bytes, deterministically.
    wire: list[bytes] = []
    connect = Daemon._connect

    async def recording_connect(self: Daemon, urls: list[str]) -> NATS:
        nc = await connect(self, urls)
        transport: Any = nc._transport
        write, writelines = transport.write, transport.writelines

        def record(data: bytes) -> None:
            wire.append(bytes(data))
            write(data)

        def record_lines(lines: list[bytes]) -> None:
            wire.extend(bytes(line) for line in lines)
            writelines(lines)

        transport.write, transport.writelines = record, record_lines
        return nc

    monkeypatch.setattr(Daemon, "_connect", recording_connect)
    await start_daemon(fresh_nats_server.url)
    sent = list(wire)
    # The node's one endpoint for every pool (queue group poold-pools-<node>), not the catch-all.
    subs = [i for i, data in enumerate(sent) if data.startswith(b"SUB poold.cmd.*.* poold-pools-")]
    pings = [i for i, data in enumerate(sent) if data.startswith(b"PING")]
    assert subs, sent
    assert pings and max(pings) > max(subs), "start() returned before a PING that follows the endpoint's SUB"


@pytest.mark.parametrize("flush", ["shielded", "bare"])
async def test_a_flush_cancelled_in_flight_leaves_the_connection_working(
    nats_server: NatsServer, nats_connect: Any, flush: str
) -> None:
    # A stop during start-up cancels start() wherever it is, the final flushes included. The
    # daemon's flush must leave the connection reading; nats-py's own, cancelled while its PING is
    # out, does not (its PONG then raises in the read loop) -- shown here so the guard stays needed.
    nc: NATS = await nats_connect(nats_server.url, max_reconnect_attempts=0, allow_reconnect=False)
    subject = f"t{uuid.uuid4().hex}.echo"

    async def echo(msg: Msg) -> None:
        await msg.respond(b"pong")

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    task = asyncio.ensure_future(daemon_module.flush_through_cancel(nc) if flush == "shielded" else nc.flush())
    await asyncio.sleep(0)  # ok: one loop turn puts the PING on the wire, the PONG not yet read
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        reply = await nc.request(subject, b"", timeout=3)
        working = reply.data == b"pong"
    except Exception:
        working = False
    assert working == (flush == "shielded")


# --- every reply a subject produces is declared on its channel -----------------------------------


async def test_every_reply_the_daemon_sends_is_declared_on_its_channel(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    seen: set[tuple[str, str]] = set()

    async def ask(subject: str, payload: dict[str, Any] | bytes | None = None) -> dict[str, Any]:
        reply = await req(client, subject, payload)
        seen.add((channel_of(subject), matching_reply(subject, reply)))
        return reply

    malformed = b'{"command_id": '
    for verb in ("preload", "drain", "reload", "stop", "reset", "lease", "release", "status"):
        assert (await ask(f"poold.cmd.chat.{verb}", malformed))["code"] == "bad_request"
    assert (await ask("poold.cmd.chat.status"))["type"] == "status"
    assert (await ask("poold.cmd.chat.drain", {"command_id": cid()}))["code"] == "illegal_transition"
    assert (await ask("poold.cmd.chat.preload", {"type": "preload", "command_id": cid()}))["type"] == "accepted"
    await until(lambda: state_is(client, "chat", "ready"), "chat ready")
    lease = await ask("poold.cmd.chat.lease", {"command_id": cid(), "ttl_s": 30})
    assert lease["type"] == "accepted"
    assert (await ask("poold.cmd.chat.lease", {"command_id": cid()}))["code"] == "no_slots"
    assert (await ask("poold.cmd.chat.release", {"command_id": cid(), "lease_id": lease["lease_id"]}))["type"] == (
        "accepted"
    )
    assert (await ask("poold.cmd.chat.release", {"command_id": cid(), "lease_id": "gone"}))["code"] == "unknown_lease"
    assert (await ask("poold.cmd.chat.reset", {"command_id": cid()}))["code"] == "illegal_transition"
    assert (await ask("poold.cmd.chat.reload", {"command_id": cid()}))["type"] == "accepted"
    await until(lambda: state_is(client, "chat", "ready"), "chat ready after the reload")
    assert (await ask("poold.cmd.chat.drain", {"command_id": cid(), "deadline_s": 5}))["type"] == "accepted"
    await until(lambda: state_is(client, "chat", "unready"), "chat drained")
    assert (await ask("poold.cmd.chat.preload", {"command_id": cid()}))["type"] == "accepted"
    assert (await ask("poold.cmd.chat.stop", {"command_id": cid()}))["type"] == "accepted"
    # The catch-all answers for pools no daemon serves, on the same channels.
    assert (await ask("poold.cmd.nobody.status"))["code"] == "unknown_pool"
    assert (await ask("poold.cmd.nobody.preload", {"command_id": cid()}))["code"] == "unknown_pool"
    for verb in ("pools", "inventory", "lifecycle"):
        assert (await ask(f"poold.node.node-a.cmd.{verb}", {}))["type"] == verb
        assert (await ask(f"poold.node.node-a.cmd.{verb}", malformed))["code"] == "bad_request"

    kinds = {kind for _, kind in seen}
    assert kinds == {"accepted", "rejected", "status_reply", "pools_reply", "inventory_reply", "lifecycle_reply"}
    assert ("node_cmd_pools", "rejected") in seen and ("cmd_status", "rejected") in seen


# --- state-bearing fields are always present -----------------------------------------------------


STATE_FIELDS = ("state", "seq", "health_live", "health_ready", "draining", "slots_total", "slots_free",
                "active_leases", "leases", "restarts", "crashes")  # fmt: skip


async def kv_value(client: NATS, pool: str) -> dict[str, Any] | None:
    kv = await client.jetstream().key_value("poold_pools")
    try:
        entry = await kv.get(pool)
    except Exception:
        return None
    value: dict[str, Any] = json.loads(entry.value or b"null")
    return value


async def test_state_bearing_fields_are_present_at_their_defaults(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    status = await req(client, "poold.cmd.chat.status")
    message_schema("reply.status").validate(status)
    unready = status["pool"]
    assert unready["state"] == "unready" and unready["seq"] == 0 and unready["slots_free"] == 1
    assert all(field in unready for field in STATE_FIELDS)
    pools = await req(client, "poold.node.node-a.cmd.pools", {})
    message_schema("reply.pools").validate(pools)
    assert pools["pools"][0]["state"] == "unready"

    async def kv_says(**want: Any) -> bool:
        value = await kv_value(client, "chat")
        return value is not None and all(value.get(k) == v for k, v in want.items())

    await until(lambda: kv_says(state="unready"), "the KV snapshot of the unready pool")
    value = await kv_value(client, "chat")
    assert value is not None
    message_schema("pool_snapshot").validate(value)
    assert all(field in value for field in STATE_FIELDS)

    accepted = await req(client, "poold.cmd.chat.preload", {"command_id": cid()})
    message_schema("reply.accepted").validate(accepted)
    assert accepted["last_seq"] >= accepted["seq"] == 1 and "lease_id" in accepted
    await until(lambda: state_is(client, "chat", "ready"), "chat ready")
    lease = await req(client, "poold.cmd.chat.lease", {"command_id": cid()})
    assert lease["type"] == "accepted"
    full = (await req(client, "poold.cmd.chat.status"))["pool"]
    assert (full["slots_free"], full["active_leases"]) == (0, 1)
    await until(lambda: kv_says(slots_free=0, active_leases=1), "the KV snapshot of the fully leased pool")
    # A change right after a write waits out the coalescing window, and is still written.
    release = await req(client, "poold.cmd.chat.release", {"command_id": cid(), "lease_id": lease["lease_id"]})
    assert release["type"] == "accepted"
    await until(lambda: kv_says(slots_free=1, active_leases=0, leases=[]), "the KV snapshot after the release")


# --- rejections follow the nats micro error convention -------------------------------------------


async def endpoint_stats(client: NATS) -> dict[str, dict[str, Any]]:
    msg = await client.request("$SRV.STATS.pool-managerd", b"", timeout=5)
    stats = json.loads(msg.data)
    return {ep["name"]: ep for ep in stats["endpoints"]}


async def test_rejections_carry_micro_error_headers_and_count_in_srv_stats(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    await start_daemon(fresh_nats_server.url)
    before = await endpoint_stats(client)
    assert before["pools-node-a"]["num_errors"] == 0

    sent = [
        ("poold.cmd.chat.drain", {"command_id": cid()}, "illegal_transition"),
        ("poold.cmd.chat.drain", {"command_id": cid()}, "illegal_transition"),
        ("poold.cmd.chat.lease", {"command_id": cid(), "ttl_s": -1}, "bad_request"),
        ("poold.cmd.chat.launch", {"command_id": cid()}, "unknown_verb"),
        ("poold.cmd.chat.preload", {"type": "drain", "command_id": cid()}, "bad_request"),  # type must be the verb
        ("poold.cmd.chat.release", {"command_id": cid(), "lease_id": "nope"}, "unknown_lease"),
        ("poold.cmd.chat.status", b"[", "bad_request"),
    ]
    for subject, payload, code in sent:
        msg = await raw_req(client, subject, payload)
        body = json.loads(msg.data)
        assert (body["type"], body["code"]) == ("rejected", code), body
        headers = msg.headers or {}
        assert headers.get("Nats-Service-Error-Code") == REJECT_STATUS[code], (code, headers)
        assert headers.get("Nats-Service-Error") == body["message"][:256]
    node = await raw_req(client, "poold.node.node-a.cmd.pools", b"{")
    assert (node.headers or {}).get("Nats-Service-Error-Code") == "400"
    unclaimed = await raw_req(client, "poold.cmd.nobody.status")
    assert (unclaimed.headers or {}).get("Nats-Service-Error-Code") == REJECT_STATUS["unknown_pool"]

    ok = await raw_req(client, "poold.cmd.chat.status")
    assert "Nats-Service-Error" not in (ok.headers or {})
    ok = await raw_req(client, "poold.cmd.chat.preload", {"command_id": cid()})
    assert json.loads(ok.data)["type"] == "accepted" and "Nats-Service-Error" not in (ok.headers or {})

    after = await endpoint_stats(client)
    assert after["pools-node-a"]["num_errors"] == len(sent)
    assert after["pools-node-a"]["num_requests"] >= len(sent) + 2
    assert after["pools-node-a"]["last_error"].startswith("400:")  # the last rejection: a bad status body
    assert after["node-node-a"]["num_errors"] == 1


# --- KV snapshots: written when what a reader shows changes --------------------------------------


def test_kv_due_coalesces_and_lets_probe_bookkeeping_wait() -> None:
    from pool_managerd.contract.messages import PoolSnapshot

    def snap(**kw: Any) -> PoolSnapshot:
        return PoolSnapshot(pool="p", **kw)

    written = daemon_module._Written
    due = daemon_module._kv_due
    first = written.of(snap(seq=1), 10.0)
    assert due(None, first) == 10.0
    assert due(first, written.of(snap(seq=1), 11.0)) is None  # nothing changed
    assert due(first, written.of(snap(seq=2), 10.01)) == pytest.approx(10.0 + daemon_module.KV_COALESCE_S)
    assert due(first, written.of(snap(seq=2), 12.0)) == 12.0
    probe_only = written.of(snap(seq=1, last_heartbeat=11.0, perf_hints={"probe_latency_ms": 1.0}), 11.0)
    assert due(first, probe_only) == pytest.approx(10.0 + daemon_module.KV_PROBE_REFRESH_S)


async def test_a_loading_engine_probed_many_times_writes_few_kv_snapshots(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    slow = {**FAKE, "extra_args": ["--load-time", "inf"]}
    daemon = await start_daemon(fresh_nats_server.url, pools=[{"id": "chat", **slow}])
    await until(lambda: kv_state(client, "unready"), "the first snapshot")
    puts: list[dict[str, Any]] = []
    events: list[str] = []

    async def on_put(msg: Msg) -> None:
        puts.append(json.loads(msg.data))

    async def on_event(msg: Msg) -> None:
        events.append(msg.subject)

    await client.subscribe("$KV.poold_pools.chat", cb=on_put)
    await client.subscribe("poold.evt.chat.>", cb=on_event)
    await client.flush()

    assert (await req(client, "poold.cmd.chat.preload", {"command_id": cid()}))["type"] == "accepted"

    async def probed(count: int) -> bool:
        # The prober feeds the pool directly (observers see only changes), so count at the prober.
        actor = daemon.runtime.actors["chat"] if daemon.runtime is not None else None
        return actor is not None and any(e.prober is not None and e.prober.probes >= count
                                         for e in actor.engines.values())  # fmt: skip

    await until(lambda: probed(40), "40 probes of an engine that is still loading")
    assert daemon.runtime is not None
    counted = max(e.prober.probes for e in daemon.runtime.actors["chat"].engines.values() if e.prober)
    engine = (await req(client, "poold.cmd.chat.status"))["pool"]["engine"]
    os.kill(engine["pid"], signal.SIGUSR1)  # the fake engine's "loading done"
    await until(lambda: kv_state(client, "ready"), "the ready snapshot in KV")
    await client.flush()

    assert counted >= 40
    # Every write showed something new; the probes of the loading engine wrote nothing by themselves
    # (at most a probe-bookkeeping refresh every KV_PROBE_REFRESH_S, should a slow machine take that long).
    assert 2 <= len(puts) <= len(events) + 2, (len(puts), len(events), counted)
    assert puts[-1]["state"] == "ready" and puts[-1]["seq"] == len(events)


async def kv_state(client: NATS, state: str) -> bool:
    value = await kv_value(client, "chat")
    return value is not None and value.get("state") == state


# --- the README's requests get the replies it shows ----------------------------------------------

README_REQUESTS = [e for e in parse(README.read_text(encoding="utf-8"))[0] if e.kind == "request"]


def _same(shown: Any, got: Any, where: str = "$") -> list[str]:
    if isinstance(shown, dict) and isinstance(got, dict):
        diffs = [f"{where}: keys {sorted(set(shown) ^ set(got))}"] if set(shown) != set(got) else []
        for key in set(shown) & set(got):
            diffs += _same(shown[key], got[key], f"{where}.{key}")
        return diffs
    return [] if shown == got else [f"{where}: README {shown!r}, daemon {got!r}"]


@pytest.mark.parametrize("example", README_REQUESTS, ids=str)
async def test_every_readme_request_gets_the_reply_shown(
    example: Example, fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    # As the README says: an unready pool "chat" with one slot on node "node-1".
    await start_daemon(fresh_nats_server.url, node="node-1", pools=[{"id": "chat", "slots": 1, **FAKE}])
    assert example.body is not None
    got = await req(client, example.subject, example.body.encode())
    assert not _same(example.shown, got), f"{example}: " + "; ".join(_same(example.shown, got))
