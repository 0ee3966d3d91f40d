"""The command service: pool commands (``poold.cmd.<pool>.<verb>``), node commands
(``poold.node.<node>.cmd.<verb>``) and the catch-all for pools nobody serves, over ``nats.micro``.

Every reply is typed; a rejection keeps its typed body, follows the nats micro error convention
(error headers, counted in ``$SRV.STATS``) and goes to metrics and the audit stream, never to a
pool's history."""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Mapping

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from pool_managerd import __version__
from pool_managerd.adapters.audit import AuditLog, audit_record
from pool_managerd.adapters.nats_internals import count_endpoint_error
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    GpuClearCmd,
    GpuClearReply,
    GpuSnapshot,
    InventoryCmd,
    InventoryReply,
    LifecycleCmd,
    PoolsCmd,
    PoolsReply,
    Rejected,
    command_fingerprint,
    encode,
)
from pool_managerd.contract.subjects import SERVICE_NAME, Subjects
from pool_managerd.core.definitions import PoolDefinition
from pool_managerd.core.table import describe
from pool_managerd.runtime import logs
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
from pool_managerd.runtime.metrics import Metrics
from pool_managerd.runtime.pools import PoolRuntime
from pool_managerd.runtime.sink import NodeEvents
from pool_managerd.runtime.tasks import BackgroundTasks

log = logging.getLogger(__name__)

MAX_INFLIGHT_COMMANDS = 1024
"""Commands one daemon works on at once (all pools); past it a command is answered ``overloaded``."""


class CommandService:
    """Answers the commands of one node's pools and of the node itself.

    ``serves(pool)`` says whether this node answers ``pool`` now (owned, lease held, not fenced);
    ``fenced``, ``standing_by`` and ``removing`` are the daemon's ownership views, read here to
    choose between answering, leaving it to the owner, and the catch-all's ``unknown_pool``."""

    def __init__(
        self,
        *,
        node: str,
        subjects: Subjects,
        nc: NATS,
        runtime: PoolRuntime,
        audit: AuditLog | None,
        metrics: Metrics,
        cache: CommandCache,
        tasks: BackgroundTasks,
        gpus: GpuNode,
        node_events: NodeEvents,
        gpu_source: Callable[[], GpuSnapshot],
        serves: Callable[[str], bool],
        fenced: Mapping[str, str],
        standing_by: Mapping[str, PoolDefinition],
        removing: set[str],
    ) -> None:
        self.node = node
        self.subjects = subjects
        self.nc = nc
        self.runtime = runtime
        self.audit = audit
        self.metrics = metrics
        self.cache = cache
        self.tasks = tasks
        self.gpus = gpus
        self.node_events = node_events
        self.gpu_source = gpu_source
        self._serves = serves
        self.fenced = fenced
        self.standing_by = standing_by
        self.removing = removing
        self.known_pools: set[str] = set()
        """Pools some daemon has published a snapshot for (the catch-all leaves them to their owner)."""
        self.micro: Service | None = None
        self.unclaimed_sub: Subscription | None = None
        self._inflight = 0

    async def listen_unclaimed(self) -> None:
        """Answer commands for pools nobody serves, which would otherwise meet only "no responders",
        with a typed rejection. One daemon of the cluster answers (queue group), and only for ids
        that are invalid or that no daemon has ever published a snapshot for."""
        self.unclaimed_sub = await self.nc.subscribe(
            f"{self.subjects.prefix}.cmd.*.*", queue="poold-unclaimed", cb=self.on_unclaimed
        )

    async def serve(self) -> None:
        """Register the ``nats.micro`` service and its two endpoints."""
        self.micro = await add_service(
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
        await self.micro.add_endpoint(
            EndpointConfig(
                name=f"pools-{self.node}",
                subject=f"{self.subjects.prefix}.cmd.*.*",
                handler=self.on_command,
                queue_group=f"poold-pools-{self.node}",
                metadata={"node": self.node},
            )
        )
        await self.micro.add_endpoint(
            EndpointConfig(
                name=f"node-{self.node}",
                subject=f"{self.subjects.prefix}.node.{self.node}.cmd.*",
                handler=self.on_node_command,
                queue_group=f"poold-node-{self.node}",
                metadata={"node": self.node},
            )
        )

    async def stop(self) -> None:
        """Stop taking commands (the micro service's endpoints)."""
        if self.micro is not None:
            with contextlib.suppress(Exception):
                await self.micro.stop()

    async def on_snapshot(self, pool: str, snapshot: object) -> None:
        if snapshot is None:
            self.known_pools.discard(pool)
        else:
            self.known_pools.add(pool)

    async def on_unclaimed(self, msg: Msg) -> None:
        try:
            pool, verb = self.subjects.parse_command(msg.subject)
        except PoolManagerError as exc:
            await self._reply_unclaimed(msg, rejection(exc.code, exc.message))
            return
        if pool in self.removing:
            message = f"pool {pool!r} was removed from node {self.node}'s configuration and is being drained"
            await self._reply_unclaimed(msg, rejection("unknown_pool", message, pool=pool, verb=verb))
            return
        if (pool in self.runtime.actors or pool in self.fenced or pool in self.known_pools
                or pool in self.standing_by):  # fmt: skip
            return  # its owner answers
        await self._reply_unclaimed(
            msg, rejection("unknown_pool", f"no daemon serves pool {pool!r}", pool=pool, verb=verb)
        )

    async def _reply_unclaimed(self, msg: Msg, reply: Rejected) -> None:
        # Not a micro endpoint, so nothing counts it in $SRV.STATS; the headers still say "error".
        self.audit_refused(reply)
        if msg.reply:
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, encode(reply), headers=error_headers(reply))

    async def on_command(self, req: Request) -> None:
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
        if verb == "status" and len(data) <= 2 and pool not in self.fenced:
            # Fast path for the commonest read: no task, no cache.
            try:
                reply = await self.runtime.command(pool, decode_pool_command(verb, data))
                if self._serves(pool):
                    await self._respond(req, reply, verb, f"pools-{self.node}")
                return
            except PoolManagerError:
                pass
        self._inflight += 1
        self.tasks.start(self._command(req, pool, verb, data, traceparent), f"cmd-{pool}-{verb}")

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
            self.audit_refused(rejected)
        headers = error_headers(rejected) if rejected is not None else None
        if headers is not None and endpoint is not None:
            self._count_error(endpoint, headers)
        try:
            await req.respond(body, headers=headers)
        except Exception as exc:
            log.warning("could not send reply: %s", exc)

    def audit_refused(self, rejected: Rejected) -> None:
        """A refused command goes to metrics, the audit stream and (summed up) the log; never
        to the pool's history, since it changed nothing."""
        self.metrics.refused.labels(rejected.code).inc()
        if self.audit is not None:
            self.audit.record(audit_record(self.node, rejected))

    def _count_error(self, endpoint: str, headers: dict[str, str]) -> None:
        # nats-py counts an endpoint error only when the handler raises, and then replies with an
        # empty body; the typed rejection must stay the body, so the count is kept here, in the
        # endpoint's own statistics that $SRV.STATS reports (as nats-py would: "code:description").
        if self.micro is not None:
            count_endpoint_error(self.micro, endpoint, f"{headers[ERROR_CODE_HEADER]}:{headers[ERROR_HEADER]}")

    async def on_node_command(self, req: Request) -> None:
        try:
            _node, verb = self.subjects.parse_node_command(req.subject)
            cmd = decode_node_command(verb, req.data)
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
        snaps = sorted(map(runtime.overlay, runtime.lifecycle.registry.snapshots()), key=lambda s: s.pool)
        start = 0 if cmd.after is None else bisect.bisect_right([s.pool for s in snaps], cmd.after)
        budget = (self.nc.max_payload if self.nc.max_payload else 1024 * 1024) - 4096
        count = min(cmd.limit, len(snaps) - start)
        while True:
            page = snaps[start : start + count]
            more = start + count < len(snaps)
            body = encode(PoolsReply(node=self.node, pools=page, next=page[-1].pool if more and page else None,
                                     total=len(snaps)))  # fmt: skip
            if len(body) <= budget or count <= 1:
                return body
            count //= 2


_KNOWN_VERBS = frozenset({"preload", "drain", "reload", "stop", "reset", "lease", "release", "status", "node"})
