"""``pool-managerd fleet-demo``: two hosts on a 3-node NATS cluster, no Docker, no GPU.

What it shows, each step driven over NATS as a client service would:

1. a 3-node nats-server cluster on loopback (routes, JetStream, the shipped users and
   permissions on every node), the event stream and the snapshot bucket with 3 replicas;
2. two daemons as separate processes with their own node ids and run dirs, standing for two
   hosts: ``node-a`` owns ``chat``, ``node-b`` owns ``embed`` and is a standby for ``chat``;
3. a preload of ``chat`` on ``node-a`` and the fleet table (``ctl nodes``/``ctl pools``);
4. the owner killed as a host dies: ``node-a``'s daemon and its engine SIGKILLed;
5. the standby taking ``chat`` over (lease expiry, claim, recovery from the stream, its own
   engine) — only where this build has standby takeover (:func:`takeover_supported`);
   otherwise the step says it is skipped, and ``chat`` stays with its dead owner;
6. ``pool-managerd replay`` over the whole history (exit 0: no broken invariant), and the final
   fleet table with ``node-a`` marked stale.

``--non-interactive`` (the default without a terminal) runs straight through; CI runs it.
Exit status 0 when every step held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from pool_managerd.cli.tour import Narrator, add_mode_arguments, run_tour
from pool_managerd.contract.messages import (
    EVENT_DECODER,
    Accepted,
    DaemonStarted,
    Event,
    NodeHeartbeat,
    Rejected,
    StateChanged,
)
from pool_managerd.testing.toml_config import toml_value

NODES = ("node-a", "node-b")
OWNER, STANDBY = NODES
HEARTBEAT_S = 1.0
LEASE_TTL_S = 4.0
LEASE_MARGIN_S = 1.0
GIB = 1 << 30

CHAT: dict[str, Any] = {"id": "chat", "engine": "fake", "model": "llama-3.1-8b-q8", "model_bytes": 8 * GIB,
                        "slots": 2, "extra_args": ["--load-time", "0.3"], "stop_grace_s": 2.0}  # fmt: skip
EMBED: dict[str, Any] = {"id": "embed", "engine": "fake", "model": "bge-large", "model_bytes": 2 * GIB,
                         "slots": 4, "extra_args": ["--load-time", "0.2"], "stop_grace_s": 2.0}  # fmt: skip


def takeover_supported() -> bool:
    """Whether this build lets a pool list standby nodes (``pools[].standby``).

    The takeover step of the demo runs only then; without it the standby cannot be configured
    for ``chat`` at all (listing the pool on both nodes would have both serve it)."""
    from pool_managerd.config import PoolConfig

    return "standby" in PoolConfig.model_fields


def daemon_config(node: str, run_dir: Path, urls: list[str], password: str, pools: list[dict[str, Any]]) -> str:
    """The TOML a host's daemon runs with: every cluster URL, the daemon user, 3 replicas."""
    lines = [f"node = {toml_value(node)}", f"run_dir = {toml_value(str(run_dir))}", 'gpus = "sim:hetero-24g-48g"',
             f"heartbeat_s = {HEARTBEAT_S}", "", "[nats]", f"urls = {toml_value(urls)}", "replicas = 3",
             'user = "daemon"', f"password = {toml_value(password)}", "reconnect_wait_s = 0.2"]  # fmt: skip
    if takeover_supported():
        # Short leases so the takeover happens while you watch (the default lasts 15 s).
        lines += ["", "[ownership]", f"lease_ttl_s = {LEASE_TTL_S}", f"lease_margin_s = {LEASE_MARGIN_S}"]
    for pool in pools:
        lines += ["", "[[pools]]", *(f"{k} = {toml_value(v)}" for k, v in pool.items())]
    return "\n".join(lines) + "\n"


class FleetTour(Narrator):
    """The scripted client side: one admin connection to the whole cluster."""

    def __init__(self, root: Path, interactive: bool) -> None:
        super().__init__(interactive)
        self.root = root
        self.skipped: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, asyncio.Event] = {node: asyncio.Event() for node in NODES}
        self.t0 = time.time()
        self.cluster: Any = None
        self.nc: Any = None
        self.client: Any = None

    async def on_event(self, msg: Any) -> None:
        try:
            event: Event = EVENT_DECODER.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        body = event.body
        if isinstance(body, NodeHeartbeat):
            return
        if isinstance(body, DaemonStarted) and event.node in self.started:
            self.started[event.node].set()
        if isinstance(body, StateChanged):
            line = f"{body.trigger:<15} {body.src} -> {body.dst}" + (f"  ({body.reason})" if body.reason else "")
        else:
            fields = {k: v for k, v in msgspec.structs.asdict(body).items() if v not in (None, [], {}, "")}
            fields.pop("argv", None)
            line = f"{event.type:<15} " + " ".join(f"{k}={v}" for k, v in fields.items())[:110]
        print(f"   {event.ts - self.t0:7.3f}s  {event.node:<7} {event.pool or 'node':<6} #{event.seq:<3} {line}",
              flush=True)  # fmt: skip

    # --- the hosts ---------------------------------------------------------------------------------

    def start_daemon(self, node: str, urls: list[str], password: str, pools: list[dict[str, Any]]) -> None:
        run_dir = self.root / node
        run_dir.mkdir(parents=True, exist_ok=True)
        config = self.root / f"{node}.toml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a password
        try:
            os.write(fd, daemon_config(node, run_dir, urls, password, pools).encode())
        finally:
            os.close(fd)
        log = (self.root / f"{node}.log").open("ab")
        try:
            self.procs[node] = subprocess.Popen(
                [sys.executable, "-m", "pool_managerd", "run", "--config", str(config), "--log-format", "text"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()

    def kill_host(self, node: str, engine_pids: list[int]) -> None:
        """A host dies: its daemon and its engines are gone at once (SIGKILL, no goodbye)."""
        proc = self.procs[node]
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for pid in engine_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # --- views -------------------------------------------------------------------------------------

    async def fleet_table(self, title: str, *, show: bool = True) -> dict[str, str]:
        """Print the fleet (nodes, then pools) as ``ctl nodes`` and ``ctl pools`` do; node → liveness."""
        from pool_managerd.cli.fleet import gather_nodes, liveness, render_nodes
        from pool_managerd.cli.format import render_table

        views, snapshots = await gather_nodes(self.nc, self.client.subjects, timeout=5.0)
        now = time.time()
        status = {v.node: liveness(v, now) for v in views}
        if not show:
            return status
        self.say(title)
        for line in render_nodes(views, now).splitlines():
            print(f"   {line}")
        print()
        for line in render_table(snapshots, {}, now, title="pools", node_status=status).splitlines():
            print(f"   {line}")
        return status

    async def serving_node(self, pool: str) -> tuple[str | None, str | None]:
        from pool_managerd.contract.messages import StatusReply

        reply = await self.client.status(pool, timeout=2.0)
        if isinstance(reply, StatusReply):
            return reply.pool.node, reply.pool.state
        return None, None

    async def preload(self, pool: str) -> Any:
        """Preload ``pool`` and follow it to ready, resending with the same command id while no
        daemon answers yet: a new subscription reaches the other servers of a cluster over the
        routes a moment after its own server has it, and the client may sit on another one."""
        cid = uuid.uuid4().hex
        deadline = time.monotonic() + 10.0
        while True:
            result = await self.client.command_and_wait(pool, "preload", "ready", wait_timeout=30.0, command_id=cid)
            retry = isinstance(result.reply, Rejected) and result.reply.code in ("unknown_pool", "unavailable")
            if not retry or time.monotonic() > deadline:
                return result
            await asyncio.sleep(0.1)  # ok: a client's retry interval

    async def until_serving(self, pool: str, nodes: set[str], within_s: float) -> tuple[str | None, str | None]:
        """Poll ``pool``'s status until one of ``nodes`` says it is ready, or ``within_s`` passes."""
        deadline = time.monotonic() + within_s
        while True:
            node, state = await self.serving_node(pool)
            if (node in nodes and state == "ready") or time.monotonic() > deadline:
                return node, state
            await asyncio.sleep(0.1)  # ok: polling status with a deadline, as a client would

    # --- the tour ------------------------------------------------------------------------------------

    async def run(self, run_dir: Path) -> None:
        import nats

        from pool_managerd import accounts
        from pool_managerd.client import PoolClient
        from pool_managerd.testing.nats_cluster import NatsCluster

        creds = accounts.ensure_credentials(run_dir)
        config = accounts.server_config({role: c.password for role, c in creds.items()})
        self.cluster = NatsCluster(3, store_root=run_dir / "nats", config=config, log_dir=run_dir)
        await asyncio.to_thread(self.cluster.start)
        urls = self.cluster.urls
        accounts.publish_locations(run_dir, creds, ",".join(urls), None)
        self.say(f"1. A 3-node NATS cluster on loopback: {', '.join(urls)}")
        print(f"   meta leader {self.cluster.meta_leader()}; every node enforces the shipped users "
              f"(daemon, admin, operator, viewer); credentials in {run_dir / accounts.AUTH_DIR}")  # fmt: skip
        admin = creds["admin"]
        self.nc = await nats.connect(servers=urls, name="pool-managerd-fleet-demo", user=admin.user,
                                     password=admin.password, inbox_prefix=admin.inbox_prefix,
                                     max_reconnect_attempts=-1, reconnect_time_wait=0.1)  # fmt: skip
        self.client = PoolClient(self.nc, timeout=5.0)
        await self.nc.subscribe("poold.evt.>", cb=self.on_event)
        await self.nc.subscribe("poold.node.*.evt.>", cb=self.on_event)
        await self.nc.flush()
        await self.pause()

        takeover = takeover_supported()
        standby_chat = [{**CHAT, "standby": [STANDBY]}] if takeover else []
        self.say(f"2. Two hosts: {OWNER} owns chat; {STANDBY} owns embed" +
                 (" and is chat's standby" if takeover else ""))  # fmt: skip
        password = creds["daemon"].password
        # The owner first: a pool nobody has claimed yet goes to whichever node claims it first.
        for node in NODES:
            if node == OWNER:
                self.start_daemon(OWNER, urls, password, [{**CHAT, "standby": [STANDBY]}] if takeover else [CHAT])
            else:
                self.start_daemon(STANDBY, urls[::-1], password, [EMBED, *standby_chat])
            try:
                await asyncio.wait_for(self.started[node].wait(), 60)
            except TimeoutError:
                self.fail(f"{node} did not start within 60 s (see {self.root / (node + '.log')})")
                return
        await self.pause()

        self.say(f"3. Preload chat on {OWNER} and embed on {STANDBY}")
        for pool in ("chat", "embed"):
            result = await self.preload(pool)
            if not (isinstance(result.reply, Accepted) and result.reached):
                self.fail(f"preload {pool}: {result.reply} (state {result.state})")
        # The ready event is in the log before the daemon's status shows it (log first, then
        # commit): read status until it agrees, as a client would.
        owner, state = await self.until_serving("chat", {OWNER}, 10.0)
        print(f"   chat is {state} on {owner}")
        await self.fleet_table("The fleet (ctl nodes, ctl pools)")
        await self.pause()

        self.say(f"4. {OWNER} dies: its daemon and its engine are SIGKILLed")
        from pool_managerd.contract.messages import StatusReply

        status = await self.client.status("chat")
        engines = [status.pool.engine.pid] if isinstance(status, StatusReply) and status.pool.engine else []
        killed_at = time.monotonic()
        self.kill_host(OWNER, engines)
        print(f"   killed daemon pid {self.procs[OWNER].pid} and engine pid(s) {engines or '-'}")
        await self.pause()

        if takeover:
            self.say(f"5. {STANDBY} takes chat over once {OWNER}'s lease runs out")
            serving, state = await self.until_serving("chat", {STANDBY}, 60.0)
            if serving == STANDBY and state == "ready":
                print(f"   chat is ready on {STANDBY} {time.monotonic() - killed_at:.1f} s after the kill")
            else:
                self.fail(f"chat not ready on {STANDBY} within 60 s (last: {state} on {serving})")
        else:
            self.say("5. Standby takeover: SKIPPED (this build has no pools[].standby)")
            self.skipped.append("takeover")
            print(f"   chat stays with its dead owner {OWNER}; commands to it time out until it comes back")
        await self.pause()

        self.say(
            "6. The whole history replays cleanly (pool-managerd replay --check-live: exit 0 = no broken "
            "invariant, and every rebuilt state equals its KV snapshot)"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pool_managerd", "replay", "--quiet", "--check-live", "--creds-dir", str(run_dir),
            "--role", "viewer", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        for line in out.decode().strip().splitlines()[-6:]:
            print(f"   {line}")
        print(f"   replay exit status {proc.returncode}")
        if proc.returncode != 0:
            self.fail(f"replay exited {proc.returncode}")

        # The dead host's last beat ages past three periods: the table marks it.
        deadline = time.monotonic() + 30.0
        while True:
            status_by_node = await self.fleet_table("", show=False)
            if status_by_node.get(OWNER) == "stale" or time.monotonic() > deadline:
                break
            await asyncio.sleep(HEARTBEAT_S / 2)  # ok: the stale mark needs the beat to age
        status_by_node = await self.fleet_table(f"The fleet now: {OWNER}'s last heartbeat is older than three beats")
        if status_by_node.get(OWNER) != "stale":
            self.fail(f"{OWNER} not marked stale: {status_by_node}")
        if status_by_node.get(STANDBY) != "live":
            self.fail(f"{STANDBY} not live: {status_by_node}")

    async def close(self) -> None:
        await asyncio.to_thread(self.stop_all)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.cluster is not None:
            self.cluster.close()


async def _main(args: argparse.Namespace) -> int:
    tmp = None
    run_dir: Path | None = args.run_dir
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="poold-fleet-demo-")
        run_dir = Path(tmp.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    print("pool-managerd fleet demo: a 3-node NATS cluster, two daemons, simulated GPUs, fake engines", flush=True)
    tour = FleetTour(run_dir, args.interactive)
    try:
        await tour.run(run_dir)
    finally:
        await tour.close()
        if tmp is not None:
            tmp.cleanup()
    return tour.finish("fleet demo", f" (skipped: {', '.join(tour.skipped)})" if tour.skipped else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fleet-demo`` options."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--run-dir", type=Path, help="keep the run dirs, logs and NATS stores here")
    add_mode_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pool-managerd fleet-demo``."""
    return run_tour(args, _main)
