"""The shell around the ownership leases: claims, renewals, the serving deadline, standby watches.

The decisions are :mod:`pool_managerd.core.ownership`'s; this module does the KV I/O and keeps
the timers. Per pool this node configures, the keeper either *holds* the lease or *watches* it.

* Held: a task of the pool's own renews it every
  :attr:`~pool_managerd.core.ownership.LeaseTiming.renew_every_s` and, when a renewal gets no
  answer, tries again within a second or two until the serving deadline. ``on_lost`` is called
  the moment the node may no longer serve: a renewal refused by another node's record, or the
  serving deadline passed without one.
* Watched: a KV watch of the bucket (run while any pool is watched) delivers every write of the
  record at once, and a read every half renewal period covers a watch that lapsed. The keeper
  notes when the revision last changed and claims the pool once
  :func:`~pool_managerd.core.ownership.may_claim` allows (at once for a released record, so a
  graceful hand-over takes a round trip; a timer fires when a lapsed one may be claimed), then
  calls ``on_claimed``. A watch that may not take over from a live node (see
  :func:`~pool_managerd.core.ownership.may_take_over`) ends as soon as the record is seen renewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pool_managerd.adapters.kv_watch import KeyWatch
from pool_managerd.adapters.owner_store import LeaseLost, OwnerStore, ReadLease
from pool_managerd.contract.messages import OwnerRecord
from pool_managerd.core.ownership import Claim, LeaseTiming, claim_due, may_claim, serving, serving_until

log = logging.getLogger(__name__)

AT_ONCE = 64
"""KV reads and writes the keeper has in flight at once."""

RETRY_FIRST_S = 0.25
RETRY_MAX_S = 2.0
"""Back-off between renewal tries that got no answer: a JetStream leader election of the bucket
(seconds) must be outlasted by retrying through it, not by waiting a whole renewal period."""

_PHASES = random.Random()
"""Where in its first period a lease's renewals start."""
RENEW_TICK_S = 0.5
"""Renewals are due on ticks this far apart (or an eighth of the period, if less)."""

MIN_WRITE_WAIT_S = 0.5

LostCallback = Callable[[str, str], None]
ClaimedCallback = Callable[[str, Claim], Coroutine[Any, Any, None]]


@dataclass(slots=True)
class _Held:
    epoch: int
    revision: int
    sent_at: float
    """Local monotonic time the last successful write was sent."""
    timer: asyncio.TimerHandle | None = None
    renewer: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Cancel the deadline timer and the renewal task (unless the caller is that task)."""
        if self.timer is not None:
            self.timer.cancel()
        if self.renewer is not None and self.renewer is not asyncio.current_task():
            self.renewer.cancel()


@dataclass(slots=True)
class _Watched:
    lease: ReadLease
    since: float | None
    """When this revision was first seen (None: never read yet)."""
    take_over: bool
    known_epoch: int = 0
    timer: asyncio.TimerHandle | None = None
    """Fires when the record, unchanged since ``since``, may be claimed."""


class OwnershipKeeper:
    """Holds and watches the ownership leases of one node's pools (see the module docstring)."""

    def __init__(
        self,
        store: OwnerStore,
        node: str,
        timing: LeaseTiming,
        *,
        on_lost: LostCallback,
        on_claimed: ClaimedCallback,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.node = node
        self.timing = timing
        self.on_lost = on_lost
        self.on_claimed = on_claimed
        self.clock = clock
        self.held: dict[str, _Held] = {}
        self.watched: dict[str, _Watched] = {}
        self._take_over: dict[str, bool] = {}
        self._handovers: set[asyncio.Task[None]] = set()
        self._gate = asyncio.Semaphore(AT_ONCE)
        self._task: asyncio.Task[None] | None = None
        self._watch: KeyWatch | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._closing = False
        self.claims = 0
        self.renewals = 0
        self.renew_failures = 0

    # --- what the daemon asks ------------------------------------------------------------------

    def serving(self, pool: str) -> bool:
        """Whether this node holds ``pool``'s lease and may still act on it (no round trip)."""
        held = self.held.get(pool)
        return held is not None and serving(held.sent_at, self.clock(), self.timing)

    def tracks(self, pool: str) -> bool:
        """Whether the pool's ownership is this keeper's business (held or watched)."""
        return pool in self.held or pool in self.watched

    def epoch(self, pool: str) -> int:
        """The epoch this node holds ``pool`` at (0: not held)."""
        held = self.held.get(pool)
        return held.epoch if held is not None else 0

    def owner_of(self, pool: str) -> str | None:
        """The node the last read of a watched pool's record names."""
        if pool in self.held:
            return self.node
        watched = self.watched.get(pool)
        record = watched.lease.record if watched is not None else None
        return record.node if record is not None and not record.released else None

    async def try_claim(self, pool: str, *, take_over: bool, known_epoch: int = 0) -> Claim | None:
        """Claim ``pool`` now if it is free or this node's own; otherwise start watching it
        (its record may be stale, which only watching for a while can tell)."""
        async with self._gate:
            lease = await self.store.read(pool)
        self._take_over[pool] = take_over
        watched = _Watched(lease, self.clock(), take_over, known_epoch)
        self.watched[pool] = watched
        claim = await self._claim_if_allowed(pool, watched)
        if claim is None:
            self._arm_claim(pool, watched)
        return claim

    async def raise_epoch(self, pool: str, epoch: int) -> int:
        """Write ``epoch`` (above what the record said) into a held lease: the pool's events
        named a higher epoch than its record (a bucket recreated). Returns the epoch held."""
        held = self.held[pool]
        if epoch <= held.epoch:
            return held.epoch
        await self._write(pool, held, epoch)
        return epoch

    def start(self) -> None:
        """Start watching (the renewals of held leases run already)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ownership")
            self._sync_watch()

    def _sync_watch(self) -> None:
        """Run the KV watch only while some pool is watched: a node holding every pool it
        configures would otherwise receive each of its own renewals (120 a second at 1,000)."""
        if self._closing or self._task is None:
            return
        loop = asyncio.get_running_loop()
        if self.watched and self._watch is None:
            self._watch = self.store.watcher(self._seen)
            self._watch_task = loop.create_task(self._start_watch(self._watch.start), name="owner-watch-start")
        elif not self.watched and self._watch is not None:
            watch, starting = self._watch, self._watch_task
            self._watch = self._watch_task = None
            if starting is not None:
                starting.cancel()
            stopping = loop.create_task(watch.stop(), name="owner-watch-stop")
            self._handovers.add(stopping)
            stopping.add_done_callback(self._handovers.discard)

    def rewatch(self) -> None:
        """Re-create the KV watch (call from the NATS reconnected callback); the periodic read
        covers the gap meanwhile."""
        if self._watch is not None and not self._closing:
            watch = self._watch
            self._watch_task = asyncio.get_running_loop().create_task(self._start_watch(watch.restart),
                                                                      name="owner-rewatch")  # fmt: skip

    async def _start_watch(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await start()
        except Exception as exc:
            log.warning("owner records not watched (%s: %s); read every %.1f s instead", type(exc).__name__, exc,
                        self.timing.renew_every_s / 2)  # fmt: skip

    def drop(self, pool: str, *, watch: bool) -> None:
        """Stop holding ``pool`` (fenced by the log, or lost): no more renewals, and (``watch``)
        watch it again as a possible claimant."""
        held = self.held.pop(pool, None)
        if held is not None:
            held.stop()
        if watch and pool not in self.watched:
            self.watched[pool] = _Watched(ReadLease(None, -1), None, self._take_over.get(pool, True))
            self._sync_watch()

    async def release(self, pool: str) -> None:
        """Give the lease up (a graceful stop): the record says released; anyone may claim."""
        held = self.held.pop(pool, None)
        if held is None:
            return
        held.stop()
        record = OwnerRecord(node=self.node, epoch=held.epoch, ttl_s=self.timing.ttl_s, renewed_at=time.time(),
                             released=True)  # fmt: skip
        try:
            async with self._gate:
                await asyncio.wait_for(self.store.write(pool, record, held.revision), 2.0)
        except Exception as exc:
            log.warning("pool %s: lease not released (%s); it lapses after %.1f s", pool, exc, self.timing.ttl_s)

    async def close(self) -> None:
        """Stop the loop and every timer (the leases are left to lapse unless released)."""
        self._closing = True
        for handover in list(self._handovers):
            handover.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for held in self.held.values():
            held.stop()

    # --- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        period = self.timing.renew_every_s
        while True:
            jobs = [self._poll(p) for p in list(self.watched)]
            if jobs:
                await asyncio.gather(*jobs, return_exceptions=True)
            self._sync_watch()
            # A record's staleness is only seen by reading it again, once a period.
            await asyncio.sleep(period / 2)  # ok: the poll period itself

    def _hold(self, pool: str, held: _Held) -> None:
        """Start renewing a lease just written (claimed)."""
        loop = asyncio.get_running_loop()
        held.renewer = loop.create_task(self._renew_loop(pool, held), name=f"renew-{pool}")

    async def _renew_loop(self, pool: str, held: _Held) -> None:
        period = self.timing.renew_every_s
        # The first renewal at a random point of the period (early is always safe): leases
        # claimed together, a thousand at start-up, would otherwise be renewed together every
        # period, a burst of writes that stalls everything else on the loop meanwhile. Each
        # renewal is then brought forward to a tick of the clock, so the leases due within one
        # tick wake in the same loop turn and their writes go out together: spread one by one,
        # a renewal cost a loop turn, a write and a read of its own (+0.05 of a core at 500).
        tick = min(RENEW_TICK_S, period / 8)
        wait = period * (0.5 + _PHASES.random() / 2)
        loop = asyncio.get_running_loop()
        while self.held.get(pool) is held:
            # On the loop's clock, so the leases due on one tick share one timer deadline exactly.
            due = math.floor((loop.time() + held.sent_at + wait - self.clock()) / tick) * tick
            await _sleep_until(loop, due)
            await self._renew(pool, held)
            wait = period

    async def _renew(self, pool: str, held: _Held) -> None:
        """Renew until it is written, refused, or the lease is no longer held (the deadline timer
        ends it then)."""
        delay = RETRY_FIRST_S
        while self.held.get(pool) is held:
            try:
                await self._write(pool, held, held.epoch)
                self.renewals += 1
                return
            except LeaseLost:
                if not await self._still_ours(pool, held):
                    if self.held.get(pool) is held:
                        self._lose(pool, "another node wrote its owner record")
                    return
                continue  # our earlier write was stored after all: renew on top of it at once
            except Exception as exc:
                # Unknown outcome (timeout, no responders, disconnected): try again soon; the
                # deadline timer, not this, decides when the node must stop serving.
                self.renew_failures += 1
                log.warning("pool %s: lease renewal failed (%s: %s); retrying, serving until the deadline", pool,
                            type(exc).__name__, exc)  # fmt: skip
            await asyncio.sleep(delay)  # ok: back-off between tries that got no answer
            delay = min(delay * 2, RETRY_MAX_S)

    async def _still_ours(self, pool: str, held: _Held) -> bool:
        """After a refused renewal: whether the record is ours still (a renewal whose ack was lost
        was stored). A read that gets no answer counts as ours: the deadline decides then."""
        try:
            async with self._gate:
                lease = await asyncio.wait_for(self.store.read(pool), self._write_wait(held))
        except LeaseLost:
            return False
        except Exception:
            return True
        record = lease.record
        if record is not None and record.node == self.node and record.epoch == held.epoch and not record.released:
            held.revision = lease.revision  # ours; the deadline still runs from the older send
            return True
        return False

    def _write_wait(self, held: _Held) -> float:
        """How long one write or read may wait: the margin, and never past the serving deadline."""
        left = serving_until(held.sent_at, self.timing) - self.clock()
        return max(MIN_WRITE_WAIT_S, min(self.timing.margin_s, left))

    async def _write(self, pool: str, held: _Held, epoch: int) -> None:
        record = OwnerRecord(node=self.node, epoch=epoch, ttl_s=self.timing.ttl_s, renewed_at=time.time())
        sent = self.clock()
        async with self._gate:
            revision = await asyncio.wait_for(self.store.write(pool, record, held.revision), self._write_wait(held))
        if self.held.get(pool) is not held:
            return  # lost meanwhile: the deadline passed while the write was in flight
        held.epoch, held.revision, held.sent_at = epoch, revision, sent
        self._arm(pool, held)

    def _arm(self, pool: str, held: _Held) -> None:
        if held.timer is not None:
            held.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, serving_until(held.sent_at, self.timing) - self.clock())
        held.timer = loop.call_later(delay, self._deadline, pool, held)

    def _deadline(self, pool: str, held: _Held) -> None:
        if self.held.get(pool) is held and not self.serving(pool):
            self._lose(pool, f"lease not renewed within {self.timing.serve_for_s:.1f} s")

    def _lose(self, pool: str, reason: str) -> None:
        self.drop(pool, watch=True)
        if not self._closing:
            self.on_lost(pool, reason)

    async def _poll(self, pool: str) -> None:
        if pool not in self.watched:
            return
        try:
            async with self._gate:
                lease = await self.store.read(pool)
        except Exception as exc:
            log.debug("pool %s: owner record not read (%s)", pool, exc)
            return
        await self._seen(pool, lease)

    async def _seen(self, pool: str, lease: ReadLease) -> None:
        """A read or the watch delivered ``pool``'s record: note a new revision, claim if allowed."""
        watched = self.watched.get(pool)
        if watched is None:
            return
        if lease.revision != watched.lease.revision:
            if 0 <= lease.revision < watched.lease.revision:
                return  # the watch lagging behind a read: nothing new
            renewed = watched.since is not None and lease.record is not None and not lease.record.released
            watched.lease, watched.since = lease, self.clock()
            if renewed and not watched.take_over:
                del self.watched[pool]  # its owner is alive, and this node is no standby for it
                log.info("pool %s is held by %s; not standing by for it", pool, self.owner_of(pool))
                return
        claim = await self._claim_if_allowed(pool, watched)
        if claim is None:
            self._arm_claim(pool, watched)
        else:
            # In a task of its own: a takeover reads the pool's history, and the loop must go on
            # renewing every lease meanwhile (the new one included).
            task = asyncio.get_running_loop().create_task(self.on_claimed(pool, claim), name=f"claimed-{pool}")
            self._handovers.add(task)
            task.add_done_callback(self._handover_done)

    def _arm_claim(self, pool: str, watched: _Watched) -> None:
        """Look again the moment an unchanged record may be claimed, not at the next read."""
        if watched.timer is not None:
            watched.timer.cancel()
            watched.timer = None
        if watched.since is None or watched.lease.record is None or self.watched.get(pool) is not watched:
            return
        delay = max(0.0, claim_due(watched.since, self.timing) - self.clock()) + 0.01
        watched.timer = asyncio.get_running_loop().call_later(delay, self._claim_due, pool, watched)

    def _claim_due(self, pool: str, watched: _Watched) -> None:
        watched.timer = None
        if self.watched.get(pool) is watched and not self._closing:
            task = asyncio.get_running_loop().create_task(self._seen(pool, watched.lease), name=f"claim-due-{pool}")
            self._handovers.add(task)
            task.add_done_callback(self._handover_done)

    def _handover_done(self, task: asyncio.Task[None]) -> None:
        self._handovers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("takeover of %s failed", task.get_name(), exc_info=task.exception())

    async def _claim_if_allowed(self, pool: str, watched: _Watched) -> Claim | None:
        if self._closing or pool in self.held:
            return None
        lease = watched.lease
        if lease.revision < 0:
            return None  # not read since it was dropped
        claim = may_claim(self.node, lease.record, lease.revision, watched.since, self.clock(), self.timing,
                          known_epoch=watched.known_epoch)  # fmt: skip
        if claim is None:
            return None
        held = _Held(epoch=claim.epoch, revision=claim.expect_revision, sent_at=self.clock())
        try:
            self.held[pool] = held
            await self._write(pool, held, claim.epoch)
        except LeaseLost:
            del self.held[pool]
            watched.lease, watched.since = ReadLease(None, -1), None  # someone else was quicker
            return None
        except Exception as exc:
            del self.held[pool]
            log.warning("pool %s: claim not written (%s: %s)", pool, type(exc).__name__, exc)
            return None
        self.watched.pop(pool, None)
        self.claims += 1
        self._hold(pool, held)
        log.info("pool %s: claimed at epoch %d (from %s)", pool, claim.epoch, claim.previous_node or "nobody")
        return claim


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Sleep until the loop's clock reads ``when`` (timers with the same deadline fire together)."""
    if when <= loop.time():
        return
    waker: asyncio.Future[None] = loop.create_future()
    handle = loop.call_at(when, _resolve, waker)
    try:
        await waker
    finally:
        handle.cancel()


def _resolve(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)
