"""The cyclic garbage collector, tuned for a daemon whose heap is large and lives long.

With a thousand pools the daemon holds some 400,000 tracked objects that live as long as their
pools, and makes short-lived ones at a steady rate (a probe a second per pool). With CPython's
defaults a young collection every 700 allocations promotes whatever is alive at that instant
(a probe in flight, its timer, its future) into the oldest generation, where it soon dies by
reference count but still counts towards the next full collection. Measured at 1,000 pools on 2
cores: a full collection every 5 to 10 s at idle, each 0.4 to 1 s long, finding nothing to free,
and the loop (status replies among it) stalled meanwhile.

Three things, none of which can hold garbage for long:

- :func:`tune` raises the thresholds: a young collection every 20,000 allocations leaves the
  short-lived objects time to die by reference count before one, and fewer of them reach the
  oldest generation.
- :meth:`Heap.freeze` (once start-up is done) freezes what is alive (``gc.freeze``): the
  collector no longer traverses it, so a full collection costs what was allocated since, not
  the whole heap. It collects only the young generations first (milliseconds): a full
  collection of a heap this size right as the daemon starts serving would stall its first
  replies for as long as the ones it saves.
- :meth:`Heap.after_full` notices a full collection that was slow anyway (the pools' objects
  made after start-up, by a bulk preload) and freezes its survivors too.

Freezing is what can leak: a frozen object that later becomes part of unreachable cycle is
never collected. So every ``RESETTLE_S`` :meth:`Heap.settle` unfreezes everything, collects
it all (one full pass, once an hour) and freezes what survives again. Garbage a freeze kept
(start-up's own cycles, measured at about a thousand objects, or objects frozen alive that died
since) is freed then: it lives at most that long, whatever the daemon does. Loop-confined apart from
the collector's callback, which only schedules work on the loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Final

log = logging.getLogger(__name__)

__all__ = ["RESETTLE_S", "SLOW_FULL_S", "THRESHOLDS", "Heap", "tune"]

THRESHOLDS: Final = (20_000, 20, 10)
"""Allocations between young collections, young collections between middle ones, middle ones
between full ones (CPython's defaults: 700, 10, 10; a full collection also waits until a
quarter of the oldest generation is new)."""
SLOW_FULL_S: Final = 0.05
"""A full collection longer than this freezes its survivors (see :meth:`Heap.after_full`)."""
RESETTLE_S: Final = 3600.0
"""How often the frozen objects are collected with the rest: what garbage a freeze can keep,
it keeps at most this long."""


def tune() -> None:
    """Raise the collector's thresholds (see the module docstring)."""
    gc.set_threshold(*THRESHOLDS)


class Heap:
    """Freezes the long-lived heap after start-up and after slow full collections."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started = 0.0
        self._scheduled = False
        self._resettle: asyncio.TimerHandle | None = None
        self.freezes = 0
        """Freezes made (start-up's included)."""

    def install(self) -> None:
        """Watch the collector's full collections, and settle every ``RESETTLE_S`` (until
        :meth:`uninstall`)."""
        gc.callbacks.append(self._on_gc)
        self._resettle = self._loop.call_later(RESETTLE_S, self._periodic)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._resettle is not None:
            self._resettle.cancel()
            self._resettle = None
        gc.unfreeze()

    def _periodic(self) -> None:
        self.settle()
        self._resettle = self._loop.call_later(RESETTLE_S, self._periodic)

    def freeze(self) -> None:
        """Collect the young generations, then freeze everything alive."""
        gc.collect(1)
        gc.freeze()
        self.freezes += 1
        log.info("heap frozen: %d objects", gc.get_freeze_count())

    def settle(self) -> None:
        """Collect everything, the frozen objects included, then freeze what survives."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.freezes += 1
        log.info("heap settled: %d objects frozen", gc.get_freeze_count())

    def after_full(self, duration_s: float) -> None:
        """A full collection took ``duration_s``: when slow, freeze its survivors (the
        collection that ended a moment ago freed every unfrozen cycle)."""
        if duration_s >= SLOW_FULL_S:
            self.freeze()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Called by the collector, in whichever thread allocated: measure, and leave the rest
        # to the loop (the collector must not be re-entered from its own callback).
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        duration = time.perf_counter() - self._started
        if duration < SLOW_FULL_S or self._scheduled or self._loop.is_closed():
            return
        self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._run_after_full, duration)
        except RuntimeError:  # the loop closed meanwhile
            self._scheduled = False

    def _run_after_full(self, duration_s: float) -> None:
        self._scheduled = False
        self.after_full(duration_s)
