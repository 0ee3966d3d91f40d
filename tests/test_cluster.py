"""A real 3-node nats-server cluster: the fixture itself, ``nats.replicas``, and daemons given
every URL of the cluster (the kill -9 runs are in ``test_fleet_faults.py``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAKE, JsNamespace, NatsConnect, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.event_log import ensure_kv, ensure_stream
from pool_managerd.adapters.replication import ReplicasUnavailable
from pool_managerd.client import PoolClient
from pool_managerd.config import ConfigError, load_config
from pool_managerd.contract.messages import StatusReply
from pool_managerd.contract.subjects import KV_BUCKET, STREAM_NAME
from pool_managerd.testing.nats_cluster import NatsCluster


def test_the_cluster_agrees_on_a_meta_leader_and_routes_every_node(nats_cluster: NatsCluster) -> None:
    leader = nats_cluster.wait_meta_leader(10.0)
    assert leader in {s.server_name for s in nats_cluster.servers}
    for index in range(nats_cluster.size):
        doc = nats_cluster.jsz(index)
        assert doc is not None and doc["meta_cluster"]["cluster_size"] == 3


async def test_streams_get_three_current_replicas_on_the_cluster(
    nats_cluster: NatsCluster, nats_connect: NatsConnect, js_ns: JsNamespace
) -> None:
    nc = await nats_connect(nats_cluster.urls)
    js = nc.jetstream()
    info = await ensure_stream(js, js_ns.subjects, replicas=3, stream=js_ns.stream)
    assert info.config.num_replicas == 3
    await ensure_kv(js, bucket=js_ns.bucket, replicas=3)
    for stream in (js_ns.stream, f"KV_{js_ns.bucket}"):
        replicas = await nats_cluster.wait_stream_current(js, stream, 15.0)
        assert set(replicas) == {"poold-0", "poold-1", "poold-2"}


@pytest.mark.parametrize("value", [0, 2, 4, 7])
def test_replicas_must_be_one_three_or_five(tmp_path: Path, value: int) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text(f"[nats]\nreplicas = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "nats.replicas:" in info.value.message and "1, 3 or 5" in info.value.message


def test_replicas_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_MANAGERD_NATS__REPLICAS", "3")
    assert load_config(None).nats.replicas == 3


async def test_replicas_above_one_on_a_single_server_is_refused_before_any_stream(
    nats_server: NatsServer, start_daemon: StartDaemon, nats_connect: NatsConnect, js_ns: JsNamespace
) -> None:
    with pytest.raises(ReplicasUnavailable) as info:
        await start_daemon(nats_server.url, nats_options={"replicas": 3, "prefix": js_ns.subjects.prefix})
    assert "needs a clustered nats-server" in info.value.message
    assert "nats.replicas = 3" in info.value.message


async def test_replicas_above_the_cluster_size_is_refused_by_name(
    nats_cluster: NatsCluster, start_daemon: StartDaemon, js_ns: JsNamespace
) -> None:
    with pytest.raises(ReplicasUnavailable) as info:
        await start_daemon(nats_cluster.urls, nats_options={"replicas": 5, "prefix": js_ns.subjects.prefix})
    assert "nats.replicas = 5" in info.value.message and "replicas" in info.value.message


def test_run_exits_2_when_replicas_need_a_cluster(nats_server: NatsServer, tmp_path: Path) -> None:
    config = tmp_path / "poold.toml"
    config.write_text(
        f'node = "solo"\nrun_dir = "{tmp_path / "run"}"\ngpus = "sim:hetero-24g-48g"\n'
        f'[nats]\nurls = ["{nats_server.url}"]\nreplicas = 3\nprefix = "solo3"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pool_managerd", "run", "--config", str(config), "--log-format", "text"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs a clustered nats-server" in proc.stderr


async def test_two_daemons_on_the_cluster_serve_their_pools_through_any_server(
    nats_cluster: NatsCluster, start_daemon: StartDaemon, nats_connect: NatsConnect, js_ns: JsNamespace
) -> None:
    prefix = js_ns.subjects.prefix
    opts = {"replicas": 3, "prefix": prefix}
    # Each daemon lists the servers in another order: they need not share one.
    await start_daemon(nats_cluster.urls, node="node-a", pools=[{"id": "alpha", **FAKE}], nats_options=opts)
    await start_daemon(nats_cluster.urls[::-1], node="node-b", pools=[{"id": "beta", **FAKE}], nats_options=opts)
    for url in nats_cluster.urls:
        client = PoolClient(await nats_connect(url), prefix=prefix)
        for pool, node in (("alpha", "node-a"), ("beta", "node-b")):
            reply = await client.status(pool)
            assert isinstance(reply, StatusReply), reply
            assert reply.pool.node == node
    nc = await nats_connect(nats_cluster.urls)
    info = await nc.jetstream().stream_info(STREAM_NAME)
    assert info.config.num_replicas == 3
    kv = await nc.jetstream().stream_info(f"KV_{KV_BUCKET}")
    assert kv.config.num_replicas == 3
    await asyncio.sleep(0)  # ok: one loop turn so the daemons' flushes settle before teardown


async def test_two_daemons_starting_at_once_on_a_fresh_cluster_both_start(
    nats_cluster: NatsCluster, start_daemon: StartDaemon
) -> None:
    # Both create the replicated stream and buckets at the same moment; the create answered first
    # used to meet a bucket with no leader yet, and its first read timed out the start-up.
    opts = {"replicas": 3}
    a, b = await asyncio.gather(
        start_daemon(nats_cluster.urls, node="node-a", pools=[{"id": "alpha", **FAKE}], nats_options=opts),
        start_daemon(nats_cluster.urls[::-1], node="node-b", pools=[{"id": "beta", **FAKE}], nats_options=opts),
    )
    assert a.ready.is_set() and b.ready.is_set()
    assert a.fenced == {} and b.fenced == {}
