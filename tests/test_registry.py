"""The registry: pools come to exist only by registration, an entry is a view of the pool's state
value (never a second copy), and leases never go below zero nor above the slots."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.contract.errors import DuplicatePool, InvalidId, LeaseRefused, UnknownLease, UnknownPool
from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    EngineInfo,
    EngineSpec,
    Event,
    EventBody,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    PoolSnapshot,
    PoolState,
    encode,
)
from pool_managerd.core.health import HealthState
from pool_managerd.core.registry import Entry, Registry, to_snapshot
from pool_managerd.core.state import PoolValue, check_acquire, check_release, evolve, expired, initial


def value_with(slots: int = 2, state: PoolState = "ready", pool: str = "p") -> PoolValue:
    return msgspec.structs.replace(initial(pool, EngineSpec(argv=["x"], slots=slots)), state=state)


def apply(value: PoolValue, body: EventBody, now: float = 0.0) -> PoolValue:
    event = Event(v=SCHEMA_VERSION, seq=value.seq + 1, ts=now, node="n", pool=value.pool, body=body)
    return evolve(value, event)


def grant(value: PoolValue, lease_id: str, ttl: float, now: float, holder: str | None = None) -> PoolValue:
    """What the machine does for a lease command: check, then evolve by the granted event."""
    check_acquire(value, lease_id)
    active = len(value.leases) + (lease_id not in value.leases)
    return apply(value, LeaseGranted(lease_id=lease_id, expires_at=now + ttl, active=active, holder=holder), now)


def release(value: PoolValue, lease_id: str) -> PoolValue:
    check_release(value, lease_id)
    return apply(value, LeaseReleased(lease_id=lease_id, active=value.active_leases - 1))


def expire(value: PoolValue, now: float) -> tuple[PoolValue, list[str]]:
    gone = expired(value, now)
    for lease_id in gone:
        value = apply(value, LeaseExpired(lease_id=lease_id, active=value.active_leases - 1), now)
    return value, gone


class Holder:
    """Stands in for a live pool: the registry reads its entry through it."""

    def __init__(self, value: PoolValue, simulated: bool = False) -> None:
        self.value = value
        self.simulated = simulated

    def entry(self) -> Entry:
        return Entry(self.value, "node-1", simulated=self.simulated)


def registered(registry: Registry, pool: str, **kw: object) -> Holder:
    holder = Holder(value_with(state="unready", pool=pool), **kw)  # type: ignore[arg-type]
    registry.register(pool, holder.entry)
    return holder


def test_register_and_get() -> None:
    registry = Registry("node-1")
    holder = Holder(value_with(slots=4, state="unready", pool="chat-8b"), simulated=True)
    registry.register("chat-8b", holder.entry)
    entry = registry.get("chat-8b")
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
    # A view: what the pool holds now, not a copy taken at registration.
    holder.value = msgspec.structs.replace(holder.value, state="ready")
    assert registry.get("chat-8b").state == "ready"


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
    first = registered(registry, "a")
    with pytest.raises(DuplicatePool):
        registry.register("a", Holder(value_with(slots=9, pool="a")).entry)
    assert registry.get("a").value is first.value
    assert registry.get("a").slots_total == 2


@pytest.mark.parametrize("bad", ["", "A", "a.b", "*", ">", "-a", "_a", "a b", "a" * 64, "pool/1"])
def test_invalid_ids_are_refused(bad: str) -> None:
    registry = Registry()
    with pytest.raises(InvalidId):
        registry.register(bad, Holder(value_with()).entry)
    assert len(registry) == 0


def test_remove() -> None:
    registry = Registry()
    registered(registry, "a")
    removed = registry.remove("a")
    assert removed.pool == "a"
    assert "a" not in registry
    with pytest.raises(UnknownPool):
        registry.get("a")


def test_iteration_and_snapshots_are_sorted_by_pool_id() -> None:
    registry = Registry("n")
    for pool in ["zeta", "alpha", "mid", "0first"]:
        registered(registry, pool)
    assert [e.pool for e in registry] == ["0first", "alpha", "mid", "zeta"]
    assert [s.pool for s in registry.snapshots()] == ["0first", "alpha", "mid", "zeta"]
    assert all(isinstance(s, PoolSnapshot) for s in registry.snapshots())


def test_snapshot_reflects_the_entry() -> None:
    value = value_with(slots=3)
    value = msgspec.structs.replace(value, engine=EngineInfo(pid=10, pgid=10, port=8080, started_at=1.0))
    value = grant(value, "z-lease", 10.0, now=0.0, holder="client")
    value = grant(value, "a-lease", 20.0, now=0.0)
    holder = Holder(value)
    registry = Registry("node-1")
    registry.register("p", lambda: dataclasses.replace(holder.entry(), health=HealthState(live=True, ready=True)))
    snap = registry.snapshot("p")
    assert snap.state == "ready"
    assert (snap.health_live, snap.health_ready) == (True, True)
    assert (snap.slots_total, snap.slots_free, snap.active_leases) == (3, 1, 2)
    assert [lease.lease_id for lease in snap.leases] == ["a-lease", "z-lease"]
    assert snap.leases[1].holder == "client"
    assert snap.engine is not None and snap.engine.pid == 10
    # A snapshot is a copy: later states of the pool do not leak into it.
    holder.value = release(holder.value, "a-lease")
    assert snap.active_leases == 2 and snap.device_mask == []
    assert registry.snapshot("p").active_leases == 1
    assert b'"pool":"p"' in encode(snap)


def test_entry_derives_draining_and_mask_from_the_state() -> None:
    entry = Entry(value_with(state="draining"))
    assert entry.draining and entry.device_mask == []
    assert not Entry(value_with(state="ready")).draining


# --- leases -------------------------------------------------------------------------------------


def test_lease_refused_when_not_ready() -> None:
    states: tuple[PoolState, ...] = ("unready", "preloading", "restarting", "failed")
    for state in states:
        value = value_with(state=state)
        with pytest.raises(LeaseRefused) as info:
            grant(value, "l", 10.0, now=0.0)
        assert info.value.code == "not_ready"
        assert value.active_leases == 0


def test_lease_refused_when_draining() -> None:
    with pytest.raises(LeaseRefused) as info:
        grant(value_with(state="draining"), "l", 10.0, now=0.0)
    assert info.value.code == "draining"


def test_lease_refused_when_no_slot_is_free() -> None:
    value = grant(value_with(slots=1), "a", 10.0, now=0.0)
    with pytest.raises(LeaseRefused) as info:
        grant(value, "b", 10.0, now=0.0)
    assert info.value.code == "no_slots"
    assert "1/1" in info.value.message
    assert value.active_leases == 1


def test_renewing_a_lease_takes_no_second_slot() -> None:
    value = grant(value_with(slots=1), "a", 10.0, now=0.0)
    value = grant(value, "a", 10.0, now=5.0)  # a full pool still renews its own lease
    assert value.leases["a"].expires_at == 15.0
    assert value.active_leases == 1
    assert value.slots_free == 0


def test_release_unknown_lease_is_an_error() -> None:
    value = value_with()
    with pytest.raises(UnknownLease) as info:
        release(value, "ghost")
    assert info.value.code == "unknown_lease"
    value = release(grant(value, "a", 10.0, now=0.0), "a")
    with pytest.raises(UnknownLease):
        release(value, "a")  # a second release is not silently accepted
    assert value.active_leases == 0


def test_expire_returns_ids_in_expiry_order() -> None:
    value = value_with(slots=5)
    value = grant(value, "late", 30.0, now=0.0)
    value = grant(value, "early", 10.0, now=0.0)
    value = grant(value, "mid", 20.0, now=0.0)
    assert value.next_expiry() == 10.0
    assert expire(value, 9.9)[1] == []
    value, gone = expire(value, 20.0)
    assert gone == ["early", "mid"]
    assert list(value.leases) == ["late"]
    assert value.next_expiry() == 30.0


def test_a_value_is_never_changed_in_place() -> None:
    before = value_with()
    after = grant(before, "a", 10.0, now=0.0)
    assert before.leases == {} and before.seq == 0
    assert after.leases["a"].expires_at == 10.0 and after.seq == 1
    with pytest.raises(AttributeError):
        after.state = "unready"  # type: ignore[misc]


@settings(max_examples=200)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["acquire", "release", "expire"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.floats(min_value=0.1, max_value=50.0),
        ),
        max_size=50,
    ),
    slots=st.integers(min_value=1, max_value=3),
)
def test_lease_counter_never_below_zero_nor_above_slots(ops: list[tuple[str, str, float]], slots: int) -> None:
    value = value_with(slots=slots)
    now = 0.0
    held: set[str] = set()
    for op, lease_id, amount in ops:
        now += amount / 10
        if op == "acquire":
            try:
                value = grant(value, lease_id, amount, now)
                held.add(lease_id)
            except LeaseRefused as exc:
                assert exc.code == "no_slots"
                assert len(held) == slots
        elif op == "release":
            try:
                value = release(value, lease_id)
                held.remove(lease_id)
            except UnknownLease:
                assert lease_id not in held
        else:
            value, gone = expire(value, now)
            held.difference_update(gone)
        assert 0 <= value.active_leases <= slots
        assert value.active_leases == len(held)
        assert value.slots_free == slots - len(held)
        assert to_snapshot(Entry(value)).active_leases == len(held)
