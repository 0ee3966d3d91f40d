"""The daemon: NATS wiring around the pool runtime.

Start-up: connect (or start an embedded nats-server), check the server is at least
:data:`~pool_managerd.contract.nats_version.NATS_SERVER_FLOOR` (below it: :class:`NatsServerTooOld`
before anything is created or spawned), ensure the event stream and KV bucket,
claim the configured pools (a pool another live node writes is fenced here), recover each pool
from its events, then serve commands through ``nats.micro`` and consume health reports.
Shutdown (SIGTERM/SIGINT): stop taking commands, stop or leave engines, flush events, exit 0.

This module holds what the daemon is made of and the order :meth:`Daemon.start` wires it in;
the steps live beside it: :mod:`~pool_managerd.runtime.connection` (the embedded server, the
connect, the connection's callbacks), :mod:`~pool_managerd.runtime.startup` (storage, the node
event sequence, recovery), :mod:`~pool_managerd.runtime.claims` (ownership hand-overs) and
:mod:`~pool_managerd.runtime.shutdown` (the graceful stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from nats.aio.client import Client as NATS

from pool_managerd import __version__
from pool_managerd.accounts import Credentials
from pool_managerd.adapters.audit import AuditLog, ensure_audit_stream
from pool_managerd.adapters.eventlog.errors import EventLogError
from pool_managerd.adapters.eventlog.publisher import EventPublisher
from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.adapters.replication import (
    stream_replicas,
)
from pool_managerd.config import DaemonConfig
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import (
    DaemonStarted,
    EventBody,
    GpuSnapshot,
    HealthReport,
)
from pool_managerd.contract.messages import PoolFenced as PoolFencedEvent
from pool_managerd.contract.nats_version import (
    NATS_SERVER_FLOOR_TEXT,
    NatsServerTooOld,
    ServerVersion,
)
from pool_managerd.contract.subjects import Subjects
from pool_managerd.core.definitions import PoolDefinition
from pool_managerd.core.pool_model import Outcome
from pool_managerd.runtime import quarantine
from pool_managerd.runtime.claims import Claims
from pool_managerd.runtime.commands import (
    CommandCache,
)
from pool_managerd.runtime.connection import (
    ConnectionWatch,
    checked_version,
    connect,
    embedded_server,
    flush_through_cancel,
    start_embedded,
)
from pool_managerd.runtime.gpu_node import GpuNode
from pool_managerd.runtime.health import HealthRelay
from pool_managerd.runtime.heartbeat import heartbeat
from pool_managerd.runtime.metrics import Metrics, check_metrics_addr
from pool_managerd.runtime.ownership import OwnershipKeeper
from pool_managerd.runtime.pools import PoolRuntime, RuntimeOptions
from pool_managerd.runtime.recovery import RecoveryReport
from pool_managerd.runtime.service import CommandService
from pool_managerd.runtime.shutdown import shut_down
from pool_managerd.runtime.sink import JetStreamSink, NodeEvents
from pool_managerd.runtime.snapshots import KvWriter
from pool_managerd.runtime.startup import close_before_serving, continue_node_sequence, ensure_storage, recover_pools
from pool_managerd.runtime.tasks import BackgroundTasks

log = logging.getLogger(__name__)


class Daemon:
    """One pool-managerd process."""

    def __init__(self, config: DaemonConfig, *, gpu_snapshot: GpuSnapshot | None = None) -> None:
        self.config = config
        self.node = config.node
        self.subjects = Subjects(config.nats.prefix)
        self.metrics = Metrics()
        self.cache = CommandCache()
        self.nc: NATS | None = None
        self.publisher: EventPublisher | None = None
        self.audit: AuditLog | None = None
        self.snapshots: SnapshotStore | None = None
        self.runtime: PoolRuntime | None = None
        self.commands: CommandService | None = None
        self.embedded: Any = None
        self.url: str | None = None
        self.ws_url: str | None = None
        """The embedded server's websocket listener, when there is one."""
        self.fenced: dict[str, str] = {}
        self.node_events = NodeEvents(self.node)
        self.gpus = GpuNode(config.gpus, config.run_dir, fixed=gpu_snapshot)
        self.tasks = BackgroundTasks()
        self.stopping = asyncio.Event()
        """Set once the daemon is to stop (a signal, :meth:`request_stop`, a lost connection)."""
        self.closed = asyncio.Event()
        """Set once it has stopped (or refused to start): nothing more is left to shut down."""
        self.connection = ConnectionWatch(self)
        self.kv = KvWriter(lambda: self.runtime, lambda: self.snapshots, self.fenced, self.connection.server_supported)
        self.health_sub: Any = None
        """The subscription to the health subjects (observers' view and outside reports)."""
        self.health = HealthRelay(
            node=self.node, subjects=self.subjects, metrics=self.metrics, tasks=self.tasks,
            publish_s=config.health_publish_s,
            external=frozenset(pool.id for pool in config.pools if pool.external_health),
            nc=lambda: self.nc, runtime=lambda: self.runtime,
        )  # fmt: skip
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.recovery: RecoveryReport | None = None
        self.ownership: OwnershipKeeper | None = None
        self.standing_by: dict[str, PoolDefinition] = {}
        """Configured pools another node holds: claimed when their lease is free or lapses."""
        self.claims = Claims(self)
        self.removing: set[str] = set()
        self.server_version: ServerVersion | None = None
        self.incompatible: PoolManagerError | None = None
        self._embedded_auth: Credentials | None = None

    # --- GPU inventory -------------------------------------------------------------------------

    def gpu_source(self) -> GpuSnapshot:
        """The current GPU snapshot: NVML read fresh each time through one reader initialised
        once (nvmlInit costs ~11 ms, a read microseconds), or the simulated inventory with what
        its processes hold; devices marked unhealthy by a fault are flagged (see ``GpuNode``)."""
        return self.gpus.snapshot()

    def simulated(self) -> bool:
        """Whether the GPUs are the simulated inventory (False when none can be read)."""
        try:
            return self.gpu_source().simulated
        except PoolManagerError:
            return False

    # --- start-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, claim pools, recover them, and start serving. Raises on fatal start-up errors."""
        cfg = self.config
        began = time.monotonic()
        if cfg.metrics_addr:
            check_metrics_addr(cfg.metrics_addr)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        urls = list(cfg.nats.urls)
        if not urls:
            urls = [await self._start_embedded()]
        self.url = urls[0]
        self.nc = await self._connect(urls)
        try:
            self.server_version = checked_version(self.nc)
        except NatsServerTooOld as exc:
            # Refuse before the stream, the bucket or any pool exists; nothing here to shut down,
            # and closing on purpose is no lost connection to report.
            self.incompatible = exc
            await close_before_serving(self)
            raise
        js = self.nc.jetstream()
        self.snapshots = await ensure_storage(self, js)
        await ensure_audit_stream(js, self.subjects, max_bytes=cfg.nats.audit_max_bytes,
                                  max_age_s=cfg.nats.event_max_age_s, replicas=stream_replicas(cfg))  # fmt: skip
        self.audit = AuditLog(self.nc, self.subjects, clock=time.monotonic, on_drop=self.metrics.audit_dropped.inc)
        self.publisher = EventPublisher(
            self.nc,
            self.subjects,
            max_backlog=cfg.nats.publish_backlog,
            on_fenced=self.claims.on_fenced,
            may_write=self.connection.server_supported,
            inspect_conflict=quarantine.inspector(self.nc, self.subjects),
        )
        await self.publisher.start()
        await continue_node_sequence(js, self.subjects, self.node_events)
        await self.gpus.recover(js, self.subjects, self.node)
        simulated = self.simulated()
        self.runtime = PoolRuntime(
            JetStreamSink(self.publisher, self.metrics, self.claims.may_append),
            self.gpu_source,
            RuntimeOptions(node=self.node, run_dir=cfg.run_dir),
            health_out=self.health.publish,
            gpu_reader=self.gpus.raw,
            engine_env=self.gpus.engine_env,
        )
        self.runtime.listeners.append(self._after_step)
        self.runtime.probe_listeners.append(self._after_probe)
        self.runtime.on_quarantine = self._on_quarantine
        owned = []
        definitions = list(cfg.definitions())
        claims = await self.claims.claim_pools(definitions)
        for definition in definitions:
            if definition.pool not in claims:
                self.standing_by[definition.pool] = definition
                continue
            self.runtime.add_pool(definition, simulated=simulated)
            owned.append(definition.pool)
        checked = time.monotonic()
        await recover_pools(self, claims)
        recovered = time.monotonic()
        owned = [pool for pool in owned if pool not in self.fenced]
        self.health_sub = await self.nc.subscribe(self.subjects.all_health, cb=self.health.on_message)
        self.commands = CommandService(
            node=self.node, subjects=self.subjects, nc=self.nc, runtime=self.runtime, audit=self.audit,
            metrics=self.metrics, cache=self.cache, tasks=self.tasks, gpus=self.gpus, node_events=self.node_events,
            gpu_source=self.gpu_source, serves=self.claims.serves, fenced=self.fenced, standing_by=self.standing_by,
            removing=self.removing,
        )  # fmt: skip
        await self.snapshots.watch(self.commands.on_snapshot)
        # The catch-all answers "unknown pool" only for pools absent from the bucket: know them first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.snapshots.wait_synced(), 5.0)
        await self.commands.listen_unclaimed()
        self.claims.served = set(owned)
        await self.commands.serve()
        for pool in self.fenced:
            await self.publish_node(PoolFencedEvent(reason=f"pool {pool}: {self.fenced[pool]}", pool=pool))
        await self.publish_node(DaemonStarted(version=__version__, pools=owned, simulated=simulated))
        self.tasks.start(self.kv.run(), "kv-writer")
        heartbeat_loop = heartbeat(
            period_s=cfg.heartbeat_s,
            metrics=self.metrics,
            publisher=self.publisher,
            runtime=self.runtime,
            gpu_source=self.gpu_source,
            publish_node=self.publish_node,
        )
        self.tasks.start(heartbeat_loop, "heartbeat")
        self.gpus.start(self.runtime, self.publish_node, simulated=simulated)
        if cfg.metrics_addr:
            host, port = self.metrics.serve(cfg.metrics_addr)
            log.info("metrics on http://%s:%d/metrics", host, port)
        for pool in owned:
            self.kv.mark_dirty(pool)
        # Every subscription is known to the server before start() returns: a client that sends
        # right after must meet the pool's endpoint, never only the catch-all. nats-py writes a
        # flush's PING straight to the socket while SUBs still wait in its pending buffer for the
        # flusher task, so the first PONG can come back before the server has seen the last SUB
        # (a request sent then met only the catch-all and timed out). By the time that PONG is
        # read the flusher has written them, so a second PING follows them on the wire.
        await flush_through_cancel(self.nc)
        await flush_through_cancel(self.nc)
        self.ready.set()
        log.info("pool-managerd %s on node %s serving %d pool(s) via %s (nats-server %s; supported: %s or newer); "
                 "started in %.2f s (ownership checks %.2f s, recovery %.2f s)", __version__, self.node, len(owned),
                 self.url, self.server_version, NATS_SERVER_FLOOR_TEXT, time.monotonic() - began, checked - began,
                 recovered - checked)  # fmt: skip

    # --- connecting ------------------------------------------------------------------------------

    async def _start_embedded(self) -> str:
        """Start the embedded nats-server (see :func:`embedded_server`); the daemon connects as ``daemon``."""
        server, creds = embedded_server(self.config)
        self.embedded = server  # held before it runs: a stop during start-up stops it too
        await start_embedded(self.config, server, creds)
        self.ws_url = server.ws_url
        self._embedded_auth = creds["daemon"]
        return str(server.url)

    async def _connect(self, urls: list[str]) -> NATS:
        # A method of its own: the one place a test may wrap to see the daemon's wire bytes.
        return await connect(self.config.nats, self.node, urls, auth=self._embedded_auth, watch=self.connection)

    # --- derived state: KV snapshots, metrics, heartbeat -----------------------------------------

    def _after_step(self, pool: str, outcome: Outcome) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        self.metrics.observe(runtime.lifecycle.registry.get(pool), outcome)
        if not outcome.events and self.kv.scheduled(pool):
            # A step without events (a healthy probe) changed at most the probe bookkeeping,
            # and a write that will carry it is already scheduled: no snapshot to build now.
            return
        self.kv.mark_dirty(pool)

    def _after_probe(self, pool: str, report: HealthReport) -> None:
        # What _after_step does for a step without events, without building an Entry.
        if report.latency_ms is not None:
            self.metrics.probe_observed(pool, report.latency_ms)
        if not self.kv.scheduled(pool):
            self.kv.mark_dirty(pool)

    def _on_quarantine(self, pool: str) -> None:
        actor = self.runtime.actors.get(pool) if self.runtime is not None else None
        self.metrics.log_corrupt.labels(pool).set(1 if actor is not None and actor.quarantine else 0)
        self.kv.mark_dirty(pool)

    async def publish_node(self, body: EventBody) -> None:
        """Queue a node event (``poold.node.<node>.evt.<type>``); one that cannot be queued is logged."""
        if self.publisher is None:
            return
        try:
            self.publisher.publish_nowait(self.node_events.make(body))
        except EventLogError as exc:
            log.warning("node event %s not queued: %s", type(body).__name__, exc)

    # --- running and stopping --------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the daemon to stop: :meth:`run_until_stopped` then shuts it down."""
        self.stopping.set()

    async def run_until_stopped(self, *, install_signals: bool = True) -> int:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            # A signal during start-up (a first connect still retrying, a long recovery) ends it.
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stop requested during start-up")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            else:
                starting.result()
                await self.stopping.wait()
        finally:
            for task in (starting, stopping):
                task.cancel()
            await self.stop()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        return self.exit_code

    async def stop(self, *, stop_engines: bool | None = None) -> None:
        """Graceful shutdown: stop taking commands, stop (or leave) engines, flush events.

        ``stop_engines`` None follows ``on_shutdown``; see :func:`~pool_managerd.runtime.shutdown.shut_down`."""
        await shut_down(self, stop_engines=stop_engines)
