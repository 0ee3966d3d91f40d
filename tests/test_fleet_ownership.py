"""Two daemons (subprocesses, distinct node ids and run dirs) on one nats-server sharing a pool:
ownership by lease, a paused owner, a killed owner with a running standby, hand-overs A -> B -> A.

Leases are short here (ttl 3 s, margin 0.6 s) so a takeover takes seconds; every wait is on an
event with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.process import pid_alive
from pool_managerd.contract.messages import Accepted, EngineExited, EngineSpawned, PoolClaimed
from test_recovery import MATCH, Rig, Wire, body, body_of, changed, fake_pool, replay_check_live

OWNERSHIP = {"lease_ttl_s": 3.0, "lease_margin_s": 0.6}
TAKEOVER_S = 15.0
"""Deadline for a standby's claim and its engine's readiness (ttl + margin + a poll + a load)."""


class Fleet:
    def __init__(self, a: Rig, b: Rig, nc: NATS, wire: Wire) -> None:
        self.a, self.b, self.nc, self.wire = a, b, nc, wire

    async def statuses(self, count: int) -> list[str]:
        """Send ``count`` status reads to one inbox and return, for every reply that came, the
        node that answered: a pool answered by two nodes shows up as two replies per read."""
        replies: list[str] = []
        inbox = self.nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            reply = json.loads(msg.data)
            replies.append(reply["pool"]["node"] if reply.get("type") == "status" else f"rejected:{reply.get('code')}")

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        for _ in range(count):
            await self.nc.publish("poold.cmd.chat.status", b"", reply=inbox)
        await self.nc.flush()
        # A second answer would come from another daemon's round trip: give both their time.
        for _ in range(100):
            if len(replies) >= count:
                break
            await asyncio.sleep(0.02)  # ok: counting fire-and-forget replies, none is awaited
        await asyncio.sleep(0.3)  # ok: room for a duplicate answer from a second node to arrive
        await sub.unsubscribe()
        return replies


def _configure(rig: Rig, node: str) -> None:
    rig.configure([fake_pool("chat", standby=["node-a", "node-b"])], node=node, heartbeat_s=1.0,
                  ownership=OWNERSHIP)  # fmt: skip


@pytest.fixture
async def fleet(tmp_path: Path, fresh_nats_server: NatsServer, nats_connect: Any) -> AsyncIterator[Fleet]:
    nc = await nats_connect(fresh_nats_server.url)
    wire = Wire()
    await nc.subscribe("poold.evt.>", cb=wire.on_msg)
    await nc.subscribe("poold.node.*.evt.>", cb=wire.on_msg)
    await nc.flush()
    a = Rig(tmp_path / "a", fresh_nats_server, nc, wire)
    b = Rig(tmp_path / "b", fresh_nats_server, nc, wire)
    for rig, node in ((a, "node-a"), (b, "node-b")):
        rig.tmp.mkdir()
        _configure(rig, node)
    try:
        yield Fleet(a, b, nc, wire)
    finally:
        for rig in (a, b):
            if rig.proc is not None and rig.proc.returncode is None:
                os.kill(rig.proc.pid, signal.SIGCONT)
        await a.cleanup()
        await b.cleanup()


def claimed_by(node: str) -> Any:
    return lambda e: e.pool == "chat" and isinstance(e.body, PoolClaimed) and e.node == node


async def owner_ready(fleet: Fleet) -> int:
    """node-a starts and holds the pool, ready; node-b starts as its standby. Returns a's engine."""
    await fleet.a.start()
    pids = await fleet.a.preload_ready("chat")
    await fleet.b.start()
    assert (await fleet.a.status("chat")).node == "node-a"
    return pids["chat"]


async def test_a_paused_owner_never_answers_after_the_takeover_and_stops_its_engine(fleet: Fleet) -> None:
    a_engine = await owner_ready(fleet)
    assert fleet.a.proc is not None
    mark = fleet.wire.mark()
    os.kill(fleet.a.proc.pid, signal.SIGSTOP)
    await fleet.b.wait(claimed_by("node-b"), "node-b's claim", start=mark, timeout=TAKEOVER_S)
    spawned = await fleet.b.wait(lambda e: body_of(EngineSpawned, "chat")(e) and e.node == "node-b",
                                 "node-b's engine", start=mark, timeout=TAKEOVER_S)  # fmt: skip
    await fleet.b.wait(lambda e: changed("chat", dst="ready")(e) and e.node == "node-b", "ready on node-b",
                       start=mark, timeout=TAKEOVER_S)  # fmt: skip
    os.kill(fleet.a.proc.pid, signal.SIGCONT)
    # At once after waking, and ever after: only the new owner answers, one reply per read.
    answered = await fleet.statuses(30)
    assert answered == ["node-b"] * 30, answered
    # The old owner saw its lease gone on waking and stopped its engine: never two engines.
    for _ in range(250):
        if not pid_alive(a_engine):
            break
        await asyncio.sleep(0.02)  # ok: the stop runs in node-a's stand-down, seen here only by pid
    assert not pid_alive(a_engine) and pid_alive(body(spawned).pid)
    writers = {e.node for e in fleet.wire.items[mark:] if e.pool == "chat"}
    assert writers == {"node-b"}, writers  # node-a wrote nothing for the pool after it was paused


async def test_a_killed_owner_is_taken_over_by_the_running_standby_without_a_false_exit(fleet: Fleet) -> None:
    a_engine = await owner_ready(fleet)
    mark = fleet.wire.mark()
    await fleet.a.kill()
    claim = await fleet.b.wait(claimed_by("node-b"), "node-b's claim", start=mark, timeout=TAKEOVER_S)
    assert body(claim).previous_node == "node-a" and body(claim).previous_state == "ready"
    await fleet.b.wait(lambda e: changed("chat", dst="ready")(e) and e.node == "node-b", "ready on node-b",
                       start=mark, timeout=TAKEOVER_S)  # fmt: skip
    snapshot = await fleet.b.status("chat")
    assert snapshot.node == "node-b" and snapshot.state == "ready"
    leased = await fleet.b.request("chat", "lease", holder="client-1", ttl_s=30)
    assert isinstance(leased, Accepted), leased  # commands are answered by the new owner
    # The old engine belongs to the other host: the new owner records the claim, not its death.
    exits = [e for e in fleet.wire.items[mark:] if isinstance(e.body, EngineExited) and e.body.pid == a_engine]
    assert exits == [], exits
    assert pid_alive(a_engine)  # still node-a's to stop (its next start reaps it as an orphan)
    os.killpg(a_engine, signal.SIGKILL)


async def test_hand_overs_a_to_b_to_a_replay_and_check_live_clean(fleet: Fleet) -> None:
    await owner_ready(fleet)
    mark = fleet.wire.mark()
    assert await fleet.a.terminate() == 0  # graceful: engine stopped, lease released
    await fleet.b.wait(claimed_by("node-b"), "node-b's claim after the release", start=mark, timeout=TAKEOVER_S)
    await fleet.b.preload_ready("chat")
    assert (await fleet.b.status("chat")).node == "node-b"
    mark = fleet.wire.mark()
    assert await fleet.b.terminate() == 0
    await fleet.a.start()
    await fleet.a.wait(claimed_by("node-a"), "node-a's claim back", start=mark, timeout=TAKEOVER_S)
    await fleet.a.preload_ready("chat")
    assert (await fleet.a.status("chat")).node == "node-a"
    assert await fleet.a.terminate() == 0
    claims = [(e.node, e.epoch) for e in fleet.wire.items if claimed_by(e.node)(e)]
    assert claims == [("node-a", 1), ("node-b", 2), ("node-a", 3)], claims
    text = await replay_check_live(fleet.a.server.url)
    assert MATCH in text and "two_writers" not in text, text
    fleet.a.finished = fleet.b.finished = True
