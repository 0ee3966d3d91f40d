"""The replay fold: pool events folded through the lifecycle table, with invariant checks. Pure.

The same fold serves ``pool-managerd replay`` (history, audits, ``--check-live``) and a
restarted daemon (recovery rebuilds each pool from its events before reconciling with the
processes it finds). It re-runs no guard: every decision (placement, delay, exit code) is
recorded in the events, so a fold needs no clock, RNG or GPU and is exact.

Invariants checked per pool:

* ``seq_gap``: per-pool sequences are contiguous (the first one seen may start anywhere when
  the fold begins mid-log, see ``expect_start``);
* ``illegal_transition``: every ``state_changed`` is a row of the table and starts from the
  state the fold is in;
* ``two_writers``: one writer per pool: a pool may move to another node once (a takeover), but
  a node that handed a pool over never writes it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import get_args

from pool_managerd.core.machine import DESTINATIONS, INITIAL
from pool_managerd.lifecycle.supervision import SupervisionState
from pool_managerd.messages import (
    EngineAdopted,
    EngineExited,
    EngineInfo,
    EngineSpawned,
    EngineSpec,
    Event,
    EventBody,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    Placement,
    PoolState,
    StateChanged,
)

_FAILURE_TRIGGERS = frozenset({"preload_failed", "engine_exited", "health_lost", "backoff_elapsed"})
_DEADLINE_STATES = frozenset({"preloading", "draining", "restarting"})
_ENGINE_STOPPED = frozenset({"unready", "restarting", "failed", "preloading"})


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken invariant, naming the pool and the event where it was found."""

    code: str
    pool: str
    seq: int
    message: str


@dataclass(slots=True)
class PoolView:
    """Everything the event log says about one pool, as of its last folded event."""

    pool: str
    state: PoolState = INITIAL
    seq: int = 0
    writer: str | None = None
    writers: list[str] = field(default_factory=list)
    spec: EngineSpec | None = None
    placement: Placement | None = None
    pending_spec: EngineSpec | None = None
    pending_placement: Placement | None = None
    reloading: bool = False
    mask: str | list[str] | None = None
    mask_known: bool = False
    """Whether the log recorded the mask asked for (logs before that field leave the configured one)."""
    policy: str | None = None
    pending_mask: str | list[str] | None = None
    pending_policy: str | None = None
    rollback_spec: EngineSpec | None = None
    rollback_mask: str | list[str] | None = None
    rollback_policy: str | None = None
    engine: EngineInfo | None = None
    deadline_at: float | None = None
    """When the current preload/drain times out, or when the backoff ends (restarting)."""
    leases: dict[str, float] = field(default_factory=dict)
    restarts: int = 0
    crashes: int = 0
    last_error: str | None = None
    last_ts: float = 0.0
    last_event: str | None = None
    consecutive_failures: int = 0
    restart_times: list[float] = field(default_factory=list)
    ready_since: float | None = None
    cause: tuple[str | None, str | None] = (None, None)
    """(command_id, traceparent) of the last command the pool applied."""

    def supervision(self) -> SupervisionState:
        return SupervisionState(self.consecutive_failures, tuple(self.restart_times), self.ready_since)


@dataclass(slots=True)
class Fold:
    """Folds events one at a time; ``views`` holds each pool's state, ``violations`` what broke."""

    expect_start: bool = False
    """True: a pool's first event must have ``seq`` 1 (a whole log); False: a fold may start
    mid-log (``--from-seq``)."""
    views: dict[str, PoolView] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    events: int = 0

    def apply(self, event: Event) -> Violation | None:
        """Fold one event; returns the violation it caused, if any (also kept in ``violations``)."""
        self.events += 1
        pool = event.pool
        if pool is None:
            return None  # node events carry no pool state
        # A violation is recorded and the fold goes on with what the event says, so one broken
        # event is reported once instead of cascading through the rest of the log.
        found: Violation | None = None
        view = self.views.get(pool)
        if view is None:
            view = self.views[pool] = PoolView(pool)
            if self.expect_start and event.seq != 1:
                found = self._violate("seq_gap", pool, event.seq, f"first event of pool {pool!r} has seq {event.seq}")
        elif event.seq != view.seq + 1:
            found = self._violate(
                "seq_gap",
                pool,
                event.seq,
                f"pool {pool!r}: seq {event.seq} follows {view.seq} (want {view.seq + 1})",
            )
        if event.node != view.writer:
            if event.node in view.writers:
                found = found or self._violate(
                    "two_writers", pool, event.seq,
                    f"pool {pool!r}: node {event.node!r} writes again after {view.writer!r} took the pool over",
                )  # fmt: skip
            else:
                view.writers.append(event.node)
            view.writer = event.node
        view.seq = event.seq
        view.last_ts = event.ts
        if event.fingerprint is not None:
            view.cause = (event.command_id, event.traceparent)
        body = event.body
        cls = body.__class__
        view.last_event = _TAGS[cls]
        # Replay folds millions of events: one dict dispatch instead of an isinstance chain.
        if cls is StateChanged:
            return self._transition(view, event, body) or found  # type: ignore[arg-type]
        handler = _HANDLERS.get(cls)
        if handler is not None:
            handler(view, event)
        return found

    def _transition(self, view: PoolView, event: Event, body: StateChanged) -> Violation | None:
        found = None
        if body.src != view.state or body.dst not in DESTINATIONS.get((body.src, body.trigger), ()):
            why = "is not a row of the lifecycle table" if body.src == view.state else f"but the pool is {view.state}"
            found = self._violate(
                "illegal_transition", view.pool, event.seq,
                f"pool {view.pool!r} seq {event.seq}: {body.src} --{body.trigger}--> {body.dst} {why}",
            )  # fmt: skip
        view.state = body.dst
        dst = body.dst
        if dst == "failed":
            view.placement = None
        if dst in _ENGINE_STOPPED:
            # The machine stops (or has lost) the engine on these rows; its exit event may follow.
            view.engine = None
        trigger = body.trigger
        asked_mask = None if body.mask == "auto" else body.mask
        if trigger == "reload":
            view.pending_spec = body.spec
            view.pending_mask, view.pending_policy = asked_mask, body.policy
        elif trigger == "drained" and dst == "preloading":
            # The reload's swap: the old spec is what a failure of the new one rolls back to.
            view.rollback_spec, view.rollback_mask, view.rollback_policy = view.spec, view.mask, view.policy
            if body.spec is not None:
                view.spec = body.spec
        elif body.spec is not None:
            view.spec = body.spec
        if body.mask is not None and trigger != "reload":
            view.mask, view.mask_known = asked_mask, True
        if body.policy is not None and trigger != "reload":
            view.policy = body.policy
        if trigger == "preload_failed" and body.reload and dst == "restarting" and view.rollback_spec is not None:
            view.spec, view.mask, view.policy = view.rollback_spec, view.rollback_mask, view.rollback_policy
            view.rollback_spec = view.rollback_mask = view.rollback_policy = None
        if dst in ("ready", "unready", "failed"):
            view.rollback_spec = view.rollback_mask = view.rollback_policy = None
        if body.trigger == "reload":
            view.reloading = True
            view.pending_placement = body.placement
        if dst == "preloading":
            if body.placement is not None:
                view.placement = body.placement
            if body.trigger == "drained":
                view.reloading = False
                view.pending_spec = None
                view.pending_placement = None
        view.deadline_at = body.deadline_at if dst in _DEADLINE_STATES else None
        if dst == "restarting" and body.delay_s is not None:
            view.deadline_at = event.ts + body.delay_s
        if body.trigger in _FAILURE_TRIGGERS and dst in ("restarting", "failed"):
            view.last_error = body.reason or view.last_error
            if body.attempt is not None:
                view.consecutive_failures = body.attempt
            if dst == "restarting" and not body.reload:
                view.restarts += 1
                view.restart_times.append(event.ts)
            if body.crashed or body.exit_code is not None:  # v1 logs before "crashed" had the exit code only
                view.crashes += 1
            view.ready_since = None
            view.leases.clear()
        if trigger == "drained":
            # Both rows stop the old engine, and its leases go with it (a reload's swap too).
            view.leases.clear()
        if trigger == "internal_error":
            # The machine stopped everything it could not trust: engine, leases, a reload.
            view.last_error = body.reason or view.last_error
            view.ready_since = None
            view.leases.clear()
            view.reloading = False
            view.pending_spec = view.pending_placement = None
        if dst == "ready":
            if not (body.trigger == "drain_deadline" and view.ready_since is not None):
                # An aborted reload keeps the engine that has been ready all along.
                view.ready_since = event.ts
            view.last_error = None
            if body.trigger == "drain_deadline":
                view.reloading = False
                view.pending_spec = None
                view.pending_placement = None
        if dst == "unready":
            view.placement = None
            view.leases.clear()
            view.reloading = False
            view.pending_spec = None
            view.pending_placement = None
            if body.trigger == "reset":
                view.consecutive_failures = 0
                view.restart_times.clear()
                view.last_error = None
        return found

    def _violate(self, code: str, pool: str, seq: int, message: str) -> Violation:
        violation = Violation(code, pool, seq, message)
        self.violations.append(violation)
        return violation


def _spawned(view: PoolView, event: Event) -> None:
    body = event.body
    assert isinstance(body, EngineSpawned)
    view.engine = EngineInfo(pid=body.pid, pgid=body.pgid, port=body.port, started_at=event.ts,
                             argv=list(body.argv), log_path=body.log_path)  # fmt: skip


def _adopted(view: PoolView, event: Event) -> None:
    body = event.body
    assert isinstance(body, EngineAdopted)
    started = view.engine.started_at if view.engine else event.ts
    view.engine = EngineInfo(pid=body.pid, pgid=body.pgid, port=body.port, started_at=started)


def _exited(view: PoolView, event: Event) -> None:
    body = event.body
    assert isinstance(body, EngineExited)
    if view.engine is not None and view.engine.pid == body.pid:
        view.engine = None


def _lease_granted(view: PoolView, event: Event) -> None:
    body = event.body
    assert isinstance(body, LeaseGranted)
    view.leases[body.lease_id] = body.expires_at


def _lease_gone(view: PoolView, event: Event) -> None:
    body = event.body
    assert isinstance(body, LeaseReleased | LeaseExpired)
    view.leases.pop(body.lease_id, None)


_HANDLERS: dict[type, Callable[[PoolView, Event], None]] = {
    EngineSpawned: _spawned,
    EngineAdopted: _adopted,
    EngineExited: _exited,
    LeaseGranted: _lease_granted,
    LeaseReleased: _lease_gone,
    LeaseExpired: _lease_gone,
}

_TAGS: dict[type, str] = {cls: str(cls.__struct_config__.tag) for cls in get_args(EventBody)}


def fold(events: Iterable[Event], *, expect_start: bool = False) -> Fold:
    """Fold every event; see :class:`Fold`."""
    f = Fold(expect_start=expect_start)
    apply = f.apply
    for event in events:
        apply(event)
    return f
