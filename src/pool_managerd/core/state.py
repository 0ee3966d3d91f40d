"""One pool's state as one immutable value, and the one function that changes it. Pure.

:class:`PoolValue` is everything the event log says about a pool. :func:`evolve` applies one
event to it and returns the next value; nothing else ever produces a new value. The live
machine (:mod:`pool_managerd.core.machine`) evolves its pool with every event it emits, the
replay fold (:mod:`pool_managerd.core.fold`) with every event it reads, and a restarted daemon
takes the folded value as it is: live, replay and recovery cannot drift apart.

What a pool observes without recording it (the probe streak, the last heartbeat, timer tokens,
pids being stopped) is not part of the value: it is bookkeeping of the shell's effects, fresh
after a restart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import msgspec

from pool_managerd.contract.errors import LeaseRefused, UnknownLease
from pool_managerd.contract.messages import (
    EngineAdopted,
    EngineExited,
    EngineInfo,
    EngineSpawned,
    EngineSpec,
    Event,
    EventBody,
    GpuVerified,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    Placement,
    PoolClaimed,
    PoolReleased,
    PoolState,
    StateChanged,
)
from pool_managerd.lifecycle.supervision import SupervisionState


@dataclass(frozen=True, slots=True)
class Lease:
    """One slot held by a client until ``expires_at`` (unless released or renewed)."""

    lease_id: str
    expires_at: float
    holder: str | None = None


RESTART_HISTORY = 1024
"""How many restart times a value keeps: supervision only counts those inside its window."""

Mask = str | list[str] | None
Rollback = tuple[EngineSpec, Mask, str | None]

_FAILURE_TRIGGERS = frozenset({"preload_failed", "engine_exited", "health_lost", "backoff_elapsed"})
_DEADLINE_STATES = frozenset({"preloading", "draining", "restarting"})
_ENGINE_STOPPED = frozenset({"unready", "restarting", "failed", "preloading"})
_FAILED_OR_RESTARTING = frozenset({"restarting", "failed"})
_OUT_OF_SERVICE = frozenset({"unready", "failed"})


class PoolValue(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Everything the event log says about one pool, as of its last event.

    Frozen; its mappings are never changed in place (:func:`evolve` copies what it changes), so
    a value once taken can be kept as a checkpoint or compared with another as a whole. A
    msgspec Struct rather than a dataclass: replay evolves it a million times a run, and
    ``msgspec.structs.replace`` is several times cheaper than ``dataclasses.replace``. Untracked
    by the garbage collector (``gc=False``): a value refers to no container that refers back to
    it, and a million short-lived values would otherwise trigger collections over the whole log."""

    pool: str
    state: PoolState = "unready"
    seq: int = 0
    spec: EngineSpec | None = None
    """The spec the pool runs (replay without a configuration knows it from the first preload)."""
    mask: Mask = None
    policy: str | None = None
    placement: Placement | None = None
    engine: EngineInfo | None = None
    leases: Mapping[str, Lease] = msgspec.field(default_factory=dict)
    reloading: bool = False
    pending_spec: EngineSpec | None = None
    pending_mask: Mask = None
    pending_policy: str | None = None
    pending_placement: Placement | None = None
    rollback: Rollback | None = None
    """What a failed reload goes back to: (spec, mask, policy) of the engine it replaced."""
    consecutive_failures: int = 0
    restart_times: tuple[float, ...] = ()
    ready_since: float | None = None
    restarts: int = 0
    crashes: int = 0
    last_error: str | None = None
    deadline_at: float | None = None
    """When the current preload/drain times out, or when the backoff ends (restarting)."""
    attempt: int = 0
    """How many spawns the pool has asked for: an engine reported for an older one is stale."""
    spawned_spec: EngineSpec | None = None
    """The spec of the pool's latest spawn: what ``version``, ``model`` and the slots show."""
    cause: tuple[str | None, str | None] = (None, None)
    """(command_id, traceparent) of the last command the pool applied: later events carry it."""
    last_event: str | None = None
    last_ts: float = 0.0
    vram_held: Mapping[str, int] = msgspec.field(default_factory=dict)
    """Bytes the engine held per GPU UUID when it was verified after launch (``gpu_verified``);
    empty while none is verified and once it is stopped."""
    owner: str | None = None
    """The node holding the pool's ownership lease as of the last claim (None: never claimed,
    or released)."""
    epoch: int = 0
    """The epoch of that lease (0: never claimed; logs from before leases)."""

    @property
    def supervision(self) -> SupervisionState:
        """What restart supervision decides from."""
        return SupervisionState(self.consecutive_failures, self.restart_times, self.ready_since)

    @property
    def version(self) -> str | None:
        """Which spec the pool last started, at a glance (a hash of it)."""
        return spec_version(self.spawned_spec) if self.spawned_spec is not None else None

    @property
    def model(self) -> str | None:
        return self.spawned_spec.model or None if self.spawned_spec is not None else None

    @property
    def engine_version(self) -> str | None:
        return self.spawned_spec.engine_version if self.spawned_spec is not None else None

    @property
    def engine_digest(self) -> str | None:
        return self.spawned_spec.model_digest if self.spawned_spec is not None else None

    @property
    def slots_total(self) -> int:
        spec = self.spawned_spec or self.spec
        return spec.slots if spec is not None else 1

    @property
    def active_leases(self) -> int:
        return len(self.leases)

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_total - self.active_leases)

    def next_expiry(self) -> float | None:
        """When the next lease runs out, if any is held."""
        return min((lease.expires_at for lease in self.leases.values()), default=None)


def initial(pool: str, spec: EngineSpec | None = None, mask: Mask = None, policy: str | None = None) -> PoolValue:
    """A pool before its first event: what its definition says (or nothing, for a bare replay)."""
    return PoolValue(pool=pool, spec=spec, mask=mask, policy=policy)


def spec_version(spec: EngineSpec) -> str:
    """A short, stable fingerprint of an engine spec: which spec a pool runs, at a glance."""
    return hashlib.blake2b(msgspec.json.encode(spec), digest_size=6).hexdigest()


# --- leases: checks the machine makes before it emits a lease event ------------------------------


def check_acquire(value: PoolValue, lease_id: str) -> None:
    """Raise :class:`LeaseRefused` unless ``lease_id`` may be granted (or renewed) now."""
    if value.state == "draining":
        raise LeaseRefused("draining", f"pool {value.pool!r} is draining; no new leases")
    if value.state != "ready":
        raise LeaseRefused("not_ready", f"pool {value.pool!r} is {value.state}, not ready")
    if lease_id not in value.leases and value.slots_free == 0:
        raise LeaseRefused(
            "no_slots",
            f"pool {value.pool!r} has no free slot ({value.active_leases}/{value.slots_total} leased)",
        )


def check_release(value: PoolValue, lease_id: str) -> None:
    """Raise :class:`UnknownLease` unless the pool holds ``lease_id``."""
    if lease_id not in value.leases:
        raise UnknownLease(f"pool {value.pool!r} holds no lease {lease_id!r}")


def expired(value: PoolValue, now: float) -> list[str]:
    """Ids of the leases whose TTL ran out by ``now``, in expiry order."""
    gone = sorted((lease.expires_at, lid) for lid, lease in value.leases.items() if lease.expires_at <= now)
    return [lid for _, lid in gone]


# --- evolve ----------------------------------------------------------------------------------------


def evolve(value: PoolValue, event: Event) -> PoolValue:
    """The value after ``event``. The only way a pool's state changes; checks nothing (the fold
    checks sequence, writer and legality around it)."""
    body = event.body
    cls = body.__class__
    cause = (event.command_id, event.traceparent) if event.fingerprint is not None else value.cause
    if cls is StateChanged:
        assert isinstance(body, StateChanged)
        changes: dict[str, Any] = {"seq": event.seq, "last_ts": event.ts, "cause": cause, "last_event": body.trigger}
        _transition(value, event, body, changes)
        return _replace(value, **changes)
    fact = _FACTS.get(cls)
    if fact is not None:
        return fact(value, event, cause)
    # Everything else (health, rejections, backoff notices...) changes no field of the state.
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event=_TAGS[cls])


_replace = msgspec.structs.replace
_TAGS: dict[type, str] = {cls: str(cls.__struct_config__.tag) for cls in get_args(EventBody)}


def _spawned(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, EngineSpawned)
    engine = EngineInfo(pid=body.pid, pgid=body.pgid, port=body.port, started_at=event.ts, argv=list(body.argv),
                        log_path=body.log_path)  # fmt: skip
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event="engine_spawned", engine=engine)


def _adopted(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, EngineAdopted)
    old = value.engine
    same = old is not None and old.pid == body.pid
    engine = EngineInfo(
        pid=body.pid, pgid=body.pgid, port=body.port, started_at=old.started_at if old else event.ts,
        argv=list(old.argv) if same and old else [], log_path=old.log_path if same and old else None,
    )  # fmt: skip
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event="engine_adopted", engine=engine)


def _exited(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, EngineExited)
    engine = None if value.engine is not None and value.engine.pid == body.pid else value.engine
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event="engine_exited", engine=engine)


def _granted(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, LeaseGranted)
    leases = dict(value.leases)
    leases[body.lease_id] = Lease(body.lease_id, body.expires_at, body.holder)
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event="lease_granted", leases=leases)


def _lease_gone(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, LeaseReleased | LeaseExpired)
    leases = value.leases
    if body.lease_id in leases:
        leases = {k: v for k, v in leases.items() if k != body.lease_id}
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event=_TAGS[body.__class__],
                    leases=leases)  # fmt: skip


def _claimed(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, PoolClaimed)
    common = {"seq": event.seq, "last_ts": event.ts, "cause": cause, "last_event": "pool_claimed",
              "owner": body.node, "epoch": body.epoch}  # fmt: skip
    if body.previous_node is None or body.previous_node == body.node:
        # A first claim, or this node's own again (a restart): its engine, if alive, is adopted.
        return _replace(value, **common)
    # Taken over from another host: nothing that host ran is this node's. A failed pool stays
    # failed (an operator still has to acknowledge it); anything else starts here unready.
    state = "failed" if value.state == "failed" else "unready"
    return _replace(value, **common, **_LEFT_SERVICE, state=state, engine=None, placement=None, leases={},
                    ready_since=None, deadline_at=None, vram_held={})  # fmt: skip


def _released(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event="pool_released", owner=None)


def _verified(value: PoolValue, event: Event, cause: tuple[str | None, str | None]) -> PoolValue:
    body = event.body
    assert isinstance(body, GpuVerified)
    held = dict(body.held) if body.ok else {}
    return _replace(value, seq=event.seq, last_ts=event.ts, cause=cause, last_event="gpu_verified", vram_held=held)


_FACTS: dict[type, Callable[[PoolValue, Event, tuple[str | None, str | None]], PoolValue]] = {
    EngineSpawned: _spawned,
    EngineAdopted: _adopted,
    EngineExited: _exited,
    LeaseGranted: _granted,
    LeaseReleased: _lease_gone,
    LeaseExpired: _lease_gone,
    PoolClaimed: _claimed,
    PoolReleased: _released,
    GpuVerified: _verified,
}


_NO_RELOAD: dict[str, Any] = {
    "reloading": False, "pending_spec": None, "pending_mask": None, "pending_policy": None, "pending_placement": None,
}  # fmt: skip
_LEFT_SERVICE = {**_NO_RELOAD, "rollback": None}


def _transition(value: PoolValue, event: Event, body: StateChanged, c: dict[str, Any]) -> None:
    """What a ``state_changed`` row means for the value (``c`` collects the changed fields)."""
    trigger, dst = body.trigger, body.dst
    c["state"] = dst
    mask = body.mask
    asked_mask = None if mask == "auto" else mask
    if dst in _ENGINE_STOPPED:
        # The machine stops (or has lost) the engine on these rows; its exit event may follow.
        c["engine"] = None
        if value.vram_held:
            c["vram_held"] = {}
    if trigger == "reload":
        c["reloading"] = True
        c["pending_spec"], c["pending_mask"], c["pending_policy"] = body.spec, asked_mask, body.policy
        c["pending_placement"] = body.placement
    else:
        if body.spec is not None:
            if trigger == "drained" and dst == "preloading" and value.spec is not None:
                # The reload's swap: the old spec is what a failure of the new one rolls back to.
                c["rollback"] = (value.spec, value.mask, value.policy)
            c["spec"] = body.spec
        if mask is not None:
            c["mask"] = asked_mask
        if body.policy is not None:
            c["policy"] = body.policy
    if dst in _DEADLINE_STATES:
        c["deadline_at"] = body.deadline_at
        if dst == "preloading":
            c.update(_NO_RELOAD)
            c["placement"] = body.placement
            c["attempt"] = value.attempt + 1
            c["spawned_spec"] = body.spec if body.spec is not None else value.spec
        elif dst == "restarting" and body.delay_s is not None:
            c["deadline_at"] = event.ts + body.delay_s
    elif value.deadline_at is not None:
        c["deadline_at"] = None
    if trigger in _FAILURE_TRIGGERS and dst in _FAILED_OR_RESTARTING:
        c["last_error"] = body.reason or value.last_error
        if body.attempt is not None:
            c["consecutive_failures"] = body.attempt
        if dst == "restarting" and not body.reload:
            c["restarts"] = value.restarts + 1
            c["restart_times"] = (*value.restart_times, event.ts)[-RESTART_HISTORY:]
        if body.crashed or body.exit_code is not None:  # v1 logs before "crashed" had the exit code only
            c["crashes"] = value.crashes + 1
        c["ready_since"] = None
        c["leases"] = {}
        if trigger == "preload_failed" and body.reload and dst == "restarting" and value.rollback is not None:
            # A reloaded spec that failed: the pool goes back to the spec it ran before.
            c["spec"], c["mask"], c["policy"] = value.rollback
            c["rollback"] = None
    elif trigger == "drained":
        # Both rows stop the old engine, and its leases go with it (a reload's swap too).
        c["leases"] = {}
    elif trigger == "internal_error":
        # The machine stopped everything it could not trust: engine, leases, a reload.
        c["last_error"] = body.reason or value.last_error
        c["ready_since"] = None
        c["leases"] = {}
    elif trigger == "reset":
        c["consecutive_failures"], c["restart_times"], c["ready_since"], c["last_error"] = 0, (), None, None
    if dst == "ready":
        if not (trigger == "drain_deadline" and value.ready_since is not None):
            # An aborted reload keeps the engine that has been ready all along.
            c["ready_since"] = event.ts
        c["last_error"] = None
        c.update(_LEFT_SERVICE)
    elif dst in _OUT_OF_SERVICE:
        c.update(_LEFT_SERVICE)
        c["placement"] = None
        c["leases"] = {}
