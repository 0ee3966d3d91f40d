"""Fleet views: ``ctl nodes``, ``ctl pools`` across nodes, and ``watch`` with node liveness, all
read from discovery, the KV bucket and the stream (no daemon is asked about another node)."""

from __future__ import annotations

import json
import time

import nats
import pytest

from conftest import FAKE, StartDaemon
from pool_managerd.cli.fleet import STALE_BEATS, NodeView, liveness, node_views, render_nodes
from pool_managerd.cli.format import format_age
from pool_managerd.client import NodeInfo
from pool_managerd.contract.messages import SCHEMA_VERSION, DaemonStopping, Event, NodeHeartbeat, encode
from pool_managerd.testing.nats_cluster import NatsCluster
from support.cli import run_cli

NOW = 1_800_000_000.0


def _beat(node: str, ts: float, period_s: float | None = 10.0, seq: int = 1) -> Event:
    body = NodeHeartbeat(gpus=2, memory_total=72 << 30, memory_free=70 << 30, simulated=True,
                         states={"ready": 1}, period_s=period_s)  # fmt: skip
    return Event(v=SCHEMA_VERSION, seq=seq, ts=ts, node=node, body=body)


def _stopping(node: str, ts: float) -> Event:
    return Event(v=SCHEMA_VERSION, seq=9, ts=ts, node=node, body=DaemonStopping(reason="SIGTERM"))


# --- pure ------------------------------------------------------------------------------------------


def test_liveness_is_judged_by_each_nodes_own_period() -> None:
    fresh = NodeView(node="a", answering=True, beat=_beat("a", NOW - 25.0, period_s=10.0))
    assert liveness(fresh, NOW) == "live"
    old = NodeView(node="a", answering=True, beat=_beat("a", NOW - 10.0 * STALE_BEATS - 0.1, period_s=10.0))
    assert liveness(old, NOW) == "stale"
    # A slow beater is not stale after the same silence: its own period counts.
    slow = NodeView(node="b", answering=True, beat=_beat("b", NOW - 31.0, period_s=60.0))
    assert liveness(slow, NOW) == "live"
    assert liveness(NodeView(node="c", answering=False, beat=_beat("c", NOW - 1.0)), NOW) == "silent"
    assert liveness(NodeView(node="d", answering=True), NOW) == "stale"
    stopped = NodeView(node="e", beat=_beat("e", NOW - 5.0), last_node_event=_stopping("e", NOW - 4.0))
    assert liveness(stopped, NOW) == "stopped"


def test_node_views_join_discovery_beats_and_pools() -> None:
    from pool_managerd.contract.messages import PoolSnapshot

    snaps = {
        p: PoolSnapshot(pool=p, node=n, state=st)
        for p, n, st in (("alpha", "node-a", "ready"), ("beta", "node-b", "unready"), ("gamma", "node-a", "ready"))
    }
    found = [NodeInfo(node="node-a", id="x1", version="9.9.9", metadata={})]
    views = node_views(found, snaps, {"node-b": _beat("node-b", NOW - 100.0)})
    assert [v.node for v in views] == ["node-a", "node-b"]
    a, b = views
    assert (a.answering, a.version, a.pools, dict(a.states)) == (True, "9.9.9", ("alpha", "gamma"), {"ready": 2})
    assert (b.answering, b.pools) == (False, ("beta",))
    text = render_nodes(views, NOW)
    assert "2 node(s), 0 live" in text  # node-a answers but never beat; node-b beat long ago
    row_b = next(line for line in text.splitlines() if line.startswith("node-b"))
    assert "stale" in row_b and format_age(100.0) in row_b and "beta" in row_b


# --- against a real cluster with two daemons ---------------------------------------------------------


@pytest.fixture
async def fleet(nats_cluster: NatsCluster, start_daemon: StartDaemon) -> NatsCluster:
    opts = {"replicas": 3}
    await start_daemon(nats_cluster.urls, node="node-a", pools=[{"id": "alpha", **FAKE}], nats_options=opts,
                       heartbeat_s=0.5)  # fmt: skip
    await start_daemon(nats_cluster.urls[::-1], node="node-b", pools=[{"id": "beta", **FAKE}], nats_options=opts,
                       heartbeat_s=0.5)  # fmt: skip
    return nats_cluster


async def _wait_cli(*args: str, until: str, unless: str | None = None, within_s: float = 15.0) -> str:
    """Run the CLI until its output holds ``until`` and not ``unless`` (a beat or KV put may still
    be on its way, or a read of the stream may have timed out on a loaded machine)."""
    deadline = time.monotonic() + within_s
    while True:
        rc, out, err = await run_cli(*args)
        if rc == 0 and until in out and (unless is None or unless not in out):
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"{args}: {until!r} not shown within {within_s} s (rc {rc}):\n{out}\n{err}")


async def test_ctl_nodes_lists_every_live_node_with_its_gpus_and_pools(fleet: NatsCluster) -> None:
    url = ",".join(fleet.urls[1:])
    out = await _wait_cli("ctl", "nodes", "--url", url, until="2 live")
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("node-")}
    assert set(rows) == {"node-a", "node-b"}
    assert "live" in rows["node-a"] and "alpha" in rows["node-a"] and "beta" not in rows["node-a"]
    assert "live" in rows["node-b"] and "beta" in rows["node-b"]
    rc, out, err = await run_cli("ctl", "nodes", "--url", url, "--json")
    assert rc == 0, err
    nodes = {n["node"]: n for n in json.loads(out)["nodes"]}
    assert nodes["node-a"]["pools"] == ["alpha"] and nodes["node-b"]["pools"] == ["beta"]
    assert nodes["node-a"]["gpus"] == 2 and nodes["node-a"]["simulated"] is True
    assert nodes["node-a"]["version"] and nodes["node-a"]["heartbeat_age_s"] < STALE_BEATS * 0.5 + 5


async def test_ctl_pools_without_a_node_shows_every_node_and_marks_a_stale_one(fleet: NatsCluster) -> None:
    out = await _wait_cli("ctl", "pools", "--url", fleet.urls[0], until="beta")
    assert "alpha" in out and "node-a (live)" in out and "node-b (live)" in out
    # A host that beat once a minute ago and went quiet: its last word is in the stream.
    nc = await nats.connect(fleet.urls[2])
    try:
        ghost = _beat("node-z", time.time() - 60.0, period_s=5.0)
        await nc.jetstream().publish("poold.node.node-z.evt.heartbeat", encode(ghost))
    finally:
        await nc.close()
    out = await _wait_cli("ctl", "nodes", "--url", fleet.urls[0], until="node-z")
    row = next(line for line in out.splitlines() if line.startswith("node-z"))
    assert "stale" in row and "3 node(s), 2 live" in out
    watched = await _wait_cli("watch", "--once", "--url", fleet.urls[1], until="node-z", unless="not yet checked")
    assert "node-z STALE" in watched and "node-a live" in watched
    pool_rows = [line for line in watched.splitlines() if line.startswith(("alpha", "beta"))]
    assert len(pool_rows) == 2 and all("(stale)" not in line for line in pool_rows)
