"""Refused commands go to the size-bounded audit stream (and metrics), never to the pool's event
stream. Through a real nats-server and a real daemon."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from conftest import FAKE, NatsConnect, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.event_log import read_entries
from pool_managerd.contract.messages import REPLY_DECODER, AuditRecord, Rejected
from pool_managerd.contract.subjects import AUDIT_STREAM, STREAM_NAME

AUDIT = msgspec.json.Decoder(AuditRecord)


async def refuse(nc: NATS, pool: str, n: int, prefix: str = "d") -> list[str]:
    """Send ``n`` drains to an unready pool (each refused: illegal_transition); their ids."""
    ids = [f"{prefix}{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    for cid in ids:
        msg = await nc.request(f"poold.cmd.{pool}.drain", json.dumps({"command_id": cid}).encode(), timeout=10)
        reply = REPLY_DECODER.decode(msg.data)
        assert isinstance(reply, Rejected) and reply.code == "illegal_transition", reply
    return ids


async def audit_records(nc: NATS, node: str, want_last: str, timeout: float = 10.0) -> list[AuditRecord]:
    """The node's audit records, once the one with command id ``want_last`` is stored."""

    async def read() -> list[AuditRecord]:
        while True:
            records = [AUDIT.decode(e.data) async for e in read_entries(nc, f"poold.audit.{node}.>",
                                                                       stream=AUDIT_STREAM)]  # fmt: skip
            if records and records[-1].command_id == want_last:
                return records
            await asyncio.sleep(0.02)  # ok: audit records are written without an ack to wait on

    return await asyncio.wait_for(read(), timeout)


async def test_refused_commands_go_to_the_audit_stream_and_not_to_the_pool_stream(
    nats_url: str, nats_connect: NatsConnect, start_daemon: StartDaemon
) -> None:
    nc = await nats_connect(nats_url)
    node, pool = f"n-{uuid.uuid4().hex[:8]}", f"aud-{uuid.uuid4().hex[:8]}"
    daemon = await start_daemon(nats_url, node=node, pools=[{"id": pool, **FAKE}])
    ids = await refuse(nc, pool, 5)
    records = await audit_records(nc, node, ids[-1])
    assert [r.command_id for r in records] == ids
    first = records[0]
    assert (first.pool, first.verb, first.code, first.state, first.node) == (
        pool, "drain", "illegal_transition", "unready", node,
    )  # fmt: skip
    assert "not allowed in state 'unready'" in first.message
    # Nothing of it in the pool's history, and the refusals are counted by code.
    assert [e async for e in read_entries(nc, f"poold.evt.{pool}.>", stream=STREAM_NAME)] == []
    assert daemon.metrics.refused.labels("illegal_transition")._value.get() == 5


async def test_the_audit_stream_is_bounded_and_discards_the_oldest(
    fresh_nats_server: NatsServer, nats_connect: NatsConnect, start_daemon: StartDaemon
) -> None:
    url = fresh_nats_server.url
    nc = await nats_connect(url)
    await start_daemon(url, node="node-a", nats={"audit_max_bytes": 4096})
    ids = await refuse(nc, "chat", 40)
    records = await audit_records(nc, "node-a", ids[-1])
    info = await nc.jetstream().stream_info(AUDIT_STREAM)
    assert info.config.max_bytes == 4096
    assert info.state.bytes <= 4096
    assert info.state.first_seq > 1, "nothing was discarded"
    kept = [r.command_id for r in records]
    assert kept == ids[-len(kept) :] and len(kept) < len(ids)  # the newest survive, the oldest went


async def test_a_daemon_started_again_with_another_bound_updates_the_stream(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nats_connect: NatsConnect
) -> None:
    url = fresh_nats_server.url
    extra: dict[str, Any] = {"nats": {"audit_max_bytes": 8192}}
    daemon = await start_daemon(url, **extra)
    await daemon.stop()
    await start_daemon(url, node="node-a", nats={"audit_max_bytes": 16384})
    nc = await nats_connect(url)
    info = await nc.jetstream().stream_info(AUDIT_STREAM)
    assert (info.config.max_bytes, info.config.discard) == (16384, "old")
