"""``pool-managerd demo``: the whole daemon on one machine, no GPU needed.

An embedded nats-server, the simulated ``sim:hetero-24g-48g`` inventory (a 24 GiB and a 48 GiB
GPU of different generations) and the shipped fake engine, driven over NATS exactly as a client
service would: preload three pools (placement plans shown), drain one with a lease held, reload
one, crash one and watch supervision restart it, then print the state table. Every event is
printed as it arrives on ``<prefix>.evt.>``. The tour is a client like any other: it goes through
:class:`~pool_managerd.client.PoolClient` on the configured prefix (``--prefix``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from pool_managerd.cli.tour import Narrator, add_mode_arguments, run_tour
from pool_managerd.client import EventStream, PoolClient
from pool_managerd.contract.messages import (
    Accepted,
    Event,
    InventoryReply,
    PoolSnapshot,
    PoolsReply,
    Rejected,
    StateChanged,
    StatusReply,
)
from pool_managerd.contract.subjects import DEFAULT_PREFIX

GIB = 1 << 30

POOLS: list[dict[str, Any]] = [
    {"id": "embed", "engine": "fake", "model": "bge-large", "model_bytes": 2 * GIB, "device_mask": "0",
     "slots": 4, "extra_args": ["--load-time", "0.3"]},
    {"id": "chat-8b", "engine": "fake", "model": "llama-3.1-8b-q8", "model_bytes": 8 * GIB, "context_bytes": 2 * GIB,
     "slots": 2, "extra_args": ["--load-time", "0.6"]},
    {"id": "big-70b", "engine": "fake", "model": "llama-3.1-70b-q4", "model_bytes": 40 * GIB,
     "context_bytes": 4 * GIB, "device_mask": "0,1", "split_policy": "free", "extra_args": ["--load-time", "0.8"],
     "restart": {"initial_s": 0.5}},
]  # fmt: skip


class Tour(Narrator):
    """The scripted client side of the demo."""

    def __init__(self, client: PoolClient, node: str, interactive: bool) -> None:
        super().__init__(interactive)
        self.client = client
        self.node = node
        self.t0 = time.time()
        self.states: dict[str, str] = {}
        self.changed = asyncio.Condition()

    async def on_event(self, event: Event) -> None:
        body = event.body
        stamp = f"{event.ts - self.t0:7.3f}s"
        if isinstance(body, StateChanged):
            line = f"{body.trigger:<15} {body.src} -> {body.dst}"
            if body.reason:
                line += f"  ({body.reason})"
            async with self.changed:
                self.states[event.pool or ""] = body.dst
                self.changed.notify_all()
        else:
            fields = {k: v for k, v in msgspec.structs.asdict(body).items() if v not in (None, [], {}, "")}
            fields.pop("argv", None)
            line = f"{event.type:<15} " + " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"   {stamp}  {event.pool or 'node':<8} #{event.seq:<3} {line}", flush=True)

    async def follow(self, stream: EventStream) -> None:
        """Print every event of ``stream`` (already subscribed) until cancelled."""
        async for event in stream:
            await self.on_event(event)

    async def cmd(self, pool: str, verb: str, **fields: Any) -> Accepted | Rejected | StatusReply:
        reply = await self.client.command(pool, verb, **fields)
        if isinstance(reply, Rejected):
            print(f"   -> {verb} {pool}: rejected {reply.code}: {reply.message}", flush=True)
        elif isinstance(reply, Accepted):
            print(f"   -> {verb} {pool}: accepted (event #{reply.seq}, now {reply.state})", flush=True)
        return reply

    async def status(self, pool: str) -> PoolSnapshot:
        reply = await self.client.status(pool)
        if not isinstance(reply, StatusReply):
            raise RuntimeError(f"status {pool}: {reply.code}: {reply.message}")
        return reply.pool

    async def wait_state(self, pool: str, state: str, timeout: float = 20.0) -> bool:
        async def reached() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.states.get(pool) == state)

        try:
            await asyncio.wait_for(reached(), timeout)
            return True
        except TimeoutError:
            self.fail(f"{pool} did not reach {state} within {timeout:g} s")
            return False

    async def run(self) -> None:
        inv = await self.client.node(self.node, "inventory")
        if not isinstance(inv, InventoryReply):
            raise RuntimeError(f"inventory of node {self.node}: {inv}")
        self.say(f"GPU inventory of node {self.node} ({inv.gpus.source}, simulated={inv.gpus.simulated})")
        for gpu in inv.gpus.gpus:
            cc = ".".join(map(str, gpu.compute_capability))
            print(f"   GPU{gpu.index} {gpu.name:<28} cc {cc}  {gpu.memory_free / GIB:5.1f} GiB free  {gpu.uuid}")
        await self.pause()

        self.say("1. Preload three pools: each placement is planned against the free memory left")
        for spec in POOLS:
            await self.cmd(spec["id"], "preload")
            snap = await self.status(spec["id"])
            if snap.placement is not None:
                p = snap.placement
                split = f" --tensor-split {p.tensor_split}" if p.tensor_split else ""
                budgets = ", ".join(f"{b / GIB:.1f} GiB" for b in p.budgets)
                print(f"      placement: {len(p.uuids)} GPU(s), budgets [{budgets}]{split}")
                for line in p.explanation:
                    print(f"      plan: {line}")
        for spec in POOLS:
            await self.wait_state(spec["id"], "ready")
        await self.pause()

        self.say("2. Drain chat-8b while a client holds a lease: new leases are refused, the drain waits")
        lease = await self.cmd("chat-8b", "lease", ttl_s=30.0, holder="demo-client")
        await self.cmd("chat-8b", "drain", deadline_s=10.0)
        await self.cmd("chat-8b", "lease", ttl_s=30.0)
        if isinstance(lease, Accepted) and lease.lease_id:
            await asyncio.sleep(0.5)  # the client finishes its request, then releases
            await self.cmd("chat-8b", "release", lease_id=lease.lease_id)
        await self.wait_state("chat-8b", "unready")
        await self.pause()

        self.say("3. Reload embed with a new model: drain, stop, start the new spec, ready again")
        await self.cmd("embed", "reload", model="bge-large-v2", deadline_s=5.0)
        await self.wait_state("embed", "ready")
        snap = await self.status("embed")
        print(f"      embed now serves {snap.model} (engine pid {snap.engine.pid if snap.engine else '-'})")
        await self.pause()

        self.say("4. Crash big-70b's engine (SIGKILL): the exit is seen at once, supervision restarts it")
        snap = await self.status("big-70b")
        if snap.engine is not None:
            os.kill(snap.engine.pid, signal.SIGKILL)
            await self.wait_state("big-70b", "restarting", 5.0)
            await self.wait_state("big-70b", "ready")
        else:
            self.failures.append("big-70b had no engine to crash")
        await self.pause()

        self.say("5. The pools now")
        reply = await self.client.node(self.node, "pools")
        if not isinstance(reply, PoolsReply):
            raise RuntimeError(f"pools of node {self.node}: {reply}")
        print(f"   {'pool':<10} {'state':<11} {'model':<20} {'GPUs':<5} {'leases':<7} {'restarts':<9} last event")
        for snap in reply.pools:
            gpus = len(snap.device_mask)
            leases = f"{snap.active_leases}/{snap.slots_total}"
            print(f"   {snap.pool:<10} {snap.state:<11} {snap.model or '-':<20} {gpus:<5} {leases:<7} "
                  f"{snap.restarts:<9} {snap.last_event or '-'}")  # fmt: skip


async def _main(args: argparse.Namespace) -> int:
    from pool_managerd.config import load_config
    from pool_managerd.runtime.daemon import Daemon

    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="poold-demo-")
        run_dir = Path(tmp.name)
    config = load_config(None, node="demo", run_dir=run_dir, gpus="sim:hetero-24g-48g", pools=POOLS,
                         heartbeat_s=10.0, nats={"urls": [], "prefix": args.prefix})  # fmt: skip
    daemon = Daemon(config)
    print("pool-managerd demo: embedded NATS, simulated GPUs (sim:hetero-24g-48g), fake engines", flush=True)
    await daemon.start()
    import nats

    from pool_managerd.accounts import load_credentials

    assert daemon.url is not None
    # The tour reloads a pool, so it connects as admin: the embedded server enforces the accounts.
    creds = load_credentials(run_dir, "admin")
    nc = await nats.connect(daemon.url, name="pool-managerd-demo", user=creds.user, password=creds.password,
                            inbox_prefix=creds.inbox_prefix)  # fmt: skip
    dashboard = _start_dashboard(args, daemon.ws_url, config.nats.prefix, load_credentials(run_dir, "operator"))
    tour = Tour(PoolClient(nc, prefix=config.nats.prefix, timeout=10.0), config.node, args.interactive)
    # Subscribed before the first command, so the tour sees every event it causes.
    events = tour.client.events()
    await events.start()
    follower = asyncio.create_task(tour.follow(events))
    try:
        await tour.run()
        if args.duration > 0:
            prefix_opt = f" --prefix {args.prefix}" if args.prefix != DEFAULT_PREFIX else ""
            where = f"\n   the dashboard: {dashboard.url}" if dashboard is not None else ""
            print(f"\nThe daemon keeps running for {args.duration:g} s at {daemon.url}; try:{where}\n"
                  f"   pool-managerd ctl status chat-8b --creds-dir {run_dir}{prefix_opt}\n"
                  f"   pool-managerd watch --creds-dir {run_dir}{prefix_opt}", flush=True)  # fmt: skip
            await asyncio.sleep(args.duration)
        if args.interactive and dashboard is not None:
            tour.say(f"The dashboard stays up at {dashboard.url} until you press Enter")
            await tour.pause()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await events.close()
        await nc.close()
        if dashboard is not None:
            dashboard.stop()
        await daemon.stop()
        if tmp is not None:
            tmp.cleanup()
    return tour.finish("demo")


def _start_dashboard(args: argparse.Namespace, ws_url: str | None, prefix: str, creds: Any) -> Any:
    """Serve the web dashboard against the embedded server's websocket, connected as ``creds``'
    user (the demo's operator: commands from the page work, a reload is refused as it would be
    for any operator); None when it cannot be served."""
    if args.dashboard_port is None or ws_url is None:
        return None
    from pool_managerd.dashboard import DashboardError, DashboardServer, PageConfig

    page = PageConfig(server=ws_url, prefix=prefix, user=creds.user, password=creds.password,
                      inbox_prefix=creds.inbox_prefix)  # fmt: skip
    problem: Exception | None = None
    for port in dict.fromkeys((args.dashboard_port, 0)):  # the usual port, else any free one
        try:
            server = DashboardServer(page, port=port).start()
        except DashboardError as exc:
            problem = exc
            continue
        print(f"dashboard: {server.url}  (open it now: the tour's pools change there live)", flush=True)
        return server
    print(f"dashboard not served: {problem}", flush=True)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dashboard-port", type=int, default=8900,
                        help="serve the web dashboard on this port (0: any free one; default %(default)s)")  # fmt: skip
    parser.add_argument("--no-dashboard", dest="dashboard_port", action="store_const", const=None,
                        help="do not serve the web dashboard")  # fmt: skip
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="NATS subject prefix (default %(default)s)")
    parser.add_argument("--duration", type=float, default=0.0, help="keep serving this long after the tour")
    parser.add_argument("--run-dir", type=Path, help="keep the run dir (logs, NATS store) here")
    add_mode_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_tour(args, _main)
