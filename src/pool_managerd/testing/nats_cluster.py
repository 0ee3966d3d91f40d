"""A real nats-server cluster on loopback: N :class:`NatsServer` processes joined by routes.

Used by the cluster tests, ``bench/fleet_faults.py`` and ``pool-managerd fleet-demo``. Each node
has its own client port, cluster (route) port, monitoring port and JetStream store dir, all
chosen once and kept for every restart, so a node killed with ``kill -9`` comes back with the
same name, address and store and rejoins the cluster as the host it stands for would.

Readiness is observed, never guessed: :meth:`NatsCluster.start` returns once every node logged
``Server is ready`` *and* the JetStream meta group has a leader that every node knows and at
least a quorum of peers is current (read from each node's ``/jsz`` monitoring endpoint).
:meth:`wait_stream_current` waits until every replica of a stream (a KV bucket is the stream
``KV_<bucket>``) is current, which is what "the killed server rejoined" means for the data.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from pool_managerd.adapters.embedded_nats import NatsServer, NatsServerError, free_port
from pool_managerd.adapters.scratch_dir import ScratchDir

__all__ = ["NatsCluster"]

_POLL_S = 0.05
"""How often monitoring endpoints are re-read while waiting (the server offers no push for these)."""


class NatsCluster:
    """``size`` JetStream servers named ``<name>-0`` … on loopback, each routed to all others.

    ``config`` is server configuration text (accounts, users, permissions) given to every node.
    ``store_root=None`` makes a temporary directory removed by :meth:`close`.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "poold",
        store_root: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        config: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.name = name
        self.host = host
        self._scratch = ScratchDir(store_root, "poold-cluster-")
        root = self.store_root = self._scratch.path
        # Every port is chosen before the first node starts: routes name all peers up front.
        self.route_ports = [free_port(host) for _ in range(size)]
        self.servers: list[NatsServer] = []
        for index in range(size):
            routes = ",".join(f"nats://{host}:{port}" for peer, port in enumerate(self.route_ports) if peer != index)
            args = ["--cluster_name", name, "--cluster", f"nats://{host}:{self.route_ports[index]}"]
            if routes:
                args += ["--routes", routes]
            log_file = Path(log_dir) / f"{name}-{index}.log" if log_dir is not None else None
            self.servers.append(
                NatsServer(
                    store_dir=root / f"{name}-{index}",
                    port=free_port(host),
                    host=host,
                    monitor_port=free_port(host),
                    server_name=f"{name}-{index}",
                    extra_args=args,
                    config=config,
                    log_file=log_file,
                )
            )

    # ----------------------------------------------------------------------------- properties

    @property
    def size(self) -> int:
        """How many nodes the cluster has (running or not)."""
        return len(self.servers)

    @property
    def urls(self) -> list[str]:
        """Every node's client URL (what a daemon's ``nats.urls`` lists)."""
        return [server.url for server in self.servers]

    def __getitem__(self, index: int) -> NatsServer:
        return self.servers[index]

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, ready_timeout: float = 30.0) -> Self:
        """Start every node and wait for a JetStream meta leader known to all of them, with every
        node a current peer of it."""
        deadline = time.monotonic() + ready_timeout
        for server in self.servers:
            # Nodes start one after another; routes to peers not up yet are retried by the server.
            server.start(max(1.0, deadline - time.monotonic()))
        # A leader agreed on is not enough: until it counts every node a current peer, a stream
        # with as many replicas as nodes is refused "no suitable peers for placement".
        self.wait_meta_leader(max(1.0, deadline - time.monotonic()), require=range(len(self.servers)))
        return self

    def kill(self, index: int) -> None:
        """``kill -9`` node ``index``: no flush, no goodbye to its peers."""
        self.servers[index].kill()

    def restart(self, index: int, ready_timeout: float = 30.0) -> None:
        """Start node ``index`` again on the same ports and store and wait until it rejoined the
        meta group (a leader it agrees on, itself counted among the current peers)."""
        deadline = time.monotonic() + ready_timeout
        self.servers[index].restart(ready_timeout)
        self.wait_meta_leader(max(1.0, deadline - time.monotonic()), require=[index])

    def close(self) -> None:
        """Kill every node and remove the temporary store root if this object made it."""
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.close()
        self._scratch.cleanup()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ", ".join(f"{s.server_name}={'up' if s.running else 'down'}" for s in self.servers)
        return f"NatsCluster({self.name}: {states})"

    # ----------------------------------------------------------------------------- readiness

    def jsz(self, index: int) -> dict[str, Any] | None:
        """Node ``index``'s ``/jsz`` monitoring document, or None while it cannot be read."""
        server = self.servers[index]
        if not server.running or server.monitor_url is None:
            return None
        try:
            with urllib.request.urlopen(f"{server.monitor_url}/jsz", timeout=2.0) as response:
                doc = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return doc if isinstance(doc, dict) else None

    def meta_leader(self) -> str | None:
        """The meta leader's server name as every running node reports it, or None if they differ."""
        leaders = set()
        for index, server in enumerate(self.servers):
            if not server.running:
                continue
            doc = self.jsz(index)
            meta = (doc or {}).get("meta_cluster") or {}
            leaders.add(meta.get("leader") or None)
        if len(leaders) != 1:
            return None
        return leaders.pop()

    def wait_meta_leader(self, timeout: float = 30.0, *, require: Sequence[int] = ()) -> str:
        """Block until the running nodes agree on a meta leader and every node in ``require``
        is a current peer of it; returns the leader's name."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.meta_leader()
            if leader is not None and self._peers_current(leader, require):
                return leader
            if time.monotonic() >= deadline:
                raise NatsServerError(f"no JetStream meta leader agreed on within {timeout:g} s: {self!r}")
            time.sleep(_POLL_S)  # ok: monitoring endpoints are polled; nothing pushes leader changes

    def _peers_current(self, leader: str, require: Sequence[int]) -> bool:
        if not require:
            return True
        index = next((i for i, s in enumerate(self.servers) if s.server_name == leader), None)
        if index is None:
            return False
        meta = (self.jsz(index) or {}).get("meta_cluster") or {}
        current = {leader} | {
            str(r.get("name")) for r in meta.get("replicas") or [] if r.get("current") and not r.get("offline")
        }
        return all(self.servers[i].server_name in current for i in require)

    def stream_replicas(self, info: Any) -> dict[str, bool]:
        """``{server name: current}`` of a ``StreamInfo`` (leader included, always current)."""
        cluster = info.cluster
        if cluster is None:
            return {}
        result = {str(cluster.leader): True} if cluster.leader else {}
        for peer in cluster.replicas or []:
            result[str(peer.name)] = bool(peer.current) and not bool(peer.offline)
        return result

    async def wait_stream_current(self, js: Any, stream: str, timeout: float = 30.0) -> dict[str, bool]:
        """Wait until ``stream`` has a leader and every node of the cluster is a current replica
        of it; returns the last replica map read. ``js`` is a nats-py ``JetStreamContext``."""
        import asyncio

        import nats.errors
        import nats.js.errors

        names = {server.server_name for server in self.servers}
        deadline = time.monotonic() + timeout
        last: dict[str, bool] = {}
        while True:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError):
                last = self.stream_replicas(await js.stream_info(stream))
                if set(last) >= names and all(last.values()):
                    return last
            if time.monotonic() >= deadline:
                raise NatsServerError(f"stream {stream} replicas not all current within {timeout:g} s: {last}")
            await asyncio.sleep(_POLL_S)  # ok: replica catch-up is only observable by asking
