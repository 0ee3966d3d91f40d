"""Where the daemon's events go: pool steps through :class:`JetStreamSink`, node events through
:class:`NodeEvents`' sequence, both onto the fenced :class:`EventPublisher`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pool_managerd.adapters.eventlog.errors import BacklogFull, PoolFenced, PoolQuarantined
from pool_managerd.adapters.eventlog.publisher import EventPublisher
from pool_managerd.contract.messages import SCHEMA_VERSION, Event, EventBody, LogCorrupt
from pool_managerd.runtime import quarantine
from pool_managerd.runtime.metrics import Metrics

log = logging.getLogger(__name__)

ACK_BOUND_S = 2.0
"""How long a step waits for its events' PubAcks before running its effects anyway. Normally
events are durable before effects run; while NATS is unreachable the pool keeps working and the
events wait, in order, in the publisher's backlog."""


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
