"""A test double of the runtime's event sink: events kept in memory, with waiters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from pool_managerd.contract.messages import Event, LogCorrupt
from pool_managerd.testing.event_wire import first_matching


class MemoryEventSink:
    """An in-process event log with waiters: the runtime's :class:`EventSink` in tests and
    benchmarks that run pools without NATS."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()

    async def append(self, pool: str, events: Sequence[Event]) -> None:
        async with self._changed:
            self.events.extend(events)
            self._changed.notify_all()

    def of(self, pool: str) -> list[Event]:
        return [e for e in self.events if e.pool == pool]

    async def acknowledge(self, pool: str, corrupt: LogCorrupt, next_seq: int) -> LogCorrupt | None:
        """Nothing to follow in memory: no foreign message can land here."""
        return None

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float, start: int = 0) -> Event:
        """The first event from index ``start`` on that matches; TimeoutError after ``timeout``."""
        return await first_matching(self._changed, self.events, predicate, timeout, start)
