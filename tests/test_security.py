"""Hostile input through a real nats-server against a real daemon and real fake engines.

Each test is one probe that once worked against the daemon: code execution through a reload's
argv, forged health reports delaying or faking readiness, JSON nested past the decoder's
recursion, oversize fields pushing ``status`` past NATS's payload limit, unbounded lease TTLs
and leases anyone could renew or release. Each asserts that the probe now gets a typed
rejection (or is ignored) and changes nothing. Permissions of the shipped server configuration
are tested in ``test_permissions.py``; the fuzz of every subject is ``test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from conftest import FAKE, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.contract import limits
from pool_managerd.contract.messages import LeaseInfo, PoolSnapshot, StatusReply, encode
from pool_managerd.runtime.commands import ERROR_HEADER
from pool_managerd.runtime.daemon import Daemon
from pool_managerd.testing.wire_fuzz import UP


@pytest.fixture
async def client(fresh_nats_server: NatsServer, nats_connect: Any) -> NATS:
    nc: NATS = await nats_connect(fresh_nats_server.url)
    return nc


def cid() -> str:
    return uuid.uuid4().hex


async def ask(nc: NATS, subject: str, payload: dict[str, Any] | bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The decoded reply and its headers; a missing reply fails the test at the deadline."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    msg = await nc.request(subject, data, timeout=10)
    reply: dict[str, Any] = json.loads(msg.data)
    return reply, dict(msg.headers or {})


async def status(nc: NATS, pool: str = "chat") -> dict[str, Any]:
    reply, _ = await ask(nc, f"poold.cmd.{pool}.status", b"")
    snapshot: dict[str, Any] = reply["pool"]
    return snapshot


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.02)  # ok: polls a cheap read; the deadline bounds it

    try:
        await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def ready(nc: NATS, pool: str = "chat") -> dict[str, Any]:
    reply, _ = await ask(nc, f"poold.cmd.{pool}.preload", {"command_id": cid()})
    assert reply["type"] == "accepted", reply

    async def is_ready() -> bool:
        return bool((await status(nc, pool))["state"] == "ready")

    await until(is_ready, f"{pool} ready")
    return await status(nc, pool)


def assert_typed(reply: dict[str, Any], headers: dict[str, str], code: str) -> None:
    """A typed rejection with ``code``; no exception text in the body or the micro headers."""
    assert reply["type"] == "rejected" and reply["code"] == code, reply
    for text in (reply["message"], headers.get(ERROR_HEADER, "")):
        assert "Error(" not in text and "Traceback" not in text and "recursion" not in text.lower(), text


# --- 1. no code or argv from the wire ----------------------------------------------------------


async def test_a_reload_carrying_an_argv_is_refused_and_runs_nothing(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS, tmp_path: Path
) -> None:
    await start_daemon(fresh_nats_server.url)
    before = await ready(client)
    pwned = tmp_path / "pwned.txt"
    code = f"open({str(pwned)!r}, 'w').write('id')"
    probes: list[tuple[dict[str, Any], str]] = [
        ({"argv": [sys.executable, "-c", code]}, "unknown field `argv`"),
        ({"argv": [sys.executable, "-c", code], "model": "m2"}, "unknown field `argv`"),
        ({"overrides": {"argv": "-c"}}, "declares no override 'argv'"),
        ({"overrides": {"x; id": 1}}, "$.overrides"),
        ({"model": "-c"}, "$.model"),
        ({"model": f"{UP}/{UP}/etc/passwd"}, "$.model"),
        ({"spec": {"argv": [sys.executable, "-c", code]}}, "unknown field `spec`"),
    ]
    for fields, message in probes:
        reply, headers = await ask(client, "poold.cmd.chat.reload", {"command_id": cid(), **fields})
        assert_typed(reply, headers, "bad_request")
        assert message in reply["message"], (fields, reply["message"])
    after = await status(client)
    assert (after["state"], after["engine"]["pid"], after["model"]) == ("ready", before["engine"]["pid"], "chat")
    assert after["restarts"] == 0
    assert not pwned.exists()


# --- 3. a flood on the health subject ----------------------------------------------------------


async def test_a_flood_of_forged_health_reports_changes_nothing_and_never_delays_readiness(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    slow = {**FAKE, "extra_args": ["--load-time", "0.5"]}
    daemon = await start_daemon(
        fresh_nats_server.url, pools=[{"id": "chat", **slow}, {"id": "ext", **slow, "external_health": True}]
    )
    stop = asyncio.Event()
    sent = 0

    async def flood(pool: str, reports: list[dict[str, Any]]) -> None:
        nonlocal sent
        payloads = [json.dumps({"type": "health", "pool": pool, "ts": 1.0, **r}).encode() for r in reports]
        while not stop.is_set():
            for _ in range(100):
                for payload in payloads:
                    await client.publish(f"poold.health.{pool}", payload)
                    sent += 1
            await client.flush()

    # "chat" ignores outside reports altogether; "ext" counts only ok:false ones for its own
    # engine, and no outside report can make a pool ready: forged "ready" for both, and forged
    # failures for chat's real engine once it has one (an attacker can read the pid off status).
    floods = [
        asyncio.create_task(flood("chat", [{"ok": True}, {"ok": True, "engine_pid": 1}, {"ok": False}])),
        asyncio.create_task(flood("ext", [{"ok": True}, {"ok": False, "engine_pid": 1}])),
    ]
    try:
        ready_chat, ready_ext = await asyncio.gather(ready(client, "chat"), ready(client, "ext"))
        pid = ready_chat["engine"]["pid"]
        floods.append(asyncio.create_task(flood("chat", [{"ok": False, "engine_pid": pid}])))

        async def flooded() -> bool:
            return sent > 5000

        await until(flooded, "5,000 forged reports sent")
        await client.flush()
        # A status read after the flood is queued behind it on the daemon's connection.
        for pool, before in (("chat", ready_chat), ("ext", ready_ext)):
            after = await status(client, pool)
            assert after["state"] == "ready", (pool, after)
            assert after["engine"]["pid"] == before["engine"]["pid"] and after["restarts"] == 0
    finally:
        stop.set()
        await asyncio.gather(*floods)
    assert daemon.metrics.health_ignored._value.get() > 1000  # the flood did reach the daemon
    assert daemon.runtime is not None
    # The outside lane may have overflowed; the prober's own lane never did.
    assert [daemon.runtime.actors[p].stats.probes_dropped for p in ("chat", "ext")] == [0, 0]


# --- 6. every input typed and bounded ---------------------------------------------------------

DEEP = b"[" * 1000 + b"]" * 1000


@pytest.mark.parametrize(
    ("subject", "payload"),
    [
        ("poold.cmd.chat.preload", b'{"command_id":"x","from_the_future":' + DEEP + b"}"),
        ("poold.cmd.chat.status", b'{"command_id":"x","z":' + DEEP + b"}"),
        ("poold.cmd.chat.lease", DEEP),
        ("poold.cmd.chat.reload", b'{"command_id":"x","overrides":{"a":' + DEEP + b"}}"),
        ("poold.node.node-a.cmd.pools", b'{"after":' + DEEP + b"}"),
        ("poold.node.node-a.cmd.inventory", b'{"x":' + DEEP + b"}"),
        ("poold.node.node-a.cmd.lifecycle", b'{"x":' + b'{"a":' * 1000 + b"1" + b"}" * 1001),
    ],
)
async def test_json_nested_deep_gets_a_typed_bad_request(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS, subject: str, payload: bytes
) -> None:
    await start_daemon(fresh_nats_server.url)
    reply, headers = await ask(client, subject, payload)
    assert_typed(reply, headers, "bad_request")
    assert "nested deeper than 32" in reply["message"]
    assert (await status(client))["state"] == "unready"


async def test_deep_or_huge_health_reports_and_kv_values_leave_the_daemon_serving(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    daemon = await start_daemon(fresh_nats_server.url)
    for payload in (DEEP, b'{"type":"health","pool":"chat","ts":1,"ok":false,"x":' + DEEP + b"}", b"\xff" * 70_000):
        await client.publish("poold.health.chat", payload)
    kv = await client.jetstream().key_value("poold_pools")
    await kv.put("junk", b'{"pool":"junk","x":' + DEEP + b"}")
    # The watch goes on past the junk: a valid snapshot put after it is still seen.
    await kv.put("later", encode(PoolSnapshot(pool="later", node="node-z")))

    async def seen() -> bool:
        return "later" in daemon.known_pools

    await until(seen, "the KV watch to see a snapshot put after a deep one")
    assert (await status(client))["state"] == "unready"


@pytest.mark.parametrize(
    ("verb", "fields", "where"),
    [
        ("lease", {"holder": "h" * 65_000}, "$.holder"),
        ("lease", b'"ttl_s":1.8e308', "$.ttl_s"),
        ("lease", b'"ttl_s":1e999', "$.ttl_s"),
        ("lease", {"ttl_s": 7200.0}, "max_lease_ttl_s 3600"),
        ("lease", {"ttl_s": -1}, "$.ttl_s"),
        ("lease", {"lease_id": "l" * 200}, "$.lease_id"),
        ("release", {"lease_id": ""}, "$.lease_id"),
        ("drain", {"deadline_s": 1e12}, "$.deadline_s"),
        ("stop", {"grace_s": 1e12}, "$.grace_s"),
        ("reload", {"model": "m" * 600}, "$.model"),
        ("reload", {"device_mask": ["0"] * 100}, "$.device_mask"),
        ("reload", {"overrides": {f"k{i}": 1 for i in range(17)}}, "$.overrides"),
        ("preload", {"policy": "p" * 300}, "$.policy"),
    ],
)
async def test_oversize_and_out_of_range_fields_are_typed_bad_requests_that_change_nothing(
    fresh_nats_server: NatsServer,
    start_daemon: StartDaemon,
    client: NATS,
    verb: str,
    fields: dict[str, Any] | bytes,
    where: str,
) -> None:
    await start_daemon(fresh_nats_server.url)
    before = await ready(client)

    def payload(command_id: str) -> bytes:
        if isinstance(fields, bytes):  # a number JSON can spell but Python cannot hold
            return b'{"command_id":"' + command_id.encode() + b'",' + fields + b"}"
        return json.dumps({"command_id": command_id, **fields}).encode()

    reply, headers = await ask(client, f"poold.cmd.chat.{verb}", payload(cid()))
    assert_typed(reply, headers, "bad_request")
    assert where in reply["message"], reply["message"]
    assert len(reply["message"]) <= 300
    after = await status(client)
    assert (after["state"], after["active_leases"], after["engine"]["pid"]) == ("ready", 0, before["engine"]["pid"])
    # An oversize command id is refused too, so no reply can be keyed by it.
    reply, headers = await ask(client, f"poold.cmd.chat.{verb}", payload("c" * 200))
    assert_typed(reply, headers, "bad_request")


def test_a_status_with_every_slot_leased_at_the_longest_fields_fits_far_under_the_payload_limit() -> None:
    leases = [
        LeaseInfo(lease_id="x" * limits.MAX_LEASE_ID, expires_at=1.8e9 + i / 7, holder="h" * limits.MAX_HOLDER)
        for i in range(limits.MAX_SLOTS)
    ]
    snap = PoolSnapshot(pool="p" * 63, slots_total=limits.MAX_SLOTS, active_leases=limits.MAX_SLOTS, leases=leases)
    assert len(encode(StatusReply(pool=snap))) < 512 * 1024


async def test_only_the_lease_id_the_grant_returned_renews_or_releases_the_lease(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    await start_daemon(fresh_nats_server.url, pools=[{"id": "chat", **FAKE, "slots": 2}])
    await ready(client)
    command_id = cid()
    grant, _ = await ask(client, "poold.cmd.chat.lease", {"command_id": command_id, "holder": "svc", "ttl_s": 30})
    assert grant["type"] == "accepted", grant
    lease_id = grant["lease_id"]
    assert len(lease_id) >= 24 and lease_id != command_id
    for verb, guess in [("lease", command_id), ("release", command_id), ("release", "lease-1"), ("lease", "x")]:
        reply, headers = await ask(client, f"poold.cmd.chat.{verb}", {"command_id": cid(), "lease_id": guess})
        assert_typed(reply, headers, "unknown_lease")
    snap = await status(client)
    assert [(x["lease_id"], x["holder"], x["expires_at"]) for x in snap["leases"]] == [
        (lease_id, "svc", grant["expires_at"])
    ]
    renewed, _ = await ask(client, "poold.cmd.chat.lease", {"command_id": cid(), "lease_id": lease_id, "ttl_s": 60})
    assert renewed["type"] == "accepted" and renewed["lease_id"] == lease_id
    assert renewed["expires_at"] > grant["expires_at"]
    released, _ = await ask(client, "poold.cmd.chat.release", {"command_id": cid(), "lease_id": lease_id})
    assert released["type"] == "accepted"
    assert (await status(client))["active_leases"] == 0


async def test_a_daemon_answers_unknown_command_fields_naming_them(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, client: NATS
) -> None:
    daemon: Daemon = await start_daemon(fresh_nats_server.url)
    assert daemon.runtime is not None
    reply, headers = await ask(client, "poold.cmd.chat.drain", {"command_id": cid(), "deadline": 5})
    assert_typed(reply, headers, "bad_request")
    assert "unknown field `deadline`" in reply["message"]
    long_name = "f" * 60_000
    reply, headers = await ask(client, "poold.cmd.chat.drain", {"command_id": cid(), long_name: 1})
    assert_typed(reply, headers, "bad_request")
    assert len(reply["message"]) <= 300 and len(headers[ERROR_HEADER]) <= 256
    assert msgspec.json.decode(msgspec.json.encode(reply))["code"] == "bad_request"
