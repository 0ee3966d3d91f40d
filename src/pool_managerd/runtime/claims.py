"""Ownership hand-overs: which pools the daemon serves, and how a pool comes and goes.

At start-up the configured pools are claimed (a lease another node holds is fenced and watched);
a watched lease that lapses is claimed later, the pool recovered from its log and its engine
started again where it served elsewhere. A lease lost, or the log's own fence (another node
wrote the pool), stands the pool down and watches its lease again; a graceful stop with the
engines stopped releases every held lease. The lease decisions are
:mod:`pool_managerd.core.ownership`'s and the lease I/O :class:`OwnershipKeeper`'s; this is
what the daemon does around them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pool_managerd.adapters.engines.record import SpawnRecord
from pool_managerd.adapters.eventlog.errors import EventLogError
from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.adapters.owner_store import OwnerStore
from pool_managerd.adapters.replication import stream_replicas
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import Event, PreloadCmd, Rejected, encode
from pool_managerd.contract.messages import PoolFenced as PoolFencedEvent
from pool_managerd.core.definitions import PoolDefinition
from pool_managerd.core.inputs import ClaimInput, ReleaseInput
from pool_managerd.core.ownership import Claim, LeaseTiming, may_take_over
from pool_managerd.core.replies import rebuild_replies
from pool_managerd.runtime.ownership import OwnershipKeeper
from pool_managerd.runtime.recovery import RecoveryReport, restore_pool
from pool_managerd.runtime.sink import ACK_BOUND_S

if TYPE_CHECKING:
    from pool_managerd.runtime.daemon import Daemon

log = logging.getLogger(__name__)

RESUMED_STATES = frozenset({"preloading", "ready", "restarting"})
"""States a pool taken over from another node is started again from (a drain was ending it)."""


class Claims:
    """The daemon's side of its pools' ownership (see the module docstring).

    Reads and sets the daemon's shared wiring (``runtime``, ``publisher``, ``fenced``,
    ``standing_by``, ``ownership``); what only the hand-overs need is kept here."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.served: set[str] = set()
        """Pools whose commands this daemon answers (configured, owned, not fenced)."""
        self.released: set[str] = set()
        """Pools whose lease a graceful stop gave up: nothing more is appended for them."""

    # --- the lease checks ------------------------------------------------------------------------

    def serves(self, pool: str) -> bool:
        """Whether this node answers and acts for ``pool`` now: it serves the pool and, the pool
        being leased, its lease is fresh by the local clock."""
        if pool not in self.served:
            return False
        keeper = self._daemon.ownership
        return keeper is None or not keeper.tracks(pool) or keeper.serving(pool)

    def may_append(self, pool: str) -> bool:
        """Whether the pool's events may be appended now: its lease is not released and fresh."""
        if pool in self.released:
            return False
        keeper = self._daemon.ownership
        return keeper is None or not keeper.tracks(pool) or keeper.serving(pool)

    # --- claims ------------------------------------------------------------------------------------

    async def claim_pools(self, definitions: list[PoolDefinition]) -> dict[str, ClaimInput]:
        """Claim every configured pool whose lease is free or this node's own; the others are
        watched (a lease nobody renews is claimed once it lapses). Starts the lease keeper."""
        daemon = self._daemon
        assert daemon.nc is not None
        cfg = daemon.config
        owners = await OwnerStore.open(daemon.nc.jetstream(), daemon.subjects, replicas=stream_replicas(cfg))
        timing = LeaseTiming(cfg.ownership.lease_ttl_s, cfg.ownership.lease_margin_s)
        keeper = OwnershipKeeper(owners, daemon.node, timing, on_lost=self.on_lease_lost, on_claimed=self.on_claimed)
        daemon.ownership = keeper
        standby = {pool.id: tuple(pool.standby) for pool in cfg.pools}

        async def claim(pool: str) -> Claim | None:
            return await keeper.try_claim(pool, take_over=may_take_over(daemon.node, standby.get(pool, ())))

        found = await asyncio.gather(*(claim(d.pool) for d in definitions))
        keeper.start()
        claims: dict[str, ClaimInput] = {}
        for definition, won in zip(definitions, found, strict=True):
            if won is None:
                owner = keeper.owner_of(definition.pool) or "another node"
                daemon.fenced[definition.pool] = f"its ownership lease is held by {owner}"
                log.info("pool %s is held by %s; not serving it here", definition.pool, owner)
                continue
            claims[definition.pool] = ClaimInput(won.epoch, won.previous_node, won.previous_epoch)
        return claims

    async def above_logged_epochs(self, pool: str, claim: ClaimInput, events: list[Event]) -> ClaimInput:
        """An epoch above every one the pool's events name (the record may have been lost)."""
        logged = max((e.epoch or 0 for e in events), default=0)
        keeper = self._daemon.ownership
        if claim.epoch > logged or keeper is None:
            return claim
        epoch = await keeper.raise_epoch(pool, logged + 1)
        return ClaimInput(epoch, claim.previous_node, claim.previous_epoch)

    async def on_claimed(self, pool: str, claim: Claim) -> None:
        """This node won a lease it was watching: recover the pool from its log and serve it."""
        daemon = self._daemon
        await daemon.ready.wait()  # start-up's own recovery (and its orphan reaping) comes first
        runtime, publisher, nc = daemon.runtime, daemon.publisher, daemon.nc
        definition = daemon.standing_by.pop(pool, None)
        if runtime is None or publisher is None or nc is None or definition is None or daemon.stopping.is_set():
            return
        try:
            if pool in runtime.actors:
                await runtime.remove_pool(pool)  # what the lost lease left: abandoned, engine stopped
            await self._settle_backlog(pool)
            pairs = [pair async for pair in read_events(nc, daemon.subjects, pool=pool)]
        except Exception as exc:
            log.error("pool %s: claimed but its events cannot be read (%s); letting the lease lapse", pool, exc)
            if daemon.ownership is not None:
                daemon.ownership.drop(pool, watch=True)
            daemon.standing_by[pool] = definition
            return
        events = [event for _, event in pairs]
        daemon.fenced.pop(pool, None)
        publisher.unfence(pool)
        publisher.assume(pool, pairs[-1][0] if pairs else 0)
        start = ClaimInput(claim.epoch, claim.previous_node, claim.previous_epoch)
        start = await self.above_logged_epochs(pool, start, events)
        actor = runtime.add_pool(definition, simulated=daemon.simulated())
        report = RecoveryReport()
        by_pid = {e.pid: e for e in SpawnRecord.load(runtime.spawn_record.path) if e.pool == pool}
        restore_pool(runtime, actor, events, start, by_pid, report)
        since = daemon.cache.clock() - daemon.cache.ttl_s
        for old in rebuild_replies(events, since=since):
            daemon.cache.seed(pool, old.command_id, old.fingerprint, encode(old.reply), old.at)
        self.served.add(pool)
        daemon.kv.mark_dirty(pool)
        log.warning("pool %s taken over at epoch %d from %s (%s there)", pool, start.epoch,
                    start.previous_node or "nobody", report.taken_over.get(pool, "nothing running"))  # fmt: skip
        if pool in report.taken_over:
            await self.resume(pool, start.epoch, report.taken_over[pool])

    async def _settle_backlog(self, pool: str) -> None:
        """Before reading a pool's history on a claim: let this node's own events of the pool
        that still wait in the backlog (accepted before a lease it lost) be stored first, or the
        new epoch's first event would take their sequence numbers and they would be lost."""
        publisher = self._daemon.publisher
        if publisher is None or not publisher.pending(pool):
            return
        bound = self._daemon.config.ownership.lease_ttl_s
        log.warning("pool %s: %d event(s) of an earlier lease still wait to be stored; waiting up to %.0f s",
                    pool, publisher.pending(pool), bound)  # fmt: skip
        try:
            async with asyncio.timeout(bound):
                await publisher.settle(pool)
        except TimeoutError:
            raise EventLogError(
                f"pool {pool}: {publisher.pending(pool)} event(s) of an earlier lease not stored"
            ) from None

    async def resume(self, pool: str, epoch: int, state: str) -> None:
        """A pool taken over while it served (or was starting) elsewhere starts its engine here,
        through normal placement on this node's GPUs."""
        runtime = self._daemon.runtime
        if state not in RESUMED_STATES or runtime is None:
            return
        try:
            reply = await runtime.command(pool, PreloadCmd(command_id=f"takeover-{self._daemon.node}-{epoch}"))
        except PoolManagerError as exc:
            log.error("pool %s: not restarted after the takeover: %s", pool, exc.message)
            return
        if isinstance(reply, Rejected):
            log.error("pool %s: not restarted after the takeover: %s %s", pool, reply.code, reply.message)

    # --- losing a pool -----------------------------------------------------------------------------

    def on_fenced(self, pool: str, reason: str) -> None:
        """The log's own fence refused a write: another node writes ``pool`` now."""
        daemon = self._daemon
        log.error("pool %s fenced: %s", pool, reason)
        daemon.fenced[pool] = reason
        if daemon.ownership is not None and daemon.ownership.tracks(pool):
            # The log's own fence: another node wrote the pool, so whatever the lease says this
            # node stops renewing it and watches it again.
            daemon.ownership.drop(pool, watch=True)
            self._stand_by(pool)
        if daemon.runtime is not None and pool in daemon.runtime.actors:
            daemon.runtime.actors[pool].fenced = True
        daemon.tasks.start(self._stand_down(pool, reason), f"fenced-{pool}")

    def on_lease_lost(self, pool: str, reason: str) -> None:
        """This node may no longer act on ``pool``: stop answering for it and stop its engine now,
        before the lease can lapse for anyone else; then stand by for it."""
        daemon = self._daemon
        log.error("pool %s: %s; no longer serving it here", pool, reason)
        self.served.discard(pool)
        daemon.fenced[pool] = f"ownership lease lost: {reason}"
        if daemon.runtime is not None and pool in daemon.runtime.actors:
            daemon.runtime.actors[pool].fenced = True
        self._stand_by(pool)
        daemon.tasks.start(self._lose_pool(pool, daemon.fenced[pool]), f"lease-lost-{pool}")

    async def _lose_pool(self, pool: str, reason: str) -> None:
        await self._stand_down(pool, reason)
        runtime = self._daemon.runtime
        if runtime is not None and pool in runtime.actors and pool not in self.served:
            # Nothing of the pool is this node's now: it leaves ``pools`` and the KV writer.
            await runtime.remove_pool(pool)

    async def _stand_down(self, pool: str, reason: str) -> None:
        """Another daemon writes this pool now: stop serving its commands and stop acting on it
        (its engine, probes and timers go; nothing more is written for it)."""
        daemon = self._daemon
        self.served.discard(pool)  # its commands are the new owner's to answer
        if daemon.runtime is not None and pool in daemon.runtime.actors:
            await daemon.runtime.actors[pool].abandon()
        await daemon.publish_node(PoolFencedEvent(reason=reason, pool=pool))

    def _stand_by(self, pool: str) -> None:
        for definition in self._daemon.config.definitions():
            if definition.pool == pool:
                self._daemon.standing_by[pool] = definition

    # --- a graceful stop ---------------------------------------------------------------------------

    async def release_pools(self) -> None:
        """A graceful stop with the engines stopped: give every held lease up, its last event
        first (``pool_released``), so another node may claim at once."""
        runtime, keeper = self._daemon.runtime, self._daemon.ownership
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
        self.released.update(held)
        self.served.difference_update(held)
        await asyncio.gather(*(keeper.release(pool) for pool in held), return_exceptions=True)
