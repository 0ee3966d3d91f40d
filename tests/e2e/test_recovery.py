"""Crash recovery and graceful shutdown with the daemon as a real subprocess.

Each test runs ``pool-managerd run --config FILE`` as its own process (own session, log to a file
printed when the test fails) against a fresh nats-server, drives it over NATS like any client,
SIGKILLs it at a chosen moment and starts it again on the same config and run dir. Recovery folds
each pool's events, adopts the engines the spawn record names that are still alive, reports the
dead ones as exits, reaps recorded processes no pool claims and stops pools the configuration no
longer lists (see ``runtime/recovery.py``).

Every test ends with :func:`finish`: SIGTERM (exit 0), every engine pid learned from the events is
dead, the spawn record names no live process, per-pool and per-node sequences in the stream are
contiguous from 1, and ``pool-managerd replay --url URL --check-live`` exits 0 with no difference.

Engines spawned by a killed daemon keep running in their own process groups, and they are not our
children: the ``rig`` fixture SIGKILLs the daemon and the group of every engine pid seen in an
event, whatever happens (failing a test that had passed every check if anything was left), and
then the leak guard checks that no child of ours and no tracked engine pid survived.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.engines.procs import group_members, pid_alive, wait_pid_exit
from pool_managerd.adapters.engines.record import SpawnRecord
from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.contract.messages import (
    REPLY_DECODER,
    Accepted,
    DaemonStopping,
    DrainForced,
    EngineAdopted,
    EngineExited,
    EngineSpawned,
    Event,
    HealthChanged,
    LeaseGranted,
    LeaseReleased,
    OrphanReaped,
    Rejected,
    StateChanged,
)
from pool_managerd.contract.subjects import Subjects
from pool_managerd.testing.recovery_checks import only_processes, processes_with, sequences
from support.procs import FakeEngines, track_pid, wait_for_file
from support.rig import (
    EVENT_S,
    NODE,
    Rig,
    Wire,
    body,
    body_of,
    changed,
    fake_pool,
    replay_check_live,
)

# --- what the daemon publishes ------------------------------------------------------------------


# --- the daemon as a subprocess -------------------------------------------------------------------


@pytest.fixture
async def rig(tmp_path: Path, fresh_nats_server: NatsServer, nats_connect: Any) -> AsyncIterator[Rig]:
    nc = await nats_connect(fresh_nats_server.url)
    wire = Wire()
    await nc.subscribe("poold.evt.>", cb=wire.on_msg)
    await nc.subscribe("poold.node.*.evt.>", cb=wire.on_msg)
    await nc.flush()
    r = Rig(tmp_path, fresh_nats_server, nc, wire)
    try:
        yield r
    finally:
        killed = await r.cleanup()
    # A test that failed early leaves its daemon and engines behind by design (its failure says
    # why); one that got through every check must have left nothing.
    if killed and r.finished:
        pytest.fail("processes survived the daemon's graceful stop:\n  " + "\n  ".join(killed))


# --- the checks every test ends with ------------------------------------------------------------


async def stream_events(nc: NATS) -> list[Event]:
    return [event async for _, event in read_events(nc, Subjects())]


def assert_contiguous(events: list[Event]) -> None:
    for key, got in sequences(events).items():
        assert got == list(range(1, len(got) + 1)), f"{key}: sequences in the stream are {got}"


async def after_stop(rig: Rig) -> list[Event]:
    """Checks once the daemon has exited: no engine left, the log whole, replay agrees with KV."""
    # The daemon waits for its engines (spawned or adopted) to be gone before it exits.
    alive = [pid for pid in rig.wire.engine_pids if pid_alive(pid)]
    assert not alive, f"engines outlived the daemon: {alive}"
    live = [e for e in SpawnRecord.load(rig.run_dir / "engines.json") if e.is_live()]
    assert not live, f"the spawn record names live processes: {live}"
    events = await stream_events(rig.nc)
    assert_contiguous(events)
    node_events = [e for e in events if e.pool is None]
    assert isinstance(node_events[-1].body, DaemonStopping), f"the last node event is {node_events[-1]}"
    await replay_check_live(rig.server.url)
    rig.finished = True
    return events


async def finish(rig: Rig) -> list[Event]:
    """Stop the daemon gracefully and check what every recovery test must leave behind."""
    rc = await rig.terminate()
    assert rc == 0, f"exit status {rc}"
    events = await after_stop(rig)
    # With on_shutdown = "stop" the log ends true: every pool stopped (or failed), none "ready"
    # with an engine that no longer runs.
    last: dict[str, str] = {}
    for event in events:
        if event.pool is not None and isinstance(event.body, StateChanged):
            last[event.pool] = event.body.dst
    assert set(last.values()) <= {"unready", "failed"}, last
    return events


def first(events: list[Event], pred: Callable[[Event], bool]) -> Event:
    return next(e for e in events if pred(e))


def of(events: list[Event], pool: str, cls: type) -> list[Any]:
    return [e.body for e in events if e.pool == pool and isinstance(e.body, cls)]


# --- the tests ----------------------------------------------------------------------------------


async def test_sigkill_while_ready_then_restart_adopts_the_running_engine(rig: Rig) -> None:
    rig.configure([fake_pool("chat")])
    await rig.start()
    pid = (await rig.preload_ready("chat"))["chat"]

    await rig.kill()
    assert pid_alive(pid), "the engine died with its daemon"
    mark = rig.wire.mark()
    await rig.start()
    adopted = await rig.wait(body_of(EngineAdopted, "chat"), "engine_adopted", start=mark)
    assert body(adopted).pid == pid
    await rig.wait(body_of(HealthChanged, "chat", ready=True), "a healthy probe of the adopted engine", start=mark)
    snap = await rig.status("chat")
    assert snap.state == "ready" and snap.engine is not None and snap.engine.pid == pid

    events = await finish(rig)
    assert [b.pid for b in of(events, "chat", EngineSpawned)] == [pid], "a new engine was spawned"
    assert [b.pid for b in of(events, "chat", EngineAdopted)] == [pid]
    # Recovery changes no state: the pool is where its log left it, until the graceful stop at
    # the end of the test records the engine's stop.
    assert [(c.trigger, c.src, c.dst) for c in of(events, "chat", StateChanged)] == [
        ("preload", "unready", "preloading"),
        ("engine_ready", "preloading", "ready"),
        ("stop", "ready", "unready"),
    ]


async def test_sigkill_mid_preload_resumes_loading_under_the_original_deadline(rig: Rig) -> None:
    # "slow" is still loading when the daemon dies and becomes ready after adoption; "stuck" never
    # loads, so its load timeout fires, and it must fire at the deadline the log recorded, not a
    # full load_timeout_s after the restart.
    stuck_timeout = 4.0
    rig.configure([
        fake_pool("slow", load_time=2.0, load_timeout_s=10.0),
        fake_pool("stuck", load_time="inf", load_timeout_s=stuck_timeout,
                  restart={"initial_s": 30.0, "max_s": 30.0}),
    ])  # fmt: skip
    await rig.start()
    mark = rig.wire.mark()
    for pool in ("slow", "stuck"):
        await rig.accepted(pool, "preload")
    spawned: dict[str, int] = {}
    for pool in ("slow", "stuck"):
        spawned[pool] = body(await rig.wait(body_of(EngineSpawned, pool), f"{pool}: spawned", start=mark)).pid
    for pool in ("slow", "stuck"):
        # Let run (released from its gate once engine_spawned was logged) and answering 503.
        await rig.wait(body_of(HealthChanged, pool, live=True), f"{pool}: loading", start=mark)
    await rig.kill()  # both engines are still loading
    assert all(pid_alive(p) for p in spawned.values())
    deadline = {p: body(first(rig.wire.items[mark:], changed(p, dst="preloading"))).deadline_at for p in spawned}

    restart = rig.wire.mark()
    await rig.start()
    adopted = {}
    for pool, pid in spawned.items():
        event = await rig.wait(body_of(EngineAdopted, pool, pid=pid), f"{pool}: adopted", start=restart)
        adopted[pool] = event.ts
    ready = await rig.wait(changed("slow", dst="ready"), "slow: ready", start=restart)
    assert body(ready).trigger == "engine_ready"
    assert ready.ts < deadline["slow"], "slow became ready after its original load deadline"
    failed = await rig.wait(changed("stuck", trigger="preload_failed"), "stuck: load timeout", start=restart)
    assert body(failed).dst == "restarting", failed
    assert "timeout" in body(failed).reason or "timed out" in body(failed).reason, failed
    late = failed.ts - deadline["stuck"]
    assert -0.05 < late < 1.0, f"load timeout fired {late:+.3f} s from the recorded deadline"
    # A fresh deadline would fire a whole load_timeout_s after the restore (just before adoption).
    assert failed.ts < adopted["stuck"] + stuck_timeout - 0.25, "the load timeout was re-armed in full"

    events = await finish(rig)
    for pool, pid in spawned.items():
        assert [b.pid for b in of(events, pool, EngineSpawned)] == [pid], f"{pool} spawned again"


async def test_sigkill_mid_drain_resumes_the_drain_with_its_remaining_deadline(rig: Rig) -> None:
    # "held" keeps its lease: the drain ends at its deadline (drain_forced). "freed" has its lease
    # released after the restart: the drain completes then, long before its deadline.
    held_deadline_s = 6.0  # room for a kill and a restart on a loaded machine, so some deadline is left
    rig.configure([fake_pool("held"), fake_pool("freed")])
    await rig.start()
    pids = await rig.preload_ready("held", "freed")
    leases = {pool: (await rig.accepted(pool, "lease", ttl_s=300.0)).lease_id for pool in pids}
    mark = rig.wire.mark()
    await rig.accepted("held", "drain", deadline_s=held_deadline_s)
    await rig.accepted("freed", "drain", deadline_s=60.0)
    await rig.kill()
    deadline = {}
    for pool in pids:
        event = await rig.wait(changed(pool, dst="draining"), f"{pool}: draining", start=mark)
        deadline[pool] = body(event).deadline_at

    restart = rig.wire.mark()
    await rig.start()
    adopted = {}
    for pool, pid in pids.items():
        event = await rig.wait(body_of(EngineAdopted, pool, pid=pid), f"{pool}: adopted", start=restart)
        adopted[pool] = event.ts
    assert (await rig.status("held")).state == "draining"
    released = await rig.accepted("freed", "release", lease_id=leases["freed"])
    drained = await rig.wait(changed("freed", dst="unready"), "freed: drained", start=restart)
    assert body(drained).trigger == "drained" and body(drained).leases_left == 0, drained
    assert drained.seq > released.seq and drained.ts < deadline["freed"]

    forced = await rig.wait(changed("held", dst="unready"), "held: drain deadline", start=restart)
    assert body(forced).trigger == "drain_deadline" and body(forced).leases_left == 1, forced
    late = forced.ts - deadline["held"]
    assert -0.05 < late < 1.0, f"drain deadline fired {late:+.3f} s from the recorded one"
    assert forced.ts < adopted["held"] + held_deadline_s - 0.25, "the drain deadline was re-armed in full"
    await rig.wait(body_of(DrainForced, "held", leases_left=1), "held: drain_forced", start=restart)
    for pool, pid in pids.items():
        assert await wait_pid_exit(pid, 10.0), f"{pool}: engine {pid} still runs after the drain"

    events = await finish(rig)
    for pool in pids:
        assert of(events, pool, StateChanged)[-1].dst == "unready"


async def test_engine_dead_across_the_restart_is_reported_and_restarted(rig: Rig) -> None:
    rig.configure([fake_pool("chat", restart={"initial_s": 0.2, "jitter": 0.0})])
    await rig.start()
    old = (await rig.preload_ready("chat"))["chat"]
    await rig.kill()
    os.killpg(old, signal.SIGKILL)
    assert await wait_pid_exit(old, 5.0)

    restart = rig.wire.mark()
    await rig.start()
    exited = await rig.wait(body_of(EngineExited, "chat"), "engine_exited", start=restart)
    assert body(exited).pid == old and not body(exited).expected
    down = await rig.wait(changed("chat", trigger="engine_exited"), "ready -> restarting", start=restart)
    assert (body(down).src, body(down).dst) == ("ready", "restarting")
    spawned = await rig.wait(body_of(EngineSpawned, "chat"), "a new engine", start=restart)
    new = body(spawned).pid
    assert new != old
    await rig.wait(changed("chat", dst="ready"), "ready again", start=restart)
    snap = await rig.status("chat")
    assert snap.state == "ready" and snap.engine is not None and snap.engine.pid == new
    assert snap.restarts == 1

    events = await finish(rig)
    assert [b.pid for b in of(events, "chat", EngineSpawned)] == [old, new]
    assert of(events, "chat", EngineAdopted) == []
    # The dead engine is the pool's exit, not an orphan: nothing was reaped.
    assert not [e for e in events if isinstance(e.body, OrphanReaped)]
    assert [(c.trigger, c.dst) for c in of(events, "chat", StateChanged)][-4:] == [
        ("engine_exited", "restarting"),
        ("backoff_elapsed", "preloading"),
        ("engine_ready", "ready"),
        ("stop", "unready"),  # the graceful stop at the end of the test
    ]


async def test_recorded_processes_no_pool_claims_are_reaped_by_process_group(rig: Rig, tmp_path: Path) -> None:
    rig.configure([fake_pool("chat")])
    await rig.start()
    pid = (await rig.preload_ready("chat"))["chat"]
    await rig.kill()

    # Two strangers in the spawn record: one for a pool that has no events at all, one claiming to
    # be a second engine of "chat" (whose log names another pid). Each has a grandchild in its
    # group, which only a group stop reaches.
    fakes = FakeEngines(tmp_path)
    try:
        record = SpawnRecord(rig.run_dir / "engines.json")
        strangers = {}
        for pool in ("ghost", "chat"):
            pid_file = tmp_path / f"{pool}-grandchild.pid"
            engine = await fakes.start("--spawn-grandchild", "--grandchild-pid-file", str(pid_file), pool=pool)
            rig.extra_groups.append(engine.pgid)
            grandchild = int(await wait_for_file(pid_file, engine))
            track_pid(grandchild)
            record.add(engine.entry())
            strangers[engine.pid] = (engine, grandchild)

        restart = rig.wire.mark()
        await rig.start()
        for orphan, (engine, grandchild) in strangers.items():
            reaped = await rig.wait(body_of(OrphanReaped, pid=orphan), f"orphan_reaped {orphan}", start=restart)
            assert reaped.pool is None and reaped.node == NODE
            assert body(reaped).pgid == engine.pgid
            await asyncio.wait_for(engine.wait(), 10)
            assert await wait_pid_exit(grandchild, 5.0), f"grandchild {grandchild} of orphan {orphan} survived"
        adopted = await rig.wait(body_of(EngineAdopted, "chat"), "engine_adopted", start=restart)
        assert body(adopted).pid == pid
        assert [e.pid for e in SpawnRecord.load(rig.run_dir / "engines.json")] == [pid]
        assert (await rig.status("chat")).state == "ready"

        events = await finish(rig)
    finally:
        await fakes.close()
    reaped_pids = {e.body.pid for e in events if isinstance(e.body, OrphanReaped)}
    assert set(strangers) <= reaped_pids
    assert pid not in reaped_pids


async def test_pool_removed_from_the_config_while_down_is_drained_and_stopped(rig: Rig) -> None:
    rig.configure([fake_pool("keep"), fake_pool("gone")])
    await rig.start()
    pids = await rig.preload_ready("keep", "gone")
    await rig.kill()
    rig.configure([fake_pool("keep")])

    restart = rig.wire.mark()
    started = await rig.start()
    assert body(started).pools == ["keep"]
    stopped = await rig.wait(changed("gone", dst="unready"), "gone: drained", start=restart)
    assert body(stopped).trigger == "drained"  # it was serving: drained (no lease held), then stopped
    assert await wait_pid_exit(pids["gone"], 10.0), "the removed pool's engine still runs"
    await rig.wait(body_of(EngineAdopted, "keep", pid=pids["keep"]), "keep: adopted", start=restart)
    assert (await rig.status("keep")).state == "ready"
    # Nobody serves the removed pool any more: a command gets a typed answer, not a timeout.
    for _ in range(200):
        reply = await rig.request("gone", "status")
        if isinstance(reply, Rejected):
            break
        await asyncio.sleep(0.02)  # ok: the KV delete reaches the catch-all's watch asynchronously
    assert isinstance(reply, Rejected) and reply.code == "unknown_pool", reply

    events = await finish(rig)
    gone = [e for e in events if e.pool == "gone"]
    last_change = [e for e in gone if isinstance(e.body, StateChanged)][-1]
    assert (body(last_change).trigger, body(last_change).src, body(last_change).dst) == (
        "drained", "draining", "unready",
    )  # fmt: skip
    # Nothing happens to the pool after it was stopped (its engine's exit may be recorded).
    assert all(isinstance(e.body, EngineExited | HealthChanged) for e in gone if e.seq > last_change.seq)


async def test_sigterm_stops_engines_flushes_events_and_exits_zero(rig: Rig) -> None:
    rig.configure([fake_pool("chat", slots=64)])
    await rig.start()
    pid = (await rig.preload_ready("chat"))["chat"]

    # A burst of commands in flight when SIGTERM arrives: every one the daemon accepted must have
    # its events in the stream when the process has exited.
    async def lease(i: int) -> Any:
        return await rig.request("chat", "lease", ttl_s=300.0, holder=f"h{i}")

    burst = [asyncio.ensure_future(lease(i)) for i in range(40)]
    await asyncio.wait(burst, return_when=asyncio.FIRST_COMPLETED)
    rc = await rig.terminate()
    assert rc == 0
    assert not pid_alive(pid), "the engine outlived the daemon"
    replies = await asyncio.gather(*burst, return_exceptions=True)
    accepted = [r for r in replies if isinstance(r, Accepted)]
    assert accepted

    events = await after_stop(rig)
    stored = {(e.pool, e.seq) for e in events}
    assert {("chat", r.seq) for r in accepted} <= stored
    seen = {(e.pool, e.seq) for e in rig.wire.items if e.pool is not None}
    assert seen <= stored, f"events published but not in the stream: {sorted(seen - stored)}"
    stopping = [e for e in events if isinstance(e.body, DaemonStopping)]
    assert len(stopping) == 1 and stopping[0].node == NODE
    assert len(of(events, "chat", EngineSpawned)) == 1


async def test_sigterm_with_on_shutdown_leave_hands_engines_to_the_next_start(rig: Rig) -> None:
    rig.configure([fake_pool("chat")], on_shutdown="leave")
    await rig.start()
    pid = (await rig.preload_ready("chat"))["chat"]
    mark = rig.wire.mark()
    assert await rig.terminate() == 0
    stopping = await rig.wait(body_of(DaemonStopping), "daemon_stopping", start=mark)
    assert body(stopping).reason == "engines left running"
    assert pid_alive(pid), "on_shutdown = leave stopped the engine"
    assert [e.pid for e in SpawnRecord.load(rig.run_dir / "engines.json")] == [pid]

    rig.configure([fake_pool("chat")], on_shutdown="stop")
    restart = rig.wire.mark()
    await rig.start()
    await rig.wait(body_of(EngineAdopted, "chat", pid=pid), "engine_adopted", start=restart)
    snap = await rig.status("chat")
    assert snap.state == "ready" and snap.engine is not None and snap.engine.pid == pid

    events = await finish(rig)
    assert [b.pid for b in of(events, "chat", EngineSpawned)] == [pid]
    # The final graceful stop may record the exit it asked for; an exit it did not ask for would
    # mean the adopted engine was taken for dead.
    assert not [b for b in of(events, "chat", EngineExited) if not b.expected]


async def test_group_of_an_engine_that_died_while_down_is_killed(rig: Rig, tmp_path: Path) -> None:
    # The engine's leader dies while the daemon is down, leaving a grandchild in its group. The
    # design: "the daemon reaps them and kills the group on exit so no orphan survives it".
    grandchild_file = tmp_path / "grandchild.pid"
    knobs = ["--load-time", "0.1", "--spawn-grandchild", "--grandchild-pid-file", str(grandchild_file)]
    rig.configure([fake_pool("chat", extra_args=knobs, restart={"initial_s": 30.0, "max_s": 30.0})])
    await rig.start()
    pid = (await rig.preload_ready("chat"))["chat"]
    grandchild = int(grandchild_file.read_text())  # written before the engine listens
    try:
        await rig.kill()
        os.kill(pid, signal.SIGKILL)  # the leader only: its group lives on in the grandchild
        assert await wait_pid_exit(pid, 5.0)
        restart = rig.wire.mark()
        await rig.start()
        await rig.wait(body_of(EngineExited, "chat", pid=pid), "engine_exited", start=restart)
        await finish(rig)
        assert await wait_pid_exit(grandchild, 2.0), "a grandchild of the dead engine survived recovery"
    finally:
        if group_members(pid):
            os.killpg(pid, signal.SIGKILL)


async def test_removed_pool_whose_engine_died_while_down_is_stopped_not_restarted(rig: Rig) -> None:
    # The removal is decided after the engine's death moved the pool to restarting: a stop, never
    # a drain refused as illegal and a backoff that brings the removed pool back.
    rig.configure([fake_pool("keep"), fake_pool("gone", restart={"initial_s": 0.2, "jitter": 0.0})])
    await rig.start()
    pids = await rig.preload_ready("keep", "gone")
    await rig.kill()
    os.killpg(pids["gone"], signal.SIGKILL)  # a host reboot or the OOM killer while the daemon is down
    assert await wait_pid_exit(pids["gone"], 5.0)
    rig.configure([fake_pool("keep")])
    restart = rig.wire.mark()
    await rig.start()
    stopped = await rig.wait(changed("gone", dst="unready"), "gone: stopped", start=restart)
    assert body(stopped).trigger == "stop"
    for _ in range(200):
        reply = await rig.request("gone", "status")
        if isinstance(reply, Rejected):
            break
        await asyncio.sleep(0.02)  # ok: the pool is forgotten by a task once it is unready
    assert isinstance(reply, Rejected) and reply.code == "unknown_pool", reply
    events = await finish(rig)
    after = [e for e in events if e.pool == "gone" and e.seq > 0 and e.ts >= rig.wire.items[restart].ts]
    assert not [e for e in after if isinstance(e.body, EngineSpawned)], "the removed pool was started again"


# --- crash windows around a spawn, and retries across a restart ------------------------------------


@pytest.mark.parametrize("fault", ["spawn:after_fork", "spawn:after_record", "spawn:after_release"])
async def test_a_crash_at_any_point_of_a_spawn_leaves_no_unrecorded_engine(rig: Rig, fault: str) -> None:
    # The daemon SIGKILLs itself at the fault point (right after the fork, after the spawn record
    # is durable, right after the engine was let run). Whatever the instant, the restarted daemon
    # must end up with exactly one engine for the pool, and nothing may outlive the final stop.
    marker = f"crash-{uuid.uuid4().hex[:12]}"
    rig.configure([fake_pool("chat", extra_args=["--load-time", "0.1", "--alias", marker])])
    await rig.start(env={"POOL_MANAGERD_FAULTS": fault})
    reply = await rig.request("chat", "preload")
    assert isinstance(reply, Accepted), reply
    assert rig.proc is not None
    rc = await asyncio.wait_for(rig.proc.wait(), EVENT_S)
    assert rc == -signal.SIGKILL, f"the fault point did not fire: exit status {rc}"
    for pid in processes_with(marker):
        rig.extra_groups.append(pid)  # killed at teardown whatever happens
        track_pid(pid)

    mark = rig.wire.mark()
    await rig.start()
    await rig.wait(changed("chat", dst="ready"), "chat: ready after the restart", start=mark)
    snap = await rig.status("chat")
    assert snap.engine is not None
    left = await only_processes(marker, {snap.engine.pid})
    assert left == [snap.engine.pid], f"engines of pool chat running: {left} (current {snap.engine.pid})"

    await finish(rig)
    assert processes_with(marker) == [], "an engine outlived the daemon's graceful stop"


async def test_a_lease_and_a_release_retried_after_a_restart_get_their_first_answers(rig: Rig) -> None:
    rig.configure([fake_pool("chat", slots=2)])
    await rig.start()
    await rig.preload_ready("chat")
    lease = await rig.request("chat", "lease", command_id="lease-1", ttl_s=300)
    assert isinstance(lease, Accepted) and lease.lease_id and lease.lease_id != "lease-1", lease
    other = await rig.request("chat", "lease", command_id="lease-2", ttl_s=300)
    assert isinstance(other, Accepted) and other.lease_id, other
    released = await rig.request("chat", "release", command_id="rel-2", lease_id=other.lease_id)
    assert isinstance(released, Accepted), released

    await rig.kill()
    await rig.start()
    # The same commands again, with the keys in another order: the answers are the first ones
    # (the lease ids the daemon drew included) and nothing is applied twice.
    msg = await rig.nc.request("poold.cmd.chat.lease", b'{"ttl_s": 300.0,  "command_id":"lease-1"}', timeout=10)
    again = REPLY_DECODER.decode(msg.data)
    assert again == lease
    body = b'{"lease_id":"' + other.lease_id.encode() + b'","command_id":"rel-2"}'
    msg = await rig.nc.request("poold.cmd.chat.release", body, timeout=10)
    assert REPLY_DECODER.decode(msg.data) == released
    clash = await rig.request("chat", "lease", command_id="lease-1", ttl_s=5)
    assert isinstance(clash, Rejected) and clash.code == "command_id_conflict", clash

    events = await finish(rig)
    assert [b.lease_id for b in of(events, "chat", LeaseGranted)] == [lease.lease_id, other.lease_id]
    assert [b.lease_id for b in of(events, "chat", LeaseReleased)] == [other.lease_id]
