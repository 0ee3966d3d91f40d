"""``pool-managerd watch``: the pure table renderer, and the command against a real daemon."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.cli import watch as watch_cli
from pool_managerd.cli.format import format_clock, render_table
from pool_managerd.client import PoolClient
from pool_managerd.contract.messages import (
    Accepted,
    EngineInfo,
    EngineSpawned,
    Event,
    LeaseGranted,
    Placement,
    PoolSnapshot,
    StateChanged,
)
from pool_managerd.contract.subjects import KV_BUCKET
from support.cli import DaemonEnv, cli_env, rows_of, run_cli, running_daemon
from support.deadlines import POOL_S

NOW = 1_700_000_100.0
GPU_A = "GPU-4090c0de-0000-4000-8000-000000000024"
GPU_B = "GPU-a6000ce1-0000-4000-8000-000000000048"


def _event(pool: str, seq: int, ts: float, body: StateChanged | EngineSpawned | LeaseGranted) -> Event:
    return Event(v=1, seq=seq, ts=ts, node="n1", pool=pool, body=body)


def _ready(pool: str = "chat") -> PoolSnapshot:
    return PoolSnapshot(
        pool=pool,
        node="n1",
        state="ready",
        seq=7,
        model="m",
        device_mask=[GPU_A, GPU_B],
        slots_total=4,
        slots_free=3,
        active_leases=1,
        placement=Placement(mask=["0", "1"], uuids=[GPU_A, GPU_B], cuda_visible_devices=f"{GPU_A},{GPU_B}"),
        engine=EngineInfo(pid=4242, pgid=4242, port=8081, started_at=NOW - 60),
        restarts=2,
        crashes=1,
        simulated=True,
        updated_at=NOW - 5,
        last_event="lease_granted",
    )


# ---------------------------------------------------------------------------------------------
# render_table (pure)
# ---------------------------------------------------------------------------------------------


def test_render_table_rows() -> None:
    idle = PoolSnapshot(pool="embed", node="n2", state="unready", seq=3, slots_total=1, updated_at=NOW - 125,
                        last_event="state_changed")  # fmt: skip
    lease = _event("chat", 7, NOW - 2.5, LeaseGranted(lease_id="l-1", expires_at=NOW + 60, active=1))
    text = render_table({"embed": idle, "chat": _ready()}, {"chat": lease}, NOW)
    lines = text.splitlines()
    assert lines[0].startswith("pool-managerd: 2 pool(s) at ")
    assert lines[1].split() == ["POOL", "NODE", "STATE", "PID", "PORT", "GPUS", "LEASES", "RESTARTS", "LAST", "EVENT",
                                "AGE"]  # fmt: skip
    # Sorted by pool id; the mask is shown when it differs from the UUIDs; * marks simulated GPUs.
    chat = rows_of(text, "chat")[0]
    assert chat[:8] == ["chat", "n1", "ready", "4242", "8081", "0,1=GPU-4090c0de,GPU-a6000ce1*", "1/4", "2"]
    assert "(1 crash)" in lines[2] and "lease_granted l-1 active 1" in lines[2] and lines[2].endswith("2.5s")
    # Without a live event, the snapshot's last event name and its age.
    assert rows_of(text, "embed")[0] == ["embed", "n2", "unready", "-", "-", "-", "0/1", "0", "state_changed", "2m05s"]
    assert lines[-1] == "* simulated GPUs"
    assert [line.split()[0] for line in lines[2:4]] == ["chat", "embed"]


def test_render_table_prefers_the_newest_event() -> None:
    snap = _ready()
    stale = _event("chat", 5, NOW - 30, StateChanged(trigger="engine_ready", src="preloading", dst="ready"))
    text = render_table({"chat": snap}, {"chat": stale}, NOW)
    # The snapshot (seq 7) knows a newer event than the one given (seq 5).
    assert rows_of(text, "chat")[0][-2:] == ["lease_granted", "5.0s"]
    fresh = _event("chat", 8, NOW - 0.2, StateChanged(trigger="drain", src="ready", dst="draining", reason="op"))
    text = render_table({"chat": snap}, {"chat": fresh}, NOW)
    assert "state_changed drain ready → draining (op)" in text and text.splitlines()[2].endswith("0.2s")


def test_render_table_empty_and_long_events() -> None:
    assert render_table({}, {}, NOW, title="node n1").splitlines() == [
        f"node n1: 0 pool(s) at {format_clock(NOW)}",
        "(no pools)",
    ]
    spawned = _event("chat", 9, NOW, EngineSpawned(pid=1, pgid=1, port=2, argv=[], cuda_visible_devices=GPU_A * 3))
    snap = PoolSnapshot(pool="chat", seq=9)
    text = render_table({"chat": snap}, {"chat": spawned}, NOW)
    assert "…" in text and "*" not in text  # clipped; not simulated
    assert max(len(line) for line in text.splitlines()) < 120


def test_a_snapshot_is_backed_by_its_nodes_events_or_its_announcement() -> None:
    snap = _ready()
    event = _event(snap.pool, snap.seq, NOW, StateChanged(trigger="engine_ready", src="preloading", dst="ready"))
    other = msgspec.structs.replace(event, node="elsewhere")
    assert watch_cli.backed(snap, event, frozenset())
    assert not watch_cli.backed(snap, msgspec.structs.replace(event, seq=snap.seq - 1), frozenset())
    assert not watch_cli.backed(snap, other, frozenset())
    assert not watch_cli.backed(snap, None, frozenset({"other"}))
    assert watch_cli.backed(snap, None, frozenset({snap.pool}))


def test_pool_watch_keeps_the_newest_event_per_pool() -> None:
    watch = watch_cli.PoolWatch()
    newer = _event("chat", 9, NOW, StateChanged(trigger="stop", src="ready", dst="unready"))
    older = _event("chat", 8, NOW - 1, StateChanged(trigger="drain", src="ready", dst="draining"))
    watch.on_event(newer)
    watch.on_event(older)  # arrives late: ignored
    assert watch.last_events["chat"] is newer
    watch.on_snapshot("chat", _ready())
    assert watch.changed.is_set() and watch.unchecked() == ["chat"]

    def rows() -> list[str]:
        return [line for line in watch.render(NOW).splitlines() if line.startswith("chat")]

    assert rows() == []  # shown once the stream backs it; until then only named as unchecked
    assert "not yet checked against the event stream (not shown): chat" in watch.render(NOW)
    watch.verified.add("chat")
    assert len(rows()) == 1 and "not yet checked" not in watch.render(NOW)
    watch.on_snapshot("chat", None)
    assert watch.snapshots == {}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def env(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> AsyncIterator[DaemonEnv]:
    async with running_daemon(nats_server.url, tmp_path / "run", nc) as started:
        yield started


async def test_watch_once_shows_every_pool_and_its_state(env: DaemonEnv, nc: NATS) -> None:
    client = PoolClient(nc, timeout=POOL_S)
    result = await client.command_and_wait(env.pool, "preload", "ready", wait_timeout=20)
    assert result.reached, result
    # The KV snapshot trails the event by a moment: wait until the bucket says ready.
    store = SnapshotStore(await nc.jetstream().key_value(KV_BUCKET))
    in_bucket = asyncio.Event()

    def on_snapshot(pool: str, snapshot: PoolSnapshot | None) -> None:
        if pool == env.pool and snapshot is not None and snapshot.state == "ready":
            in_bucket.set()

    await store.watch(on_snapshot, pools=env.pool)
    try:
        async with asyncio.timeout(10):
            await in_bucket.wait()
    finally:
        await store.close()
    rc, out, err = await run_cli("watch", "--once", "--url", env.url)
    assert rc == 0, err
    row = rows_of(out, env.pool)[0]
    assert row[1:3] == [env.node, "ready"]
    assert row[3].isdigit() and row[4].isdigit() and row[5] == "GPU-a6000ce1*" and row[6] == "0/2"
    assert rows_of(out, env.crashy)[0][1:3] == [env.node, "unready"]
    # The last event comes from the stream: the engine_ready transition (or a later health event).
    assert row[8] in {"state_changed", "health_changed"}


async def test_watch_follows_changes_live(env: DaemonEnv, nc: NATS) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pool_managerd",
        "watch",
        "--url",
        env.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None
    try:

        async def state_of_pool_becomes(state: str) -> None:
            async with asyncio.timeout(20):
                while True:
                    line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
                    assert line, "watch exited early"
                    cells = line.split()
                    if cells[:1] == [env.pool] and cells[2] == state:
                        return

        await state_of_pool_becomes("unready")
        reply = await PoolClient(nc, timeout=POOL_S).preload(env.pool)
        assert isinstance(reply, Accepted), reply
        await state_of_pool_becomes("ready")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.communicate()
    assert proc.returncode == 0


def test_watch_once_without_a_bucket_and_unreachable(
    fresh_nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _parser()
    assert watch_cli.run(parser.parse_args(["--once", "--url", fresh_nats_server.url])) == 0
    out, err = capsys.readouterr()
    assert "(no pools)" in out and "does not exist yet" in err
    assert watch_cli.run(parser.parse_args(["--once", "--url", "nats://127.0.0.1:1", "--timeout", "2"])) == 3
    assert "cannot reach NATS" in capsys.readouterr().err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    watch_cli.add_arguments(parser)
    return parser
