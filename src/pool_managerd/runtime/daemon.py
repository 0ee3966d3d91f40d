"""The daemon: NATS wiring around the pool runtime.

Start-up: connect (or start an embedded nats-server), check the server is at least
:data:`~pool_managerd.contract.nats_version.NATS_SERVER_FLOOR` (below it: :class:`NatsServerTooOld`
before anything is created or spawned), ensure the event stream and KV bucket,
claim the configured pools (a pool another live node writes is fenced here), recover each pool
from its events, then serve commands through ``nats.micro`` and consume health reports.
Shutdown (SIGTERM/SIGINT): stop taking commands, stop or leave engines, flush events, exit 0.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from pool_managerd import __version__
from pool_managerd.accounts import Credentials, inbox_prefix
from pool_managerd.adapters.audit import AuditLog, audit_record, ensure_audit_stream
from pool_managerd.adapters.event_log import (
    BacklogFull,
    EventLogError,
    EventPublisher,
    PoolFenced,
    PoolQuarantined,
    SnapshotStore,
    ensure_stream,
    read_events,
)
from pool_managerd.adapters.nats_connect import first_connect, is_permission_violation
from pool_managerd.adapters.owner_store import OwnerStore
from pool_managerd.adapters.process import SpawnRecord
from pool_managerd.adapters.replication import (
    REPLICA_ERROR_CODES,
    ReplicasUnavailable,
    check_clustered,
    replicas_refused,
    stream_replicas,
)
from pool_managerd.config import DaemonConfig
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.limits import json_problem
from pool_managerd.contract.messages import (
    HEALTH_DECODER,
    SCHEMA_VERSION,
    DaemonStarted,
    DaemonStopping,
    Event,
    EventBody,
    GpuClearCmd,
    GpuClearReply,
    GpuSnapshot,
    HealthReport,
    InventoryCmd,
    InventoryReply,
    LifecycleCmd,
    LogCorrupt,
    NodeHeartbeat,
    PoolsCmd,
    PoolSnapshot,
    PoolsReply,
    PreloadCmd,
    Rejected,
    StopCmd,
    command_fingerprint,
    encode,
)
from pool_managerd.contract.messages import PoolFenced as PoolFencedEvent
from pool_managerd.contract.nats_version import (
    NATS_SERVER_FLOOR_TEXT,
    NatsServerTooOld,
    ServerVersion,
    check_server_version,
)
from pool_managerd.contract.subjects import SERVICE_NAME, STREAM_NAME, Subjects, validate_id
from pool_managerd.core.definitions import PoolDefinition
from pool_managerd.core.inputs import ClaimInput, ReleaseInput
from pool_managerd.core.log_integrity import scan_pool
from pool_managerd.core.ownership import Claim, LeaseTiming, may_take_over
from pool_managerd.core.pool_model import Outcome
from pool_managerd.core.replies import rebuild_replies
from pool_managerd.core.table import describe
from pool_managerd.runtime import logs, quarantine
from pool_managerd.runtime.commands import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    CommandCache,
    CommandError,
    decode_node_command,
    decode_pool_command,
    error_headers,
    rejected_in,
    rejection,
)
from pool_managerd.runtime.gpu_node import GpuNode
from pool_managerd.runtime.metrics import Metrics, check_metrics_addr
from pool_managerd.runtime.ownership import OwnershipKeeper
from pool_managerd.runtime.pools import PoolRuntime, RuntimeOptions
from pool_managerd.runtime.recovery import RecoveryReport, recover, restore_pool

log = logging.getLogger(__name__)

MAX_INFLIGHT_COMMANDS = 1024
"""Commands one daemon works on at once (all pools); past it a command is answered ``overloaded``."""
SHUTDOWN_POOLS_S = 30.0
"""How long shutdown waits for the pools' stops (beyond the longest engine grace period)."""

ACK_BOUND_S = 2.0
"""How long a step waits for its events' PubAcks before running its effects anyway. Normally
events are durable before effects run; while NATS is unreachable the pool keeps working and the
events wait, in order, in the publisher's backlog."""
ORIGIN_HEADER = "Poold-Node"
"""Header naming the node whose prober published a health report; the daemon skips its own."""


class JetStreamSink:
    """The runtime's event sink over :class:`EventPublisher`."""

    def __init__(self, publisher: EventPublisher, metrics: Metrics, may_append: Any = None) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.may_append = may_append
        """``may_append(pool)``: False once this node may no longer write the pool (its lease ran out)."""
        self._behind = 0
        """Steps that went on without their acks in the current backlog episode (0: none)."""

    async def append(self, pool: str, events: Sequence[Event]) -> None:
        futures: list[asyncio.Future[int]] = []
        if self.may_append is not None and not self.may_append(pool):
            raise PoolFenced(pool, "this node does not hold the pool's ownership lease")
        if self._behind and self.publisher.backlog == 0:
            log.info("event log caught up: %d step(s) had gone on before their events were acknowledged",
                     self._behind)  # fmt: skip
            self._behind = 0
        for event in events:
            futures.append(await self._queue(event))
        self.metrics.backlog.set(self.publisher.backlog)
        if futures:
            done, pending = await asyncio.wait(futures, timeout=ACK_BOUND_S)
            if pending:
                # Once per episode (until the backlog drains), not per step: a preload of a
                # thousand pools behind a slow server would otherwise log a thousand warnings.
                if not self._behind:
                    log.warning("pool %s: %d event(s) not yet acknowledged after %.0f s; kept in order in the "
                                "backlog (%d waiting); steps go on meanwhile", pool, len(pending), ACK_BOUND_S,
                                self.publisher.backlog)  # fmt: skip
                self._behind += 1
            fenced: PoolFenced | PoolQuarantined | None = None
            for fut in done:
                exc = fut.exception()
                if isinstance(exc, PoolFenced | PoolQuarantined):
                    fenced = exc
                elif exc is not None:
                    log.error("pool %s: event refused: %s", pool, exc)
            if fenced is not None:
                raise fenced

    async def acknowledge(self, pool: str, corrupt: LogCorrupt, next_seq: int) -> LogCorrupt | None:
        return await quarantine.skip_acknowledged(self.publisher, pool, corrupt, next_seq)

    async def _queue(self, event: Event) -> asyncio.Future[int]:
        waited = 0.0
        while True:
            try:
                return self.publisher.publish_nowait(event)
            except BacklogFull:
                # Wait for room, however long: events are the source of truth and a dropped one
                # would leave a hole in the pool's sequence. The pool's steps wait meanwhile.
                if waited % 10.0 < 0.2:
                    log.error("event backlog full (NATS unreachable?): pool %s waits to append %s",
                              event.pool, event.type)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.publisher.flush(), 0.2)
                waited += 0.2


@dataclass(slots=True)
class NodeEvents:
    """Sequence and envelope for node events (``poold.node.<node>.evt.<type>``)."""

    node: str
    seq: int = 0

    def make(self, body: EventBody) -> Event:
        self.seq += 1
        return Event(v=SCHEMA_VERSION, seq=self.seq, ts=time.time(), node=self.node, pool=None, body=body)


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
        self.service: Service | None = None
        self.embedded: Any = None
        self.url: str | None = None
        self.ws_url: str | None = None
        """The embedded server's websocket listener, when there is one."""
        self.fenced: dict[str, str] = {}
        self._external_health = frozenset(pool.id for pool in config.pools if pool.external_health)
        self.node_events = NodeEvents(self.node)
        self.gpus = GpuNode(config.gpus, config.run_dir, fixed=gpu_snapshot)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()
        self._kv_dirty: dict[str, None] = {}
        self._kv_wake = asyncio.Event()
        self._kv_written: dict[str, _Written] = {}
        self._kv_timers: dict[str, asyncio.TimerHandle] = {}
        self._health_sub: Any = None
        self._health_shown: dict[str, tuple[tuple[object, ...], float]] = {}
        self._served: set[str] = set()
        """Pools whose commands this daemon answers (configured, owned, not fenced)."""
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.recovery: RecoveryReport | None = None
        self.ownership: OwnershipKeeper | None = None
        self.standing_by: dict[str, PoolDefinition] = {}
        """Configured pools another node holds: claimed when their lease is free or lapses."""
        self._released: set[str] = set()
        self.known_pools: set[str] = set()
        self.removing: set[str] = set()
        self._unclaimed_sub: Any = None
        self._inflight = 0
        self.server_version: ServerVersion | None = None
        self.incompatible: PoolManagerError | None = None
        self._supported_for: tuple[object, ...] | None = None
        """The server (version, URL) last found supported."""
        self._embedded_auth: Credentials | None = None

    # --- GPU inventory -------------------------------------------------------------------------

    def gpu_source(self) -> GpuSnapshot:
        """The current GPU snapshot: NVML read fresh each time through one reader initialised
        once (nvmlInit costs ~11 ms, a read microseconds), or the simulated inventory with what
        its processes hold; devices marked unhealthy by a fault are flagged (see ``GpuNode``)."""
        return self.gpus.snapshot()

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
            self.server_version = check_server_version(_reported_version(self.nc), url=_safe_url(self.nc))
        except NatsServerTooOld as exc:
            # Refuse before the stream, the bucket or any pool exists; nothing here to shut down,
            # and closing on purpose is no lost connection to report.
            self.incompatible = exc
            with contextlib.suppress(Exception):
                await self.nc.close()
            if self.embedded is not None:
                self.embedded.stop()
            self._closed.set()
            raise
        js = self.nc.jetstream()
        self.snapshots = await self._ensure_storage(js)
        await ensure_audit_stream(js, self.subjects, max_bytes=cfg.nats.audit_max_bytes,
                                  max_age_s=cfg.nats.event_max_age_s, replicas=stream_replicas(cfg))  # fmt: skip
        self.audit = AuditLog(self.nc, self.subjects, clock=time.monotonic, on_drop=self.metrics.audit_dropped.inc)
        self.publisher = EventPublisher(
            self.nc,
            self.subjects,
            max_backlog=cfg.nats.publish_backlog,
            on_fenced=self._on_fenced,
            may_write=self._server_supported,
            inspect_conflict=quarantine.inspector(self.nc, self.subjects),
        )
        await self.publisher.start()
        await self._continue_node_sequence(js)
        await self.gpus.recover(js, self.subjects, self.node)
        simulated = self._simulated()
        self.runtime = PoolRuntime(
            JetStreamSink(self.publisher, self.metrics, self._may_append),
            self.gpu_source,
            RuntimeOptions(node=self.node, run_dir=cfg.run_dir),
            health_out=self._publish_health,
            gpu_reader=self.gpus.raw,
            engine_env=self.gpus.engine_env,
        )
        self.runtime.listeners.append(self._after_step)
        self.runtime.probe_listeners.append(self._after_probe)
        self.runtime.on_quarantine = self._on_quarantine
        owned = []
        definitions = list(cfg.definitions())
        claims = await self._claim_pools(definitions)
        for definition in definitions:
            if definition.pool not in claims:
                self.standing_by[definition.pool] = definition
                continue
            self.runtime.add_pool(definition, simulated=simulated)
            owned.append(definition.pool)
        checked = time.monotonic()
        await self._recover(claims)
        recovered = time.monotonic()
        owned = [pool for pool in owned if pool not in self.fenced]
        self._health_sub = await self.nc.subscribe(self.subjects.all_health, cb=self._on_health)
        await self.snapshots.watch(self._on_snapshot)
        # The catch-all answers "unknown pool" only for pools absent from the bucket: know them first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.snapshots.wait_synced(), 5.0)
        # Commands for pools nobody serves would otherwise meet only "no responders": answer them
        # with a typed rejection. One daemon of the cluster answers (queue group), and only for
        # ids that are invalid or that no daemon has ever published a snapshot for.
        self._unclaimed_sub = await self.nc.subscribe(
            f"{self.subjects.prefix}.cmd.*.*", queue="poold-unclaimed", cb=self._on_unclaimed
        )
        self.service = await add_service(
            self.nc,
            name=SERVICE_NAME,
            version=__version__,
            description="pool-managerd: GPU inference engine pools",
            metadata={"node": self.node, "schema": str(SCHEMA_VERSION)},
        )
        # One endpoint (one subscription) for every pool of this node, the pool taken from the
        # subject: $SRV.INFO and $SRV.STATS stay the same size whatever the pool count. Every node
        # hears every pool command; the owner answers, the others (and the catch-all, for pools
        # nobody serves) stay silent.
        self._served = set(owned)
        await self.service.add_endpoint(
            EndpointConfig(
                name=f"pools-{self.node}",
                subject=f"{self.subjects.prefix}.cmd.*.*",
                handler=self._on_command,
                queue_group=f"poold-pools-{self.node}",
                metadata={"node": self.node},
            )
        )
        await self.service.add_endpoint(
            EndpointConfig(
                name=f"node-{self.node}",
                subject=f"{self.subjects.prefix}.node.{self.node}.cmd.*",
                handler=self._on_node_command,
                queue_group=f"poold-node-{self.node}",
                metadata={"node": self.node},
            )
        )
        for pool in self.fenced:
            await self._publish_node(PoolFencedEvent(reason=f"pool {pool}: {self.fenced[pool]}", pool=pool))
        await self._publish_node(DaemonStarted(version=__version__, pools=owned, simulated=simulated))
        self._spawn(self._kv_writer(), "kv-writer")
        self._spawn(self._heartbeat(), "heartbeat")
        self.gpus.start(self.runtime, self._publish_node, simulated=simulated)
        if cfg.metrics_addr:
            host, port = self.metrics.serve(cfg.metrics_addr)
            log.info("metrics on http://%s:%d/metrics", host, port)
        for pool in owned:
            self._mark_dirty(pool)
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

    async def _ensure_storage(self, js: nats.js.JetStreamContext) -> SnapshotStore:
        """The event stream and the snapshot bucket, each with ``nats.replicas`` copies.

        A count the server cannot hold is a setup error (exit 2), found before any pool exists.
        """
        replicas = stream_replicas(self.config)
        assert self.nc is not None
        try:
            check_clustered(self.nc._server_info, replicas, url=_safe_url(self.nc) or "the server")
            await ensure_stream(js, self.subjects, self.config.nats.event_max_age_s, replicas)
            return await SnapshotStore.open(js, replicas=replicas)
        except ReplicasUnavailable as exc:
            self.incompatible = exc
            await self._close_before_serving()
            raise
        except nats.js.errors.APIError as exc:
            if exc.err_code not in REPLICA_ERROR_CODES:
                raise
            self.incompatible = replicas_refused(replicas, "the event stream and bucket", exc.description or str(exc))
            await self._close_before_serving()
            raise self.incompatible from None

    async def _close_before_serving(self) -> None:
        with contextlib.suppress(Exception):
            if self.nc is not None:
                await self.nc.close()
        if self.embedded is not None:
            self.embedded.stop()
        self._closed.set()

    def _simulated(self) -> bool:
        try:
            return self.gpu_source().simulated
        except PoolManagerError:
            return False

    async def _start_embedded(self) -> str:
        """Start the embedded nats-server with the shipped accounts and connect as ``daemon``.

        Credentials live in ``<run_dir>/auth`` (0700; one 0600 JSON file per user); ``ctl``,
        ``watch`` and ``demo`` read them with ``--creds-dir <run_dir>``.
        """
        from pool_managerd import accounts
        from pool_managerd.adapters.embedded_nats import NatsServer

        store = self.config.run_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        creds = accounts.ensure_credentials(self.config.run_dir)
        config = accounts.server_config({role: c.password for role, c in creds.items()}, self.config.nats.prefix)
        nats_cfg = self.config.nats
        ws_port = nats_cfg.embedded_websocket_port if nats_cfg.embedded_websocket else None
        self.embedded = NatsServer(
            store_dir=store, log_file=self.config.run_dir / "nats.log", config=config, websocket_port=ws_port
        )
        # Started off the event loop's thread of control: SIGTERM is acted on while it starts.
        await self.embedded.astart()
        # A websocket listener (for browser dashboards), where the server has one.
        self.ws_url = self.embedded.ws_url
        accounts.publish_locations(self.config.run_dir, creds, self.embedded.url, self.ws_url)
        self._embedded_auth = creds["daemon"]
        auth_dir = self.config.run_dir / accounts.AUTH_DIR
        log.info("embedded nats-server (JetStream in %s) at %s, websocket %s; credentials in %s",
                 store, self.embedded.url, self.ws_url, auth_dir)  # fmt: skip
        print(f"embedded NATS at {self.embedded.url}; credentials (admin, operator, viewer) in {auth_dir}:"
              f" pool-managerd ctl --creds-dir {self.config.run_dir} ...", flush=True)  # fmt: skip
        if self.ws_url:
            hint = f"pool-managerd dashboard --creds-dir {self.config.run_dir}"
            print(f"embedded NATS websocket at {self.ws_url}: {hint}", flush=True)
        return str(self.embedded.url)

    async def _connect(self, urls: list[str]) -> NATS:
        cfg = self.config.nats
        opts: dict[str, Any] = {
            "servers": urls,
            "name": cfg.name or f"pool-managerd-{self.node}",
            "connect_timeout": cfg.connect_timeout_s,
            "max_reconnect_attempts": -1,  # never give up on the cluster
            "reconnect_time_wait": cfg.reconnect_wait_s,
            "ping_interval": cfg.ping_interval_s,
            "max_outstanding_pings": cfg.max_outstanding_pings,
            "allow_reconnect": True,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
        }
        if cfg.credentials_file:
            opts["user_credentials"] = str(cfg.credentials_file)
        if cfg.nkey_seed_file:
            opts["nkeys_seed"] = str(cfg.nkey_seed_file)
        if cfg.user:
            opts["user"], opts["password"] = cfg.user, cfg.password
        if cfg.token:
            opts["token"] = cfg.token
        if self._embedded_auth is not None:
            opts["user"], opts["password"] = self._embedded_auth.user, self._embedded_auth.password
        inbox = cfg.inbox_prefix or (inbox_prefix(opts["user"]) if opts.get("user") else None)
        if inbox:
            opts["inbox_prefix"] = inbox
        if cfg.tls_ca_file or cfg.tls_cert_file:
            import ssl

            ctx = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
            if cfg.tls_cert_file and cfg.tls_key_file:
                ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
            opts["tls"] = ctx
        who = ", ".join(urls) + (f" as user {opts['user']!r}" if opts.get("user") else "")
        # The first connect has startup_timeout_s and ends at once on refused credentials or TLS;
        # reconnects after it never stop.
        return await first_connect(opts, timeout=cfg.startup_timeout_s, who=who)

    async def _claim_pools(self, definitions: list[PoolDefinition]) -> dict[str, ClaimInput]:
        """Claim every configured pool whose lease is free or this node's own; the others are
        watched (a lease nobody renews is claimed once it lapses). Starts the lease keeper."""
        assert self.nc is not None
        cfg = self.config
        owners = await OwnerStore.open(self.nc.jetstream(), self.subjects, replicas=stream_replicas(cfg))
        timing = LeaseTiming(cfg.ownership.lease_ttl_s, cfg.ownership.lease_margin_s)
        keeper = OwnershipKeeper(owners, self.node, timing, on_lost=self._on_lease_lost, on_claimed=self._on_claimed)
        self.ownership = keeper
        standby = {pool.id: tuple(pool.standby) for pool in cfg.pools}

        async def claim(pool: str) -> Claim | None:
            return await keeper.try_claim(pool, take_over=may_take_over(self.node, standby.get(pool, ())))

        found = await asyncio.gather(*(claim(d.pool) for d in definitions))
        keeper.start()
        claims: dict[str, ClaimInput] = {}
        for definition, won in zip(definitions, found, strict=True):
            if won is None:
                owner = keeper.owner_of(definition.pool) or "another node"
                self.fenced[definition.pool] = f"its ownership lease is held by {owner}"
                log.info("pool %s is held by %s; not serving it here", definition.pool, owner)
                continue
            claims[definition.pool] = ClaimInput(won.epoch, won.previous_node, won.previous_epoch)
        return claims

    async def _continue_node_sequence(self, js: Any) -> None:
        """Node events continue their sequence across restarts: their Msg-Id must stay unique.

        Starting again at 1 would have the server drop the heartbeats as duplicates within its
        dedupe window (and other nodes judge this one dead), so a sequence that cannot be read
        stops the start-up with the reason instead; a foreign last message is skipped over."""
        subject = self.subjects.node_events(self.node)
        for attempt in range(3):
            try:
                raw = await js.get_last_msg(STREAM_NAME, subject)
                break
            except nats.js.errors.NotFoundError:
                return  # this node never wrote an event: its sequence starts at 1
            except Exception as exc:
                if attempt == 2:
                    raise PoolManagerError(
                        f"cannot read the last sequence of {subject} ({type(exc).__name__}: {exc}); "
                        "refusing to restart node events at 1"
                    ) from None
                await asyncio.sleep(0.5)  # ok: a short retry of a read right after connecting
        try:
            self.node_events.seq = msgspec.json.decode(raw.data or b"{}", type=Event).seq
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # A foreign message there must not keep the daemon from starting. Every node event
            # is one stream message, so the stream's last sequence is past any this node wrote:
            # continuing from it keeps every Msg-Id unique (the node's sequence shows a gap).
            info = await js.stream_info(STREAM_NAME)
            self.node_events.seq = max(info.state.last_seq, raw.seq or 0)
            log.warning("the last message on %s (stream sequence %s) is not an event (%s); node events continue "
                        "from %d", subject, raw.seq, exc, self.node_events.seq)  # fmt: skip

    async def _recover(self, claims: dict[str, ClaimInput]) -> None:
        """Rebuild every pool from its events and reconcile with the engines on this host."""
        assert self.nc is not None and self.runtime is not None and self.publisher is not None
        runtime, publisher = self.runtime, self.publisher
        logged = await self._pools_in_log()
        candidates = list(runtime.actors) + [p for p in logged if p not in runtime.actors and p not in self.fenced
                                             and p not in self.standing_by]  # fmt: skip
        events: dict[str, list[Event]] = {}
        # One pass over the pool events for every pool, not a consumer per pool (~9 ms each, one
        # after another: 9 s for a thousand pools). Messages are judged one by one: a foreign one
        # quarantines its own pool and keeps nothing else from starting.
        entries = await quarantine.read_pool_entries(self.nc, self.subjects, candidates)
        for pool in candidates:
            scan = scan_pool(pool, entries[pool], self.subjects.prefix)
            events[pool] = [event for _, event in scan.events]
            corrupt = scan.quarantine()
            if corrupt is not None:
                log.error("pool %s: quarantined (log_corrupt): %s", pool, corrupt.reason)
                if pool in runtime.actors:
                    runtime.quarantine(pool, corrupt)
            if pool in runtime.actors:
                # Writes continue from exactly what was recovered (foreign messages included: the
                # server's fence counts them): if another daemon appended since, the first write
                # here is refused and this daemon stops acting on the pool.
                publisher.assume(pool, scan.last_stream_seq)

        async def read(pool: str) -> list[Event]:
            return events.get(pool, [])

        removed = [
            p for p in logged if p not in runtime.actors and p in events and _last_writer(events[p]) == self.node
        ]
        for pool, claim in list(claims.items()):
            claims[pool] = await self._above_logged_epochs(pool, claim, events.get(pool, []))
        report = await recover(runtime, read, known_pools=removed, publish_node=self._publish_node, claims=claims)
        for pool, state in report.taken_over.items():
            self._spawn(self._resume(pool, claims[pool].epoch, state), f"resume-{pool}")
        # Exactly once across restarts: the replies of the commands still in the cache window are
        # rebuilt from the log, so a client retrying across the restart gets its first answer.
        since = self.cache.clock() - self.cache.ttl_s
        for pool in runtime.actors:
            for old in rebuild_replies(events.get(pool, []), since=since):
                self.cache.seed(pool, old.command_id, old.fingerprint, encode(old.reply), old.at)
        for pool in report.removed:
            self.removing.add(pool)
            self._spawn(self._forget(pool), f"forget-{pool}")
        self.recovery = report
        if report.violations:
            log.warning("event log violations found during recovery: %s", "; ".join(report.violations[:5]))
        log.info(
            "recovered %d pool(s); adopted %s; exited %s; orphans reaped %s; removed %s",
            len(report.restored), report.adopted, report.exited, report.orphans, report.removed,
        )  # fmt: skip

    def _fence_at_start(self, pool: str, reason: str) -> None:
        self.fenced[pool] = reason
        if self.runtime is not None and pool in self.runtime.actors:
            self.runtime.actors[pool].fenced = True

    async def _forget(self, pool: str) -> None:
        """A pool removed from the configuration: once recovery's drain or stop has made it
        unready, stop serving it entirely (its snapshot goes, commands get unknown_pool)."""
        runtime = self.runtime
        assert runtime is not None
        await runtime.wait_state(pool, frozenset({"unready"}))
        await runtime.remove_pool(pool)
        if self.snapshots is not None:
            with contextlib.suppress(Exception):
                await self.snapshots.delete(pool)
        self.removing.discard(pool)
        log.info("pool %s removed from the configuration: drained, stopped and forgotten", pool)

    async def _pools_in_log(self) -> list[str]:
        assert self.nc is not None
        js = self.nc.jetstream()
        info = await js.stream_info(STREAM_NAME, subjects_filter=self.subjects.all_pool_events)
        pools: set[str] = set()
        for subject in info.state.subjects or {}:
            with contextlib.suppress(PoolManagerError):
                pools.add(self.subjects.parse_pool_event(subject)[0])
        return sorted(pools)

    # --- NATS callbacks --------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if is_permission_violation(exc):
            # The server refused something this daemon needs: the deployment's permissions are short.
            log.error("NATS refused an operation (check the daemon user's permissions): %s", exc)
            return
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._stopping.is_set() and self.incompatible is None:
            log.warning("disconnected from NATS; events wait in the backlog")

    def _server_supported(self) -> bool:
        """Whether the server this client is connected to now may be written to.

        Checked before every event write as well as on reconnect: nats-py reports the reconnect
        only after a round trip, and the publisher may already be writing by then."""
        if self.incompatible is not None:
            return False
        if self.nc is None or not self.nc.is_connected:
            # No verdict mid-reconnect (the new server's INFO may not be in yet); writes wait for
            # the connection anyway and are asked again once it is up.
            return True
        # Asked before every write: the verdict is kept for as long as the server and the version
        # it reports stay the same (parsing them each time cost a tenth of a preload's loop).
        key = (repr(self.nc.connected_server_version), self.nc.connected_url)
        if key == self._supported_for:
            return True
        try:
            check_server_version(_reported_version(self.nc), url=_safe_url(self.nc))
        except NatsServerTooOld as exc:
            self._incompatible_server(exc)
            return False
        self._supported_for = key
        return True

    def _incompatible_server(self, exc: NatsServerTooOld) -> None:
        """A reconnect reached a server below the floor: stand down loudly, exit 2.

        Its writes cannot be fenced, so nothing more is written (events, node events, KV
        snapshots); commands stop being answered; engines are left running, exactly as with
        ``on_shutdown = "leave"``, for a daemon connected to a supported server to adopt."""
        if self.incompatible is not None:
            return
        self.incompatible = exc
        log.error("standing down: %s", exc.message)
        self.exit_code = 2
        self._stopping.set()

    async def _on_reconnected(self) -> None:
        if not self._server_supported():
            return
        log.info("reconnected to NATS")
        if self.snapshots is not None:
            self._spawn(self.snapshots.restart_watch(), "kv-rewatch")
        # The server may have lost what was written (a restart without its store): write anew.
        self._kv_written.clear()
        for pool in list(self.runtime.actors if self.runtime else []):
            self._mark_dirty(pool)

    async def _on_closed(self) -> None:
        if not self._stopping.is_set() and self.incompatible is None:
            log.error("NATS connection closed for good; exiting")
            self.exit_code = 1
            self._stopping.set()

    def _on_fenced(self, pool: str, reason: str) -> None:
        log.error("pool %s fenced: %s", pool, reason)
        self.fenced[pool] = reason
        if self.ownership is not None and self.ownership.tracks(pool):
            # The log's own fence: another node wrote the pool, so whatever the lease says this
            # node stops renewing it and watches it again.
            self.ownership.drop(pool, watch=True)
            self._stand_by(pool)
        if self.runtime is not None and pool in self.runtime.actors:
            self.runtime.actors[pool].fenced = True
        self._spawn(self._stand_down(pool, reason), f"fenced-{pool}")

    async def _stand_down(self, pool: str, reason: str) -> None:
        """Another daemon writes this pool now: stop serving its commands and stop acting on it
        (its engine, probes and timers go; nothing more is written for it)."""
        self._served.discard(pool)  # its commands are the new owner's to answer
        if self.runtime is not None and pool in self.runtime.actors:
            await self.runtime.actors[pool].abandon()
        await self._publish_node(PoolFencedEvent(reason=reason, pool=pool))

    # --- ownership ---------------------------------------------------------------------------------

    def _serves(self, pool: str) -> bool:
        """Whether this node answers and acts for ``pool`` now: it serves the pool and, the pool
        being leased, its lease is fresh by the local clock."""
        if pool not in self._served:
            return False
        keeper = self.ownership
        return keeper is None or not keeper.tracks(pool) or keeper.serving(pool)

    def _may_append(self, pool: str) -> bool:
        if pool in self._released:
            return False
        keeper = self.ownership
        return keeper is None or not keeper.tracks(pool) or keeper.serving(pool)

    def _stand_by(self, pool: str) -> None:
        for definition in self.config.definitions():
            if definition.pool == pool:
                self.standing_by[pool] = definition

    async def _above_logged_epochs(self, pool: str, claim: ClaimInput, events: list[Event]) -> ClaimInput:
        """An epoch above every one the pool's events name (the record may have been lost)."""
        logged = max((e.epoch or 0 for e in events), default=0)
        if claim.epoch > logged or self.ownership is None:
            return claim
        epoch = await self.ownership.raise_epoch(pool, logged + 1)
        return ClaimInput(epoch, claim.previous_node, claim.previous_epoch)

    def _on_lease_lost(self, pool: str, reason: str) -> None:
        """This node may no longer act on ``pool``: stop answering for it and stop its engine now,
        before the lease can lapse for anyone else; then stand by for it."""
        log.error("pool %s: %s; no longer serving it here", pool, reason)
        self._served.discard(pool)
        self.fenced[pool] = f"ownership lease lost: {reason}"
        if self.runtime is not None and pool in self.runtime.actors:
            self.runtime.actors[pool].fenced = True
        self._stand_by(pool)
        self._spawn(self._lose_pool(pool, self.fenced[pool]), f"lease-lost-{pool}")

    async def _lose_pool(self, pool: str, reason: str) -> None:
        await self._stand_down(pool, reason)
        runtime = self.runtime
        if runtime is not None and pool in runtime.actors and pool not in self._served:
            # Nothing of the pool is this node's now: it leaves ``pools`` and the KV writer.
            await runtime.remove_pool(pool)

    async def _on_claimed(self, pool: str, claim: Claim) -> None:
        """This node won a lease it was watching: recover the pool from its log and serve it."""
        await self.ready.wait()  # start-up's own recovery (and its orphan reaping) comes first
        runtime, publisher, nc = self.runtime, self.publisher, self.nc
        definition = self.standing_by.pop(pool, None)
        if runtime is None or publisher is None or nc is None or definition is None or self._stopping.is_set():
            return
        try:
            if pool in runtime.actors:
                await runtime.remove_pool(pool)  # what the lost lease left: abandoned, engine stopped
            pairs = [pair async for pair in read_events(nc, self.subjects, pool=pool)]
        except Exception as exc:
            log.error("pool %s: claimed but its events cannot be read (%s); letting the lease lapse", pool, exc)
            if self.ownership is not None:
                self.ownership.drop(pool, watch=True)
            self.standing_by[pool] = definition
            return
        events = [event for _, event in pairs]
        self.fenced.pop(pool, None)
        publisher.unfence(pool)
        publisher.assume(pool, pairs[-1][0] if pairs else 0)
        start = ClaimInput(claim.epoch, claim.previous_node, claim.previous_epoch)
        start = await self._above_logged_epochs(pool, start, events)
        actor = runtime.add_pool(definition, simulated=self._simulated())
        report = RecoveryReport()
        by_pid = {e.pid: e for e in SpawnRecord.load(runtime.spawn_record.path) if e.pool == pool}
        restore_pool(runtime, actor, events, start, by_pid, report)
        since = self.cache.clock() - self.cache.ttl_s
        for old in rebuild_replies(events, since=since):
            self.cache.seed(pool, old.command_id, old.fingerprint, encode(old.reply), old.at)
        self._served.add(pool)
        self._mark_dirty(pool)
        log.warning("pool %s taken over at epoch %d from %s (%s there)", pool, start.epoch,
                    start.previous_node or "nobody", report.taken_over.get(pool, "nothing running"))  # fmt: skip
        if pool in report.taken_over:
            await self._resume(pool, start.epoch, report.taken_over[pool])

    async def _resume(self, pool: str, epoch: int, state: str) -> None:
        """A pool taken over while it served (or was starting) elsewhere starts its engine here,
        through normal placement on this node's GPUs."""
        if state not in _RESUMED_STATES or self.runtime is None:
            return
        try:
            reply = await self.runtime.command(pool, PreloadCmd(command_id=f"takeover-{self.node}-{epoch}"))
        except PoolManagerError as exc:
            log.error("pool %s: not restarted after the takeover: %s", pool, exc.message)
            return
        if isinstance(reply, Rejected):
            log.error("pool %s: not restarted after the takeover: %s %s", pool, reply.code, reply.message)

    async def _release_pools(self) -> None:
        """A graceful stop with the engines stopped: give every held lease up, its last event
        first (``pool_released``), so another node may claim at once."""
        runtime, keeper = self.runtime, self.ownership
        if runtime is None or keeper is None:
            return
        held = [pool for pool in list(keeper.held) if pool in runtime.actors and not runtime.actors[pool].fenced]
        waits = []
        for pool in held:
            fut = runtime.actors[pool].submit(ReleaseInput(), want_reply=True)
            if fut is not None:
                waits.append(fut)
        if waits:
            await asyncio.wait(waits, timeout=ACK_BOUND_S * 2)
        self._released.update(held)
        self._served.difference_update(held)
        await asyncio.gather(*(keeper.release(pool) for pool in held), return_exceptions=True)

    # --- commands --------------------------------------------------------------------------------

    async def _on_snapshot(self, pool: str, snapshot: object) -> None:
        if snapshot is None:
            self.known_pools.discard(pool)
        else:
            self.known_pools.add(pool)

    async def _on_unclaimed(self, msg: Msg) -> None:
        try:
            pool, verb = self.subjects.parse_command(msg.subject)
        except PoolManagerError as exc:
            await self._reply_unclaimed(msg, rejection(exc.code, exc.message))
            return
        if pool in self.removing:
            message = f"pool {pool!r} was removed from node {self.node}'s configuration and is being drained"
            await self._reply_unclaimed(msg, rejection("unknown_pool", message, pool=pool, verb=verb))
            return
        if (self.runtime is None or pool in self.runtime.actors or pool in self.fenced or pool in self.known_pools
                or pool in self.standing_by):  # fmt: skip
            return  # its owner answers
        await self._reply_unclaimed(
            msg, rejection("unknown_pool", f"no daemon serves pool {pool!r}", pool=pool, verb=verb)
        )

    async def _reply_unclaimed(self, msg: Msg, reply: Rejected) -> None:
        # Not a micro endpoint, so nothing counts it in $SRV.STATS; the headers still say "error".
        self._audit(reply)
        if msg.reply and self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, encode(reply), headers=error_headers(reply))

    async def _on_command(self, req: Request) -> None:
        # Handlers of one subscription run one at a time: answer in a task so a slow command
        # (a preload gathering host facts) never holds up the next status read.
        msg_headers = req.headers or {}
        subject = req.subject
        data = req.data
        traceparent = msg_headers.get("traceparent")
        try:
            pool, verb = self.subjects.parse_command(subject)
        except PoolManagerError:
            return  # the catch-all answers malformed subjects
        if not self._serves(pool):
            # Another node's pool, nobody's, or one whose lease this node can no longer vouch
            # for (checked on the local clock, no round trip): its owner or the catch-all answers.
            return
        if self._inflight >= MAX_INFLIGHT_COMMANDS:
            # Bounded work per daemon: past it a client is told to come back, at once.
            busy = rejection("overloaded", f"node {self.node} has {self._inflight} commands in flight; retry later",
                             pool=pool, verb=verb)  # fmt: skip
            await self._respond(req, busy, verb, f"pools-{self.node}")
            return
        if verb == "status" and len(data) <= 2 and self.runtime is not None and pool not in self.fenced:
            # Fast path for the commonest read: no task, no cache.
            try:
                reply = await self.runtime.command(pool, decode_pool_command(verb, data))
                if self._serves(pool):
                    await self._respond(req, reply, verb, f"pools-{self.node}")
                return
            except PoolManagerError:
                pass
        self._inflight += 1
        self._spawn(self._command(req, pool, verb, data, traceparent), f"cmd-{pool}-{verb}")

    async def _command(self, req: Request, pool: str, verb: str, data: bytes, traceparent: str | None) -> None:
        try:
            await self._command_inner(req, pool, verb, data, traceparent)
        finally:
            self._inflight -= 1

    async def _command_inner(self, req: Request, pool: str, verb: str, data: bytes, traceparent: str | None) -> None:
        token = logs.pool_var.set(pool)
        logs.trace_var.set(logs.trace_id(traceparent))
        try:
            try:
                cmd = decode_pool_command(verb, data)
            except CommandError as exc:
                reply = rejection(exc.code, exc.message, pool=pool, verb=verb)
                await self._respond(req, reply, verb, f"pools-{self.node}")
                return
            logs.command_var.set(cmd.command_id)
            runtime = self.runtime
            assert runtime is not None
            if pool in self.fenced or pool not in runtime.actors:
                if pool in self.fenced:
                    code, message = "fenced", f"pool {pool!r} is fenced on node {self.node}: {self.fenced[pool]}"
                else:
                    code, message = "unknown_pool", f"unknown pool {pool!r}"
                reply = rejection(code, message, pool=pool, verb=verb, command_id=cmd.command_id)
                await self._respond(req, reply, verb, f"pools-{self.node}")
                return

            async def apply() -> bytes:
                return encode(await runtime.command(pool, cmd, traceparent))

            try:
                if verb == "status":
                    body = await apply()
                else:
                    # The verb is part of what was asked: the same id with another verb is a conflict.
                    # A retry is the same command when it decodes to the same values (key order,
                    # whitespace and defaults spelled out do not matter); the verb is part of it.
                    body = await self.cache.run(pool, cmd.command_id, command_fingerprint(cmd), apply)
                    if body.startswith(b'{"type":"rejected"') and (
                        b'"code":"overloaded"' in body or b'"code":"log_corrupt"' in body
                    ):
                        self.cache.forget(pool, cmd.command_id)  # not applied: a retry may be
            except PoolManagerError as exc:
                body = encode(rejection(exc.code, exc.message, pool=pool, verb=verb, command_id=cmd.command_id))
            except Exception:
                log.exception("command %s on pool %s failed", verb, pool)
                message = "internal error; see the daemon log"
                body = encode(rejection("internal", message, pool=pool, verb=verb, command_id=cmd.command_id))
            if not self._serves(pool):
                return  # the lease ran out meanwhile: the new owner answers a retry (from the log)
            await self._respond_raw(req, body, verb, f"pools-{self.node}")
        finally:
            logs.pool_var.reset(token)

    async def _respond(self, req: Request, reply: msgspec.Struct, verb: str, endpoint: str | None) -> None:
        await self._respond_raw(req, encode(reply), verb, endpoint)

    async def _respond_raw(self, req: Request, body: bytes, verb: str, endpoint: str | None) -> None:
        """Send a reply. A rejection keeps its typed body and follows the nats micro error
        convention as well: error headers, and counted as an error of ``endpoint``."""
        rejected = rejected_in(body)
        self.metrics.commands.labels(verb if verb in _KNOWN_VERBS else "other", "rejected" if rejected else "ok").inc()
        if rejected is not None:
            self._audit(rejected)
        headers = error_headers(rejected) if rejected is not None else None
        if headers is not None and endpoint is not None:
            self._count_error(endpoint, headers)
        try:
            await req.respond(body, headers=headers)
        except Exception as exc:
            log.warning("could not send reply: %s", exc)

    def _audit(self, rejected: Rejected) -> None:
        """A refused command goes to metrics, the audit stream and (summed up) the log; never
        to the pool's history, since it changed nothing."""
        self.metrics.refused.labels(rejected.code).inc()
        if self.audit is not None:
            self.audit.record(audit_record(self.node, rejected))

    def _count_error(self, endpoint: str, headers: dict[str, str]) -> None:
        # nats-py counts an endpoint error only when the handler raises, and then replies with an
        # empty body; the typed rejection must stay the body, so the count is kept here, in the
        # endpoint's own statistics that $SRV.STATS reports (as nats-py would: "code:description").
        if self.service is None:
            return
        for ep in self.service._endpoints:
            if ep._name == endpoint:
                ep._num_errors += 1
                ep._last_error = f"{headers[ERROR_CODE_HEADER]}:{headers[ERROR_HEADER]}"
                return

    async def _on_node_command(self, req: Request) -> None:
        try:
            _node, verb = self.subjects.parse_node_command(req.subject)
            cmd = decode_node_command(verb, req.data)
            runtime = self.runtime
            assert runtime is not None
            reply: msgspec.Struct
            if isinstance(cmd, InventoryCmd):
                try:
                    reply = InventoryReply(node=self.node, gpus=self.gpu_source())
                except PoolManagerError as exc:
                    reply = Rejected(verb=verb, code="unavailable", message=exc.message)
            elif isinstance(cmd, LifecycleCmd):
                reply = describe()
            elif isinstance(cmd, GpuClearCmd):
                cleared = await self.gpus.clear(cmd.uuid)
                reply = GpuClearReply(node=self.node, uuid=cmd.uuid, cleared=cleared,
                                      seq=self.node_events.seq if cleared else None)  # fmt: skip
            else:
                await self._respond_raw(req, self._pools_page(cmd), "node", f"node-{self.node}")
                return
        except PoolManagerError as exc:
            reply = rejection(exc.code, exc.message)
        except Exception:
            # Never exception text on the wire (nats micro would send it as Nats-Service-Error).
            log.exception("node command on %s failed", req.subject)
            reply = rejection("internal", "internal error; see the daemon log")
        await self._respond(req, reply, "node", f"node-{self.node}")

    def _pools_page(self, cmd: PoolsCmd) -> bytes:
        """One page of the ``pools`` reply, never over the server's max payload."""
        runtime = self.runtime
        assert runtime is not None
        snaps = sorted(map(runtime.overlay, runtime.lifecycle.registry.snapshots()), key=lambda s: s.pool)
        start = 0 if cmd.after is None else bisect.bisect_right([s.pool for s in snaps], cmd.after)
        budget = (self.nc.max_payload if self.nc is not None and self.nc.max_payload else 1024 * 1024) - 4096
        count = min(cmd.limit, len(snaps) - start)
        while True:
            page = snaps[start : start + count]
            more = start + count < len(snaps)
            body = encode(PoolsReply(node=self.node, pools=page, next=page[-1].pool if more and page else None,
                                     total=len(snaps)))  # fmt: skip
            if len(body) <= budget or count <= 1:
                return body
            count //= 2

    # --- health ----------------------------------------------------------------------------------

    def _publish_health(self, report: HealthReport) -> None:
        """Show our prober's results to observers on ``poold.health.<pool>``: when the outcome
        changes, else at most once per ``health_publish_s`` per pool. The pool already has the
        result (the prober feeds it directly), so a healthy probe costs no NATS message."""
        if self.nc is None or not self.nc.is_connected:
            return
        key = (report.ok, report.loading, report.status, report.error, report.engine_pid)
        now = time.monotonic()
        last = self._health_shown.get(report.pool)
        if last is not None and last[0] == key and now - last[1] < self.config.health_publish_s:
            return
        self._health_shown[report.pool] = (key, now)
        self._spawn(
            self.nc.publish(self.subjects.health(report.pool), encode(report), headers={ORIGIN_HEADER: self.node}),
            "health-pub",
        )

    async def _on_health(self, msg: Msg) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        if msg.headers and msg.headers.get(ORIGIN_HEADER) == self.node:
            return  # our own prober's, shown to observers: the pool had it first
        try:
            pool = self.subjects.parse_health(msg.subject)
            problem = json_problem(msg.data)
            if problem is not None:
                raise msgspec.DecodeError(problem[1])
            report = HEALTH_DECODER.decode(msg.data)
            validate_id(report.pool, "pool")
        except (PoolManagerError, msgspec.DecodeError, RecursionError) as exc:
            log.warning("ignored malformed health report on %s: %s", msg.subject, exc)
            self.metrics.health_ignored.inc()
            return
        # Readiness comes from our own prober only; an outside report may at most count as a failed
        # probe, and only for a pool whose configuration asks for that.
        if report.pool != pool or report.ok or pool not in self._external_health:
            self.metrics.health_ignored.inc()
            return
        if not runtime.health_report(report):
            self.metrics.health_ignored.inc()
            self.metrics.health_outside_dropped.inc()

    # --- derived state: KV snapshots, metrics, heartbeat -----------------------------------------

    def _after_step(self, pool: str, outcome: Outcome) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        self.metrics.observe(runtime.lifecycle.registry.get(pool), outcome)
        if not outcome.events and pool in self._kv_timers:
            # A step without events (a healthy probe) changed at most the probe bookkeeping,
            # and a write that will carry it is already scheduled: no snapshot to build now.
            return
        self._mark_dirty(pool)

    def _after_probe(self, pool: str, report: HealthReport) -> None:
        # What _after_step does for a step without events, without building an Entry.
        if report.latency_ms is not None:
            self.metrics.probe_observed(pool, report.latency_ms)
        if pool not in self._kv_timers:
            self._mark_dirty(pool)

    def _on_quarantine(self, pool: str) -> None:
        actor = self.runtime.actors.get(pool) if self.runtime is not None else None
        self.metrics.log_corrupt.labels(pool).set(1 if actor is not None and actor.quarantine else 0)
        self._mark_dirty(pool)

    def _mark_dirty(self, pool: str) -> None:
        self._kv_dirty[pool] = None
        self._kv_wake.set()

    async def _kv_writer(self) -> None:
        """Write a pool's snapshot when something a reader shows has changed, coalesced.

        Steps that only record probe bookkeeping (``last_heartbeat``, ``perf_hints``: every probe
        of a loading engine is one) do not write by themselves; they ride along with the next
        write, or are written :data:`KV_PROBE_REFRESH_S` after the last one. Any other change is
        written at once, or :data:`KV_COALESCE_S` after the pool's previous write if that was
        more recent, so a burst of steps is one put and a reader is never more than
        ``KV_COALESCE_S`` plus one put behind while NATS is reachable."""
        loop = asyncio.get_running_loop()
        while True:
            await self._kv_wake.wait()
            self._kv_wake.clear()
            while self._kv_dirty:
                pool = next(iter(self._kv_dirty))
                del self._kv_dirty[pool]
                if self.runtime is None or self.snapshots is None or pool not in self.runtime.actors:
                    continue
                if pool in self.fenced:
                    continue  # the snapshot belongs to the pool's new writer now
                if not self._server_supported():
                    self._kv_dirty.clear()
                    break
                snapshot = self.runtime.snapshot(pool)
                now = loop.time()
                written = _Written.of(snapshot, now)
                due = _kv_due(self._kv_written.get(pool), written)
                if due is None:
                    continue
                if due > now:
                    self._kv_later(pool, due - now)
                    continue
                try:
                    await self.snapshots.put(snapshot)
                except Exception as exc:
                    log.warning("KV snapshot of %s not written (%s); retrying in 1 s", pool, exc)
                    self._kv_dirty[pool] = None
                    loop.call_later(1.0, self._kv_wake.set)
                    break
                self._kv_written[pool] = written

    def _kv_later(self, pool: str, delay: float) -> None:
        """Mark ``pool`` dirty after ``delay``, unless an earlier wake-up is already set."""
        loop = asyncio.get_running_loop()
        pending = self._kv_timers.get(pool)
        if pending is not None:
            if pending.when() <= loop.time() + delay:
                return
            pending.cancel()

        def fire() -> None:
            self._kv_timers.pop(pool, None)
            self._mark_dirty(pool)

        self._kv_timers[pool] = loop.call_later(delay, fire)

    async def _heartbeat(self) -> None:
        while True:
            try:
                self.metrics.backlog.set(self.publisher.backlog if self.publisher else 0)
                snap = self.gpu_source()
                states: dict[str, int] = {}
                if self.runtime is not None:
                    for e in self.runtime.lifecycle.registry:
                        states[str(e.state)] = states.get(str(e.state), 0) + 1
                await self._publish_node(
                    NodeHeartbeat(
                        gpus=len(snap.gpus),
                        memory_total=sum(g.memory_total for g in snap.gpus),
                        memory_free=sum(g.memory_free for g in snap.gpus),
                        simulated=snap.simulated,
                        states=states,
                        period_s=self.config.heartbeat_s,
                    )
                )
            except PoolManagerError as exc:
                log.warning("heartbeat without GPU summary: %s", exc)
            await asyncio.sleep(self.config.heartbeat_s)

    async def _publish_node(self, body: EventBody) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish_nowait(self.node_events.make(body))
        except EventLogError as exc:
            log.warning("node event %s not queued: %s", type(body).__name__, exc)

    # --- running and stopping --------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %s", task.get_name(), task.exception())

    def request_stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self, *, install_signals: bool = True) -> int:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self._stopping.wait())
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
                await self._stopping.wait()
        finally:
            for task in (starting, stopping):
                task.cancel()
            await self.stop()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        return self.exit_code

    async def stop(self, *, stop_engines: bool | None = None) -> None:
        """Graceful shutdown: stop taking commands, stop (or leave) engines, flush events."""
        if self._closed.is_set():
            return
        self._stopping.set()
        stop = self.config.on_shutdown == "stop" if stop_engines is None else stop_engines
        # Standing down from a server below the floor: write nothing more, leave the engines.
        writable = self.incompatible is None
        stop = stop and writable
        phase = "commands"
        t0 = time.monotonic()

        def step(name: str) -> None:
            nonlocal phase
            log.info("shutdown: %s done after %.3f s; next: %s", phase, time.monotonic() - t0, name)
            phase = name

        if self.service is not None:
            with contextlib.suppress(Exception):
                await self.service.stop()
        await self.gpus.stop_watching()
        for sub in (self._health_sub, self._unclaimed_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if self.snapshots is not None:
            step("kv watch")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.snapshots.stop_watch(), 5.0)
        if stop:
            step("stopping pools")
            grace = max((d.spec.stop_grace_s for d in self.config.definitions()), default=0.0)
            try:
                await asyncio.wait_for(self._stop_pools(), grace + SHUTDOWN_POOLS_S)
            except TimeoutError:
                log.error("shutdown: pools not stopped within %.0f s; closing the actors anyway",
                          grace + SHUTDOWN_POOLS_S)  # fmt: skip
            step("releasing leases")
            await self._release_pools()
        if self.ownership is not None:
            # No more renewals: a lease not released (engines left running) lapses after its ttl.
            await self.ownership.close()
        if writable:
            await self._publish_node(DaemonStopping(reason="engines stopped" if stop else "engines left running"))
        if self.runtime is not None:
            step("closing actors")
            try:
                # Each engine stop is bounded by its grace and settle time; the whole phase too.
                await asyncio.wait_for(self.runtime.close(stop_engines=stop), SHUTDOWN_POOLS_S * 2)
            except TimeoutError:
                log.error("shutdown: actors not closed within %.0f s", SHUTDOWN_POOLS_S * 2)
            # The final snapshots say what the pools are now.
            for pool in self.runtime.actors:
                self._mark_dirty(pool)
            if writable:
                step("final snapshots")
                await self._drain_kv()
        if self.publisher is not None:
            step("flushing events")
            if not writable and self.publisher.backlog:
                log.error("%d event(s) not written: the server cannot fence them", self.publisher.backlog)
            await self.publisher.close(grace_s=5.0 if writable else 0.0)
        if self.audit is not None:
            await self.audit.close()
        step("background tasks")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            if stuck:
                log.error("shutdown: tasks still running after cancel: %s",
                          ", ".join(sorted(t.get_name() for t in stuck)))  # fmt: skip
        if self.nc is not None and not self.nc.is_closed:
            step("closing the connection")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5.0)
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.close()
        step("done")
        self.metrics.close()
        self.gpus.close()
        if self.embedded is not None:
            self.embedded.stop()
        self._closed.set()

    async def _stop_pools(self) -> None:
        """Stop every running pool through the lifecycle, so the log and the snapshots say what
        is true once the daemon is gone: unready, no engine. Failed pools stay failed (an operator
        still has to acknowledge them). Commands queued before the signal are applied first."""
        runtime = self.runtime
        if runtime is None:
            return
        stamp = f"{time.time():.6f}"
        waits = []
        for pool, actor in runtime.actors.items():
            if actor.fenced or runtime.lifecycle.state(pool) in ("unready", "failed"):
                continue
            cmd = StopCmd(command_id=f"shutdown-{self.node}-{stamp}")
            waits.append(runtime.command(pool, cmd))
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("pool not stopped cleanly at shutdown: %s", result)

    async def _drain_kv(self) -> None:
        # Every pool is written now, whatever was waiting to coalesce.
        for timer in self._kv_timers.values():
            timer.cancel()
        self._kv_timers.clear()
        if self.runtime is None or self.snapshots is None or self.nc is None or not self.nc.is_connected:
            return
        runtime, snapshots = self.runtime, self.snapshots
        # Side by side, not one put after another (a thousand pools waited 9 s here).
        gate = asyncio.Semaphore(KV_FINAL_AT_ONCE)

        async def put(pool: str) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(snapshots.put(runtime.snapshot(pool)), 2.0)

        pools = [p for p in self._kv_dirty if p not in self.fenced and p in runtime.actors]
        await asyncio.gather(*(put(pool) for pool in pools))
        self._kv_dirty.clear()


KV_FINAL_AT_ONCE = 32
"""Final KV snapshot puts in flight at once during shutdown."""

KV_COALESCE_S = 0.05
"""Least time between two KV writes of one pool's snapshot (a reader's staleness bound, plus one put)."""

KV_PROBE_REFRESH_S = 30.0
"""How long probe bookkeeping alone (``last_heartbeat``, ``perf_hints``) may wait for a KV write.
30 s, the observers' health refresh period: at 5 s the refresh alone cost N/5 puts a second
(0.15 of a core at 1,000 pools) for fields no reader acts on."""


@dataclass(frozen=True, slots=True)
class _Written:
    """A snapshot as the KV writer compares it: whole, and without its probe bookkeeping."""

    full: bytes
    shown: bytes
    at: float

    @classmethod
    def of(cls, snapshot: PoolSnapshot, at: float) -> _Written:
        shown = msgspec.structs.replace(snapshot, last_heartbeat=None, perf_hints={})
        return cls(full=encode(snapshot), shown=encode(shown), at=at)


def _kv_due(last: _Written | None, now: _Written) -> float | None:
    """When ``now`` should be written given the ``last`` write: None when nothing changed."""
    if last is None:
        return now.at
    if last.full == now.full:
        return None
    wait = KV_COALESCE_S if last.shown != now.shown else KV_PROBE_REFRESH_S
    return max(now.at, last.at + wait)


def _reported_version(nc: NATS) -> ServerVersion | None:
    """The version in the connected server's INFO, or None when it gives none we can read."""
    reported = nc.connected_server_version
    try:
        version = ServerVersion(int(reported.major), int(reported.minor), int(reported.patch),
                                str(reported.prerelease or ""))  # fmt: skip
    except (ValueError, TypeError):
        return None
    # nats-py's stand-in for "no INFO version yet".
    return None if version.release == (0, 0, 0) and version.prerelease == "unknown" else version


def _safe_url(nc: NATS) -> str | None:
    """The connected server as scheme://host:port: never the credentials a URL may carry."""
    url = nc.connected_url
    if url is None or url.hostname is None:
        return None
    return f"{url.scheme}://{url.hostname}:{url.port}" if url.port else f"{url.scheme}://{url.hostname}"


async def flush_through_cancel(nc: NATS) -> None:
    """``nc.flush()`` that a cancellation (a stop during start-up) cannot break.

    Cancelled mid-flight, nats-py's flush leaves its cancelled PONG future queued; the PONG then
    raises ``InvalidStateError`` inside the client's read loop, which stops reading, and every
    later ack, reply and KV write on the connection times out. Shielded, the flush finishes on its
    own (bounded by nats-py's flush timeout) while the caller is cancelled at once."""
    flush = asyncio.ensure_future(nc.flush())
    # Retrieved here, so a flush that fails after its caller left is not an unhandled error.
    flush.add_done_callback(lambda done: done.cancelled() or done.exception())
    await asyncio.shield(flush)


_RESUMED_STATES = frozenset({"preloading", "ready", "restarting"})
"""States a pool taken over from another node is started again from (a drain was ending it)."""


def _last_writer(events: list[Event]) -> str | None:
    return events[-1].node if events else None


_KNOWN_VERBS = frozenset({"preload", "drain", "reload", "stop", "reset", "lease", "release", "status", "node"})
