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
- :meth:`Heap.settle` (after start-up) collects everything, then freezes the survivors
  (``gc.freeze``): the collector no longer traverses them, so a full collection costs what was
  allocated since, not the whole heap.
- :meth:`Heap.after_full` notices a full collection that was slow anyway (the pools' objects
  made after start-up, by a bulk preload) and freezes its survivors too.

Freezing is what can leak: a frozen object that later becomes part of unreachable cycle is
never collected. So survivors are only ever frozen right after a collection has freed the
garbage there was, and once ``RESETTLE_S`` has passed since the last time, the frozen objects
are unfrozen and collected with the rest before being frozen again: garbage that a freeze kept
lives about that long at most, whatever the daemon does. Loop-confined apart from the collector's callback, which
only schedules work on the loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any, Final

log = logging.getLogger(__name__)

__all__ = ["RESETTLE_S", "SLOW_FULL_S", "THRESHOLDS", "Heap", "tune"]

THRESHOLDS: Final = (20_000, 20, 10)
"""Allocations between young collections, young collections between middle ones, middle ones
between full ones (CPython's defaults: 700, 10, 10; a full collection also waits until a
quarter of the oldest generation is new)."""
SLOW_FULL_S: Final = 0.05
"""A full collection longer than this freezes its survivors (see :meth:`Heap.after_full`)."""
RESETTLE_S: Final = 3600.0
"""At least this long between two complete collections of the frozen objects: what garbage a
freeze can keep, it keeps at most this long."""


def tune() -> None:
    """Raise the collector's thresholds (see the module docstring)."""
    gc.set_threshold(*THRESHOLDS)


class Heap:
    """Freezes the long-lived heap after start-up and after slow full collections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, clock: Any = time.monotonic) -> None:
        self._loop = loop
        self._clock = clock
        self._started = 0.0
        self._last_settle = clock()
        self._scheduled = False
        self.freezes = 0
        """Freezes made (start-up's included)."""

    def install(self) -> None:
        """Watch the collector's full collections (until :meth:`uninstall`)."""
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.unfreeze()

    def settle(self) -> None:
        """Collect everything, the frozen objects included, then freeze what survives."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._last_settle = self._clock()
        self.freezes += 1
        log.info("heap settled: %d objects frozen", gc.get_freeze_count())

    def after_full(self, duration_s: float) -> None:
        """A full collection took ``duration_s``: when slow, freeze its survivors (or, once
        ``RESETTLE_S`` has passed since the last, settle the whole heap again)."""
        if duration_s < SLOW_FULL_S:
            return
        if self._clock() - self._last_settle >= RESETTLE_S:
            self.settle()
            return
        # The full collection that ended a moment ago freed every unfrozen cycle; what was made
        # since goes through a young collection (milliseconds) first.
        gc.collect(1)
        gc.freeze()
        self.freezes += 1

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
