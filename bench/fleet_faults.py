"""Cluster faults: a 3-node nats-server cluster, two daemons as real processes, kill -9 each server.

``make fleet-faults`` (not part of ``make test``; ``tests/e2e/test_fleet_faults.py`` runs a shortened
version). The cluster runs on loopback with routes and JetStream; the event stream and the
snapshot bucket keep 3 replicas (``nats.replicas = 3``); each daemon (``node-a``, ``node-b``, own
run dir, own pool) is given all three URLs. Clients connected to all three send lease/release
commands and retry each one with the same ``command_id`` until it is answered. Every server is
killed with SIGKILL once, in turn, and started again on the same ports and store.

Checked after the run, once both daemons have stopped gracefully (each flushes its backlog first),
each a count that must be 0:

* **lost events**: an accepted reply names events (``seq``..``last_seq``) that are not in the stream;
* **gaps / duplicates**: a pool's or node's sequence is not contiguous from 1, or repeats;
* **applied twice**: a retried command id granted or released a lease twice;
* **not reconnected**: a daemon not connected to a surviving server within the deadline after
  its server was killed (read from each survivor's ``/connz``);
* **not rejoined**: the restarted server not a current replica of the stream and the buckets;
* **ownership changes**: a pool claimed by another node, or claimed again, because a server died
  (an owner must keep renewing its lease through the survivors).

Figures: commands, retries (attempts beyond the first), and per kill the recovery time (kill →
both daemons connected to survivors and answering status) and the rejoin time (restart → every
replica current). Prints a table and ends with one JSON line (``{"bench": "fleet_faults", ...}``);
exits 1 when an invariant broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.aio.client import Client as NATS

from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.contract.messages import (
    Accepted,
    DaemonStarted,
    Event,
    PoolClaimed,
    Rejected,
    StatusReply,
)
from pool_managerd.contract.subjects import KV_BUCKET, OWNERS_BUCKET, STREAM_NAME, Subjects
from pool_managerd.testing.event_wire import EventWire
from pool_managerd.testing.nats_cluster import NatsCluster
from pool_managerd.testing.recovery_checks import log_checks
from pool_managerd.testing.retrying_client import request_until_answered
from pool_managerd.testing.toml_config import toml_value

NODES = ("node-a", "node-b")
START_S = 60.0
READY_S = 30.0
RECOVER_S = 30.0
# A lease must outlast a JetStream leader election of the ownership bucket (5-8 s here, and a
# renewal caught in one waits out its request timeout first): with the default 15 s lease and
# 2 s margin an owner was seen to lose its lease to a single server's death and claim it anew.
LEASE_TTL_S = 30.0
LEASE_MARGIN_S = 5.0


def _pool(node: str) -> str:
    return f"load-{node.removeprefix('node-')}"


def _owner(pool: str | None) -> str:
    return f"node-{(pool or '').removeprefix('load-')}"


class FleetRig:
    """A 3-node cluster, one client connected to all of it, and one daemon process per node id."""

    def __init__(
        self, root: Path, *, replicas: int = 3, lease_ttl_s: float = LEASE_TTL_S, lease_margin_s: float = LEASE_MARGIN_S
    ) -> None:
        self.root = root
        self.lease = (lease_ttl_s, lease_margin_s)
        self.cluster = NatsCluster(3, store_root=root / "nats", log_dir=root)
        self.replicas = replicas
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.nc: NATS | None = None
        self.wire = EventWire()
        self.retries = 0

    async def __aenter__(self) -> FleetRig:
        await asyncio.to_thread(self.cluster.start)
        self.nc = await nats.connect(servers=self.cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.05,
                                     allow_reconnect=True, error_cb=_quiet, connect_timeout=1)  # fmt: skip
        await self.nc.subscribe("poold.evt.>", cb=self.wire.on_msg)
        await self.nc.subscribe("poold.node.*.evt.>", cb=self.wire.on_msg)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.cluster.close()

    def _config(self, node: str) -> Path:
        pool = {"id": _pool(node), "engine": "fake", "extra_args": ["--load-time", "0.05"], "slots": 4,
                "model_bytes": 1_000_000_000, "stop_grace_s": 2.0}  # fmt: skip
        lines = [f'node = "{node}"', f"run_dir = {toml_value(str(self.root / node))}", 'gpus = "sim:hetero-24g-48g"',
                 "heartbeat_s = 5.0", "", "[nats]", f"urls = {toml_value(self.cluster.urls)}",
                 f"replicas = {self.replicas}", "reconnect_wait_s = 0.2", "",
                 "[ownership]", f"lease_ttl_s = {self.lease[0]}", f"lease_margin_s = {self.lease[1]}", "",
                 "[[pools]]", *(f"{k} = {toml_value(v)}" for k, v in pool.items())]  # fmt: skip
        path = self.root / f"{node}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start(self, node: str) -> None:
        """Start ``node``'s daemon and wait for its ``daemon_started``."""
        mark = len(self.wire.items)
        config = self._config(node)
        fd = os.open(self.root / f"{node}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self.procs[node] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pool_managerd", "run", "--config", str(config), "--log-format", "text",
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(fd)
        await self.wire.wait(lambda e: isinstance(e.body, DaemonStarted) and e.node == node, START_S, mark)

    async def terminate(self, node: str) -> int:
        proc = self.procs[node]
        proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(proc.wait(), 60)

    async def request(self, pool: str, verb: str, payload: dict[str, Any], *, within_s: float = 60.0,
                      attempt_s: float = 1.0) -> Accepted | Rejected | StatusReply:  # fmt: skip
        """Send until answered, the same bytes every time (a client retrying with its command id);
        every attempt after the first counts in ``retries``."""
        assert self.nc is not None
        return await request_until_answered(self.nc, pool, verb, payload, within_s=within_s, attempt_s=attempt_s,
                                            on_retry=self._retried)  # fmt: skip

    def _retried(self) -> None:
        self.retries += 1

    async def until_ready(self, pool: str) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            reply = await self.request(pool, "status", {"command_id": "status"})
            if isinstance(reply, StatusReply) and reply.pool.state == "ready":
                return
            await asyncio.sleep(0.05)  # ok: polling a status with a deadline
        raise TimeoutError(f"{pool} not ready within {READY_S} s")

    def connected(self) -> dict[str, str]:
        """``{node: server name}`` for every daemon connection the running servers list."""
        found: dict[str, str] = {}
        for server in self.cluster.servers:
            if not server.running or server.monitor_url is None:
                continue
            try:
                with urllib.request.urlopen(f"{server.monitor_url}/connz?limit=1024", timeout=2.0) as response:
                    doc = json.loads(response.read())
            except (OSError, ValueError):
                continue
            for conn in doc.get("connections") or []:
                name = str(conn.get("name") or "")
                if name.startswith("pool-managerd-"):
                    found[name.removeprefix("pool-managerd-")] = str(server.server_name)
        return found

    async def until_reconnected(self, killed: str) -> dict[str, str]:
        """Wait until every daemon is connected to a running server other than ``killed``."""
        deadline = time.monotonic() + RECOVER_S
        while True:
            where = await asyncio.to_thread(self.connected)
            if all(where.get(node) not in (None, killed) for node in NODES):
                return where
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemons not reconnected to survivors within {RECOVER_S} s: {where}")
            await asyncio.sleep(0.05)  # ok: /connz is polled; nothing pushes connection changes

    async def stream(self) -> list[Event]:
        """Every event in the stream, read again while it answers "unavailable" (a restarted
        server's stream may still be electing its leader)."""
        assert self.nc is not None
        deadline = time.monotonic() + RECOVER_S
        while True:
            try:
                return [event async for _, event in read_events(self.nc, Subjects())]
            except nats.js.errors.ServiceUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)  # ok: a leader election has no event to wait on


async def _quiet(exc: Exception) -> None:
    pass


async def fleet_kills(
    root: Path,
    *,
    load_s: float,
    clients_per_pool: int = 2,
    lease_ttl_s: float = LEASE_TTL_S,
    lease_margin_s: float = LEASE_MARGIN_S,
) -> dict[str, Any]:
    """Kill each of the three servers once under load; the figures and the invariant counts."""
    async with FleetRig(root, lease_ttl_s=lease_ttl_s, lease_margin_s=lease_margin_s) as rig:
        for node in NODES:
            await rig.start(node)
        pools = [_pool(node) for node in NODES]
        for pool in pools:
            await rig.request(pool, "preload", {"command_id": f"pre-{pool}"})
        for pool in pools:
            await rig.until_ready(pool)
        assert rig.nc is not None
        js = rig.nc.jetstream()
        streams = (STREAM_NAME, f"KV_{KV_BUCKET}", f"KV_{OWNERS_BUCKET}")
        for stream in streams:
            await rig.cluster.wait_stream_current(js, stream)
        rig.retries = 0
        stop = asyncio.Event()
        replies: list[Accepted] = []
        sent = 0

        async def client(n: int) -> None:
            nonlocal sent
            pool = pools[n % len(pools)]
            while not stop.is_set():
                cid = uuid.uuid4().hex
                sent += 1
                lease = await rig.request(pool, "lease", {"command_id": cid, "ttl_s": 60.0})
                if isinstance(lease, Accepted):
                    replies.append(lease)
                    sent += 1
                    rel = await rig.request(pool, "release", {"command_id": f"r-{cid}", "lease_id": lease.lease_id})
                    if isinstance(rel, Accepted):
                        replies.append(rel)

        t_load = time.time()
        kill_times: list[float] = []
        tasks = [asyncio.ensure_future(client(n)) for n in range(clients_per_pool * len(pools))]
        kills: list[dict[str, Any]] = []
        moved: set[str] = set()
        not_reconnected = not_rejoined = 0
        try:
            for index in range(rig.cluster.size):
                await asyncio.sleep(load_s)  # ok: load runs between faults
                name = str(rig.cluster[index].server_name)
                before = await asyncio.to_thread(rig.connected)
                at = len(replies)
                t0 = time.monotonic()
                rig.cluster.kill(index)
                kill_times.append(round(time.time() - t_load, 1))
                try:
                    after = await rig.until_reconnected(name)
                except TimeoutError:
                    not_reconnected += 1
                    after = {}
                moved |= {node for node in NODES if before.get(node) == name and after.get(node)}
                for pool in pools:
                    await rig.request(pool, "status", {"command_id": "status"})
                recovery = time.monotonic() - t0
                # A write through the survivors: the stream (and its leader, if it was there) is back.
                for pool in pools:
                    sent += 1
                    probe = await rig.request(pool, "lease", {"command_id": f"probe-{index}-{pool}", "ttl_s": 1.0})
                    if isinstance(probe, Accepted):
                        replies.append(probe)
                write_recovery = time.monotonic() - t0
                await asyncio.sleep(load_s / 2)  # ok: load runs on the two survivors
                t1 = time.monotonic()
                await asyncio.to_thread(rig.cluster.restart, index)
                try:
                    for stream in streams:
                        await rig.cluster.wait_stream_current(js, stream, RECOVER_S)
                except Exception:
                    not_rejoined += 1
                kills.append({"server": name, "daemons_on_it": sorted(n for n in NODES if before.get(n) == name),
                              "recovery_s": round(recovery, 3),
                              "write_recovery_s": round(write_recovery, 3), "rejoin_s": round(time.monotonic() - t1, 3),
                              "accepted_meanwhile": len(replies) - at})  # fmt: skip
            await asyncio.sleep(load_s)  # ok: load after the last fault
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Stopped gracefully first, each daemon flushing its backlog: an event accepted past the
        # 2 s ack bound just after the last kill may still be queued when the load ends, and is
        # lost only if it is not in the stream once its daemon has stopped.
        rcs = [await rig.terminate(node) for node in NODES]
        events = await rig.stream()
        stored = {(e.pool, e.seq) for e in events}
        missing = [(r.pool, s, r.verb) for r in replies for s in range(r.seq, max(r.seq, r.last_seq) + 1)
                   if (r.pool, s) not in stored]  # fmt: skip
        lost = len(missing)
        checks = log_checks(events)
        # A server dying must not cost an owner its lease: one claim per pool, by its own node.
        claimed = [e for e in events if isinstance(e.body, PoolClaimed)]
        claims = [(e.pool, e.body.node) for e in claimed]
        ownership_changes = sum(1 for pool, node in claims if node != _owner(pool)) + max(0, len(claims) - len(pools))
        claim_log = [f"{e.pool} {e.body.node} epoch {e.body.epoch} at +{e.ts - t_load:.1f}s" for e in claimed]
    return {"kills": kills, "commands": sent, "accepted": len(replies), "retries": rig.retries,
            "events": len(events), **checks, "lost_events": lost, "not_reconnected": not_reconnected,
            "not_rejoined": not_rejoined, "daemons_moved": sorted(moved), "ownership_changes": ownership_changes,
            "claims": claim_log, "lost_detail": [f"{p} #{q} ({v})" for p, q, v in missing[:10]],
            "kill_times_s": kill_times,
            "exit_status": max(rcs)}  # fmt: skip


def problems(result: dict[str, Any]) -> list[str]:
    """Every broken invariant of a run, by name."""
    keys = (
        "gaps",
        "duplicates",
        "applied_twice",
        "lost_events",
        "not_reconnected",
        "not_rejoined",
        "ownership_changes",
        "exit_status",
    )
    bad = [f"{key}={result[key]}" for key in keys if result[key]]
    if len(result["kills"]) != 3:
        bad.append(f"kills={len(result['kills'])}")
    return bad


def report(result: dict[str, Any]) -> str:
    rows = [("killed", "daemons on it", "reconnected+status s", "first write s", "rejoin s", "accepted meanwhile")]
    for kill in result["kills"]:
        rows.append((kill["server"], ",".join(kill["daemons_on_it"]) or "-", f"{kill['recovery_s']:.3f}",
                     f"{kill['write_recovery_s']:.3f}", f"{kill['rejoin_s']:.3f}",
                     str(kill["accepted_meanwhile"])))  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)) for r in rows]
    lines.append("")
    lines.append(
        f"{result['commands']} commands, {result['accepted']} accepted, {result['retries']} retries, "
        f"{result['events']} events; lost {result['lost_events']}, gaps {result['gaps']}, "
        f"dups {result['duplicates']}, applied twice {result['applied_twice']}, "
        f"not reconnected {result['not_reconnected']}, not rejoined {result['not_rejoined']}, "
        f"ownership changes {result['ownership_changes']}; "
        f"daemons that moved server: {', '.join(result['daemons_moved']) or 'none'}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-s", type=float, default=5.0, help="seconds of load before each kill (default 5)")
    parser.add_argument("--lease-ttl", type=float, default=LEASE_TTL_S, help=f"lease_ttl_s (default {LEASE_TTL_S})")
    parser.add_argument("--lease-margin", type=float, default=LEASE_MARGIN_S,
                        help=f"lease_margin_s (default {LEASE_MARGIN_S})")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poold-fleet-faults-") as tmp:
        result = asyncio.run(fleet_kills(Path(tmp), load_s=args.load_s, lease_ttl_s=args.lease_ttl,
                                         lease_margin_s=args.lease_margin))  # fmt: skip
    print(report(result))
    bad = problems(result)
    print(json.dumps({"bench": "fleet_faults", **result, "problems": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
