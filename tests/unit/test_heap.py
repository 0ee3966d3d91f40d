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


@pytest.fixture
def heap() -> Iterator[Heap]:
    loop = asyncio.new_event_loop()
    h = Heap(loop)
    before = gc.get_threshold()
    try:
        yield h
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


def test_freeze_freezes_what_is_alive_and_a_settle_frees_what_died_frozen(heap: Heap) -> None:
    h = heap
    alive = _Node()
    h.freeze()
    assert gc.get_freeze_count() > 0 and h.freezes == 1
    dead = weakref.ref(alive)
    del alive
    gc.collect()
    assert dead() is not None  # frozen: a full collection does not see it (the cost being saved)
    h.settle()
    assert dead() is None  # the next settle unfreezes first: nothing frozen is kept for good


def test_a_slow_full_collection_freezes_its_survivors_until_the_next_settle(heap: Heap) -> None:
    heap.after_full(SLOW_FULL_S / 2)
    assert heap.freezes == 0 and gc.get_freeze_count() == 0  # a fast one changes nothing
    survivor = _Node()
    heap.after_full(SLOW_FULL_S * 2)
    assert heap.freezes == 1 and gc.get_freeze_count() > 0
    kept = weakref.ref(survivor)
    del survivor
    gc.collect()
    assert kept() is not None
    heap.settle()  # what install() does every RESETTLE_S
    assert kept() is None


def test_install_schedules_the_periodic_settle_and_uninstall_undoes_everything(heap: Heap) -> None:
    heap.install()
    assert heap._on_gc in gc.callbacks
    assert heap._resettle is not None
    assert heap._resettle.when() - heap._loop.time() == pytest.approx(RESETTLE_S, abs=5)
    heap.freeze()
    heap.uninstall()
    assert heap._on_gc not in gc.callbacks and heap._resettle is None and gc.get_freeze_count() == 0
