"""A foreign message in a pool's event stream quarantines the pool (``log_corrupt``) instead of
killing it: the engine keeps running, ``status`` answers with what was found, commands that would
append are refused, and an operator's ``ack_corrupt`` naming exactly those stream sequences lets
the pool serve again; replay names the message and recovery skips it once acknowledged.

Through a real nats-server and a real daemon with fake-engine processes. The session server has
no users, so a plain client may publish on event subjects: the "identity allowed to" that the
shipped permissions give only the daemon.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

from nats.aio.client import Client as NATS

from conftest import FAKE, NatsConnect, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.event_log import SnapshotStore, read_entries
from pool_managerd.adapters.process import pid_alive, wait_pid_exit
from pool_managerd.contract.messages import (
    MAX_ACK_SEQUENCES,
    REPLY_DECODER,
    Accepted,
    PoolSnapshot,
    Rejected,
    StatusReply,
)
from pool_managerd.contract.subjects import STREAM_NAME
from pool_managerd.runtime.daemon import Daemon
from support.procs import track_pid


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def send(nc: NATS, pool: str, verb: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    msg = await nc.request(f"poold.cmd.{pool}.{verb}", data, timeout=10)
    return REPLY_DECODER.decode(msg.data)


async def status(nc: NATS, pool: str) -> StatusReply:
    reply = await send(nc, pool, "status")
    assert isinstance(reply, StatusReply), reply
    return reply


async def until_state(nc: NATS, pool: str, state: str, timeout: float = 15.0) -> StatusReply:
    async def poll() -> StatusReply:
        while True:
            reply = await status(nc, pool)
            if reply.pool.state == state:
                return reply
            await asyncio.sleep(0.02)  # ok: polling status (a read) until a deadline

    return await asyncio.wait_for(poll(), timeout)


async def ready_pool(start_daemon: StartDaemon, url: str, nc: NATS, pool: str, **extra: Any) -> tuple[Daemon, int]:
    daemon = await start_daemon(url, pools=[{"id": pool, **FAKE}], **extra)
    accepted = await send(nc, pool, "preload", {"command_id": unique("p")})
    assert isinstance(accepted, Accepted), accepted
    snap = (await until_state(nc, pool, "ready")).pool
    assert snap.engine is not None
    track_pid(snap.engine.pid)
    return daemon, snap.engine.pid


async def publish_junk(nc: NATS, pool: str, payload: bytes = b"{}") -> int:
    ack = await nc.jetstream().publish(f"poold.evt.{pool}.junk", payload, stream=STREAM_NAME)
    return ack.seq


async def replay(url: str, pool: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", "replay", "--url", url, "--pool", pool,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_junk_event_probe_quarantines_the_pool_keeps_its_engine_and_an_ack_restores_it(
    nats_url: str, nats_connect: NatsConnect, start_daemon: StartDaemon
) -> None:
    nc = await nats_connect(nats_url)
    pool = unique("junk")
    daemon, pid = await ready_pool(start_daemon, nats_url, nc, pool)
    junk = await publish_junk(nc, pool)

    # The next command that would append meets the foreign message: log_corrupt, not fenced.
    lease_cmd = {"command_id": unique("l")}
    refused = await send(nc, pool, "lease", lease_cmd)
    assert isinstance(refused, Rejected) and refused.code == "log_corrupt", refused
    assert str(junk) in refused.message and "ack-corrupt" in refused.message
    assert daemon.metrics.log_corrupt.labels(pool)._value.get() == 1
    assert pid_alive(pid), "the working engine was stopped"
    snap = (await status(nc, pool)).pool
    assert snap.state == "ready" and snap.engine is not None and snap.engine.pid == pid
    assert snap.log_corrupt is not None and snap.log_corrupt.sequences == [junk]
    (found,) = snap.log_corrupt.messages
    assert (found.subject, found.size, found.preview) == (f"poold.evt.{pool}.junk", 2, "{}")
    assert "not an Event" in found.reason
    assert pool not in daemon.fenced

    code, out, err = await replay(nats_url, pool)
    assert code == 3, (out, err)
    assert f"foreign message on poold.evt.{pool}.junk" in out and "NOT acknowledged" in out

    wrong = await send(nc, pool, "ack_corrupt", {"command_id": unique("a"), "sequences": [junk + 1000]})
    assert isinstance(wrong, Rejected) and wrong.code == "ack_mismatch", wrong
    assert (await status(nc, pool)).pool.log_corrupt is not None

    acked = await send(nc, pool, "ack_corrupt", {"command_id": unique("a"), "sequences": [junk]})
    assert isinstance(acked, Accepted), acked
    assert (await status(nc, pool)).pool.log_corrupt is None
    assert daemon.metrics.log_corrupt.labels(pool)._value.get() == 0
    # The refused command applied nothing, so its retry (same id) is applied now.
    lease = await send(nc, pool, "lease", lease_cmd)
    assert isinstance(lease, Accepted), lease

    code, out, err = await replay(nats_url, pool)
    assert code == 0, (out, err)
    assert "log_corrupt_acknowledged" in out and "acknowledged)" in out

    # A restart skips exactly the acknowledged message: the pool serves normally.
    await daemon.stop()
    assert not pid_alive(pid)
    await start_daemon(nats_url, pools=[{"id": pool, **FAKE}])
    snap = (await status(nc, pool)).pool
    assert snap.log_corrupt is None and snap.state == "unready"
    again = await send(nc, pool, "preload", {"command_id": unique("p")})
    assert isinstance(again, Accepted), again
    ready = (await until_state(nc, pool, "ready")).pool
    assert ready.engine is not None
    track_pid(ready.engine.pid)


async def test_a_restart_over_a_foreign_message_keeps_the_engine_and_answers_log_corrupt(
    nats_url: str, nats_connect: NatsConnect, start_daemon: StartDaemon
) -> None:
    nc = await nats_connect(nats_url)
    pool = unique("restart")
    daemon, pid = await ready_pool(start_daemon, nats_url, nc, pool)
    await daemon.stop(stop_engines=False)  # the engine stays for the next daemon to adopt
    assert pid_alive(pid)
    junk = await publish_junk(nc, pool, b"\x00\xffnot json at all")

    await start_daemon(nats_url, pools=[{"id": pool, **FAKE}])
    snap = (await status(nc, pool)).pool
    assert snap.log_corrupt is not None and snap.log_corrupt.sequences == [junk], snap
    assert snap.log_corrupt.messages[0].preview.startswith("\\x00\\xffnot json")
    assert snap.state == "ready" and snap.engine is not None and snap.engine.pid == pid
    assert pid_alive(pid)
    refused = await send(nc, pool, "drain", {"command_id": unique("d")})
    assert isinstance(refused, Rejected) and refused.code == "log_corrupt", refused

    # After the acknowledgement the adoption that waited is written and the pool drains normally.
    acked = await send(nc, pool, "ack_corrupt", {"command_id": unique("a"), "sequences": [junk]})
    assert isinstance(acked, Accepted), acked
    # The restart's claim of the pool's ownership lease waited with the adoption; each is a step
    # of its own after the acknowledgement's, so the adoption may land just after the reply.
    types: list[str] = []
    for _ in range(100):
        entries = [e async for e in read_entries(nc, f"poold.evt.{pool}.>", junk + 1)]
        types = [e.subject.rsplit(".", 1)[1] for e in entries]
        if len(types) >= 3:
            break
        await asyncio.sleep(0.05)  # ok: polling the stream for the steps queued behind the reply
    assert types[:3] == ["log_corrupt_acknowledged", "pool_claimed", "engine_adopted"], types
    drained = await send(nc, pool, "drain", {"command_id": unique("d"), "deadline_s": 5})
    assert isinstance(drained, Accepted), drained
    await until_state(nc, pool, "unready")
    assert await wait_pid_exit(pid, 10.0), "the drain did not stop the engine"


async def test_a_forged_kv_snapshot_shows_no_ghost_pool_in_watch(
    fresh_nats_server: NatsServer, nats_connect: NatsConnect, start_daemon: StartDaemon
) -> None:
    url = fresh_nats_server.url
    nc = await nats_connect(url)
    daemon = await start_daemon(url, pools=[{"id": "real", **FAKE}])
    store = await SnapshotStore.open(nc)
    await store.put(PoolSnapshot(pool="ghost", node=daemon.node, state="ready", seq=7))
    await store.put(PoolSnapshot(pool="phantom", node="nobody", state="ready"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", "watch", "--once", "--url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    rows = {line.split()[0] for line in out.decode().splitlines()[2:] if line.strip()}
    assert "real" in rows and "ghost" not in rows and "phantom" not in rows, out.decode()
    assert "ignored 2 KV snapshot(s) that no event backs (forged?): ghost, phantom" in out.decode()
    # The daemon itself never reads its pools from the bucket: status is the pool's own.
    assert (await status(nc, "real")).pool.state == "unready"


async def test_a_flood_larger_than_one_acknowledgement_is_acknowledged_in_batches(
    nats_url: str, nats_connect: NatsConnect, start_daemon: StartDaemon
) -> None:
    nc = await nats_connect(nats_url)
    pool = unique("flood")
    daemon, pid = await ready_pool(start_daemon, nats_url, nc, pool)
    junk = [await publish_junk(nc, pool, f"junk {i}".encode()) for i in range(MAX_ACK_SEQUENCES + 6)]
    refused = await send(nc, pool, "lease", {"command_id": unique("l")})
    assert isinstance(refused, Rejected) and refused.code == "log_corrupt", refused
    first = (await status(nc, pool)).pool.log_corrupt
    assert first is not None and first.sequences == junk[:MAX_ACK_SEQUENCES]

    acked = await send(nc, pool, "ack_corrupt", {"command_id": unique("a"), "sequences": first.sequences})
    assert isinstance(acked, Accepted), acked
    rest = (await status(nc, pool)).pool.log_corrupt
    assert rest is not None and rest.sequences == junk[MAX_ACK_SEQUENCES:], rest

    # A restart sees the same: the first batch acknowledged, the rest not.
    await daemon.stop(stop_engines=False)
    daemon = await start_daemon(nats_url, pools=[{"id": pool, **FAKE}])
    again = (await status(nc, pool)).pool.log_corrupt
    assert again is not None and again.sequences == rest.sequences
    acked = await send(nc, pool, "ack_corrupt", {"command_id": unique("a"), "sequences": rest.sequences})
    assert isinstance(acked, Accepted), acked
    assert (await status(nc, pool)).pool.log_corrupt is None
    assert isinstance(await send(nc, pool, "lease", {"command_id": unique("l")}), Accepted)
    assert pid_alive(pid)
