"""Every event a client sees on the wire, kept in arrival order, with waiters.

What the recovery tests, the fault benchmarks and the in-memory sink watch: ``wait`` returns
the first event from a mark on that matches, as soon as it arrives (no polling).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

from pool_managerd.contract.messages import EVENT_DECODER, Event

__all__ = ["EventWire", "first_matching"]

T = TypeVar("T")


async def first_matching(
    changed: asyncio.Condition, items: Sequence[T], pred: Callable[[T], bool], timeout: float, start: int = 0
) -> T:
    """The first of ``items`` from index ``start`` on that matches ``pred``, waiting on
    ``changed`` (notified by whoever appends) for later ones; TimeoutError after ``timeout``."""

    async def find() -> T:
        i = start
        async with changed:
            while True:
                while i < len(items):
                    if pred(items[i]):
                        return items[i]
                    i += 1
                await changed.wait()

    return await asyncio.wait_for(find(), timeout)


class EventWire:
    """Pool and node events from a core subscription (``on_msg`` is its callback); a message
    that is no event is passed over."""

    def __init__(self) -> None:
        self.items: list[Event] = []
        self.cond = asyncio.Condition()

    def seen(self, event: Event) -> None:
        """Called with each event before it is kept (a subclass learns from it)."""

    async def on_msg(self, msg: Any) -> None:
        try:
            event = EVENT_DECODER.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.seen(event)
        async with self.cond:
            self.items.append(event)
            self.cond.notify_all()

    def mark(self) -> int:
        """Where the events after now will start (a ``start`` for :meth:`wait`)."""
        return len(self.items)

    async def wait(self, pred: Callable[[Event], bool], timeout: float, start: int = 0) -> Event:
        return await first_matching(self.cond, self.items, pred, timeout, start)
