"""runtime/heap.py: the long-lived heap is frozen, and what a freeze keeps is collected later."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from pool_managerd.runtime.heap import RESETTLE_S, SLOW_FULL_S, THRESHOLDS, Heap, tune


class _Node:
    """A cycle of one: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def heap() -> Iterator[tuple[Heap, _Clock]]:
    loop = asyncio.new_event_loop()
    clock = _Clock()
    h = Heap(loop, clock=clock)
    before = gc.get_threshold()
    try:
        yield h, clock
    finally:
        h.uninstall()
        gc.set_threshold(*before)
        loop.close()


def test_tune_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune()
        assert gc.get_threshold() == THRESHOLDS
        assert THRESHOLDS[0] > before[0]
    finally:
        gc.set_threshold(*before)


def test_settle_freezes_what_is_alive_and_a_later_settle_frees_what_died_frozen(heap: tuple[Heap, _Clock]) -> None:
    h, _ = heap
    alive = _Node()
    h.settle()
    assert gc.get_freeze_count() > 0 and h.freezes == 1
    dead = weakref.ref(alive)
    del alive
    gc.collect()
    assert dead() is not None  # frozen: a full collection does not see it (the cost being saved)
    h.settle()
    assert dead() is None  # the next settle unfreezes first: nothing frozen is kept for good


def test_a_slow_full_collection_freezes_its_survivors_and_a_late_one_settles_again(heap: tuple[Heap, _Clock]) -> None:
    h, clock = heap
    h.after_full(SLOW_FULL_S / 2)
    assert h.freezes == 0 and gc.get_freeze_count() == 0  # a fast one changes nothing
    survivor = _Node()
    h.after_full(SLOW_FULL_S * 2)
    assert h.freezes == 1 and gc.get_freeze_count() > 0
    kept = weakref.ref(survivor)
    del survivor
    gc.collect()
    assert kept() is not None
    clock.now += RESETTLE_S
    h.after_full(SLOW_FULL_S * 2)
    assert h.freezes == 2 and kept() is None  # what the freeze kept lived at most RESETTLE_S
