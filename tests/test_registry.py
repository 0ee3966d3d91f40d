"""The registry: pools come to exist only by registration; leases never go below zero."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.core.errors import DuplicatePool, InvalidId, LeaseRefused, UnknownLease, UnknownPool
from pool_managerd.core.health import HealthState
from pool_managerd.core.registry import Entry, Registry, to_snapshot
from pool_managerd.messages import EngineInfo, PoolSnapshot, PoolState, encode


def ready_entry(slots: int = 2) -> Entry:
    registry = Registry("node-1")
    entry = registry.register("chat-8b", slots=slots)
    entry.state = "ready"
    return entry


def test_register_and_get() -> None:
    registry = Registry("node-1")
    entry = registry.register("chat-8b", slots=4, simulated=True)
    assert registry.get("chat-8b") is entry
    assert (entry.pool, entry.node, entry.state, entry.slots_total, entry.simulated) == (
        "chat-8b",
        "node-1",
        "unready",
        4,
        True,
    )
    assert "chat-8b" in registry
    assert "other" not in registry
    assert len(registry) == 1


def test_unknown_pool_errors() -> None:
    registry = Registry("node-1")
    with pytest.raises(UnknownPool) as info:
        registry.get("nope")
    assert info.value.code == "unknown_pool"
    assert info.value.pool == "nope"
    with pytest.raises(UnknownPool):
        registry.snapshot("nope")
    with pytest.raises(UnknownPool):
        registry.remove("nope")


def test_duplicate_registration_is_refused() -> None:
    registry = Registry()
    first = registry.register("a")
    with pytest.raises(DuplicatePool):
        registry.register("a", slots=9)
    assert registry.get("a") is first
    assert first.slots_total == 1


@pytest.mark.parametrize("bad", ["", "A", "a.b", "*", ">", "-a", "_a", "a b", "a" * 64, "pool/1"])
def test_invalid_ids_are_refused(bad: str) -> None:
    registry = Registry()
    with pytest.raises(InvalidId):
        registry.register(bad)
    assert len(registry) == 0


def test_remove() -> None:
    registry = Registry()
    registry.register("a")
    removed = registry.remove("a")
    assert removed.pool == "a"
    assert "a" not in registry
    with pytest.raises(UnknownPool):
        registry.get("a")


def test_iteration_and_snapshots_are_sorted_by_pool_id() -> None:
    registry = Registry("n")
    for pool in ["zeta", "alpha", "mid", "0first"]:
        registry.register(pool)
    assert [e.pool for e in registry] == ["0first", "alpha", "mid", "zeta"]
    assert [s.pool for s in registry.snapshots()] == ["0first", "alpha", "mid", "zeta"]
    assert all(isinstance(s, PoolSnapshot) for s in registry.snapshots())


def test_snapshot_reflects_the_entry() -> None:
    registry = Registry("node-1")
    entry = registry.register("p", slots=3)
    entry.state = "ready"
    entry.health = HealthState(live=True, ready=True)
    entry.engine = EngineInfo(pid=10, pgid=10, port=8080, started_at=1.0)
    entry.acquire("z-lease", 10.0, now=0.0, holder="client")
    entry.acquire("a-lease", 20.0, now=0.0)
    snap = registry.snapshot("p")
    assert snap.state == "ready"
    assert (snap.health_live, snap.health_ready) == (True, True)
    assert (snap.slots_total, snap.slots_free, snap.active_leases) == (3, 1, 2)
    assert [lease.lease_id for lease in snap.leases] == ["a-lease", "z-lease"]
    assert snap.leases[1].holder == "client"
    assert snap.engine is not None and snap.engine.pid == 10
    # A snapshot is a copy: later changes to the entry do not leak into it.
    entry.leases.clear()
    assert snap.active_leases == 2 and snap.device_mask == []
    assert b'"pool":"p"' in encode(snap)


# --- leases -------------------------------------------------------------------------------------


def test_lease_refused_when_not_ready() -> None:
    entry = Registry().register("p")
    states: tuple[PoolState, ...] = ("unready", "preloading", "restarting", "failed")
    for state in states:
        entry.state = state
        with pytest.raises(LeaseRefused) as info:
            entry.acquire("l", 10.0, now=0.0)
        assert info.value.code == "not_ready"
    assert entry.active_leases == 0


def test_lease_refused_when_draining() -> None:
    entry = ready_entry()
    entry.state = "draining"
    with pytest.raises(LeaseRefused) as info:
        entry.acquire("l", 10.0, now=0.0)
    assert info.value.code == "draining"


def test_lease_refused_when_no_slot_is_free() -> None:
    entry = ready_entry(slots=1)
    entry.acquire("a", 10.0, now=0.0)
    with pytest.raises(LeaseRefused) as info:
        entry.acquire("b", 10.0, now=0.0)
    assert info.value.code == "no_slots"
    assert "1/1" in info.value.message
    assert entry.active_leases == 1


def test_renewing_a_lease_takes_no_second_slot() -> None:
    entry = ready_entry(slots=1)
    entry.acquire("a", 10.0, now=0.0)
    renewed = entry.acquire("a", 10.0, now=5.0)  # a full pool still renews its own lease
    assert renewed.expires_at == 15.0
    assert entry.active_leases == 1
    assert entry.slots_free == 0


def test_release_unknown_lease_is_an_error() -> None:
    entry = ready_entry()
    with pytest.raises(UnknownLease) as info:
        entry.release("ghost")
    assert info.value.code == "unknown_lease"
    entry.acquire("a", 10.0, now=0.0)
    entry.release("a")
    with pytest.raises(UnknownLease):
        entry.release("a")  # a second release is not silently accepted
    assert entry.active_leases == 0


def test_expire_returns_ids_in_expiry_order() -> None:
    entry = ready_entry(slots=5)
    entry.acquire("late", 30.0, now=0.0)
    entry.acquire("early", 10.0, now=0.0)
    entry.acquire("mid", 20.0, now=0.0)
    assert entry.next_expiry() == 10.0
    assert entry.expire(9.9) == []
    assert entry.expire(20.0) == ["early", "mid"]
    assert list(entry.leases) == ["late"]
    assert entry.next_expiry() == 30.0
    assert entry.drop_leases() == 1
    assert entry.next_expiry() is None


@settings(max_examples=200)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["acquire", "release", "expire", "drop"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.floats(min_value=0.1, max_value=50.0),
        ),
        max_size=50,
    ),
    slots=st.integers(min_value=1, max_value=3),
)
def test_lease_counter_never_below_zero_nor_above_slots(ops: list[tuple[str, str, float]], slots: int) -> None:
    entry = ready_entry(slots=slots)
    now = 0.0
    held: set[str] = set()
    for op, lease_id, amount in ops:
        now += amount / 10
        if op == "acquire":
            try:
                entry.acquire(lease_id, amount, now)
                held.add(lease_id)
            except LeaseRefused as exc:
                assert exc.code == "no_slots"
                assert len(held) == slots
        elif op == "release":
            try:
                entry.release(lease_id)
                held.remove(lease_id)
            except UnknownLease:
                assert lease_id not in held
        elif op == "expire":
            for gone in entry.expire(now):
                held.remove(gone)
        else:
            assert entry.drop_leases() == len(held)
            held.clear()
        assert 0 <= entry.active_leases <= slots
        assert entry.active_leases == len(held)
        assert entry.slots_free == slots - len(held)
        assert to_snapshot(entry).active_leases == len(held)
