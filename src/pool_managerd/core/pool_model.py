"""One pool's ``transitions`` model: its state value, the bookkeeping beside it, its outbox, and
the callbacks the table's rows name.

Callbacks never do I/O. Guards and ``prepare`` callbacks call pure policy functions (the
injected planner for placement/preflight, :mod:`pool_managerd.lifecycle.supervision` for restart
decisions); ``before``/``after`` callbacks append events and effects to the pool's outbox, which
the shell executes. Decisions are stored in the trigger's keyword arguments and recorded in the
``state_changed`` event, so a replay can pass them back in and needs no clock, RNG or GPU.

No callback assigns the pool's state: it is one immutable value (:class:`~pool_managerd.core.
state.PoolValue`) that :meth:`PoolModel.emit` evolves by each event it appends, with the same
:func:`~pool_managerd.core.state.evolve` that replay and recovery fold the log with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, cast

from transitions import EventData

from pool_managerd.contract.errors import IllegalTransition
from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    Accepted,
    BackoffScheduled,
    DrainForced,
    EngineSpec,
    Event,
    EventBody,
    LeaseExpired,
    Placement,
    PoolClaimed,
    PoolState,
    Rejected,
    ReloadRolledBack,
    RestartLimitReached,
    StateChanged,
    StatusReply,
)
from pool_managerd.core.definitions import Context, Planner, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import ArmTimer, CancelTimer, Effect, SpawnEngine, StopEngine, TimerName
from pool_managerd.core.health import HealthState
from pool_managerd.core.registry import Entry
from pool_managerd.core.state import PoolValue, evolve, expired, initial
from pool_managerd.core.table import ALLOWED
from pool_managerd.lifecycle import drain as drain_policy
from pool_managerd.lifecycle import supervision
from pool_managerd.lifecycle.supervision import Decision, SupervisionState

# ----------------------------------------------------------------------------------------------
# Inputs and outputs of one step
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """The result of one step: the reply (for commands), events to append, effects to run.
    ``undo`` puts the pool back as it was before the step (see
    :meth:`~pool_managerd.core.machine.PoolMachine.revert`)."""

    reply: Accepted | Rejected | StatusReply | None
    events: list[Event]
    effects: list[Effect]
    undo: Checkpoint | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A pool as it was before a step: its state value and the shell's bookkeeping."""

    value: PoolValue
    observed: tuple[Any, ...]


_OBSERVED = ("health", "last_heartbeat", "perf_hints", "timers", "timer_seq", "stopping", "drain_deadline_s",
             "last_plan_rejected", "verifying", "pending_claim")  # fmt: skip
"""What a pool keeps besides its state value: observations and effect bookkeeping the log does
not record (the probe streak, timer tokens, pids being stopped), all fresh after a restart."""

_HEALTH_RESET = frozenset({"preloading", "restarting", "failed", "unready"})
"""Destinations that start from a new engine or none: what was probed of the old one is void."""


def _copied(value: Any) -> Any:
    # The mutable containers a step may change in place; everything else is immutable.
    return copy.copy(value) if isinstance(value, dict | set | list) else value


# ----------------------------------------------------------------------------------------------
# The model: one per pool, all held by the shared machine
# ----------------------------------------------------------------------------------------------


class PoolModel:
    """The ``transitions`` model of one pool. Its trigger methods are bound by the machine; the
    shell never calls them directly but goes through :class:`~pool_managerd.core.machine.PoolMachine`.

    The pool's state is :attr:`value`, changed only by :meth:`emit`, which applies
    :func:`~pool_managerd.core.state.evolve` to each event it appends. The machine's callbacks
    decide and emit; none of them assigns a field of the state."""

    def __init__(self, definition: PoolDefinition, node: str, planner: Planner, *, simulated: bool = False) -> None:
        self.definition = definition
        self.node = node
        self.planner = planner
        self.simulated = simulated
        self.value: PoolValue = initial(definition.pool, definition.spec, definition.device_mask,
                                        definition.split_policy)  # fmt: skip
        self.prior: PoolValue = self.value
        """The value before the current transition's ``state_changed``: what its ``after``
        callbacks stop (the engine, its grace) was in it."""
        self.health = HealthState()
        self.last_heartbeat: float | None = None
        self.perf_hints: dict[str, float] = {}
        self.timers: dict[TimerName, int] = {}
        self.timer_seq = 0
        self.stopping: set[int] = set()
        self.drain_deadline_s = 0.0
        self.ctx = Context(now=0.0)
        self.last_plan_rejected: PlanRejected | None = None
        self.pending_claim: PoolClaimed | None = None
        """The first claim of a pool without events: written just before its first event, so a
        pool nobody has used has no history (and its status says ``seq`` 0)."""
        self.verifying: int | None = None
        """The engine pid whose GPU memory the shell is sampling (``VerifyGpus``), if any."""
        self.step_cause: tuple[str | None, str | None] | None = None
        """Set while a command's own step runs: the (command_id, traceparent) its events carry."""
        self.fingerprint: str | None = None
        """Set while a command's own step runs: what its events carry as ``fingerprint``."""
        self.events: list[Event] = []
        self.effects: list[Effect] = []

    # --- the state, read-only ----------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        return self.value.state

    @state.setter
    def state(self, dest: PoolState) -> None:
        # transitions sets the model's state after before_state_change; by then the recorded
        # state_changed event has evolved the value to the row's destination.
        if dest != self.value.state:
            raise RuntimeError(f"pool {self.pool_id!r}: the machine moved to {dest} unrecorded")

    @property
    def pool_id(self) -> str:
        return self.value.pool

    @property
    def spec(self) -> EngineSpec:
        assert self.value.spec is not None
        return self.value.spec

    @property
    def mask(self) -> str | list[str] | None:
        return self.value.mask

    @property
    def split_policy(self) -> str | None:
        return self.value.policy

    @property
    def reloading(self) -> bool:
        return self.value.reloading

    @property
    def pending_spec(self) -> EngineSpec | None:
        return self.value.pending_spec

    @property
    def rollback(self) -> tuple[EngineSpec, str | list[str] | None, str | None] | None:
        return self.value.rollback

    @property
    def supervision(self) -> SupervisionState:
        return self.value.supervision

    @property
    def attempt(self) -> int:
        return self.value.attempt

    @property
    def cause(self) -> tuple[str | None, str | None]:
        return self.value.cause

    @property
    def entry(self) -> Entry:
        """The registry's view of this pool (derived, read-only)."""
        return Entry(self.value, self.node, self.health, self.last_heartbeat, dict(self.perf_hints), self.simulated)

    # --- transactions ----------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """Everything a step may change: the value as it is (immutable) and the bookkeeping, copied."""
        return Checkpoint(self.value, tuple(_copied(getattr(self, name)) for name in _OBSERVED))

    def revert(self, saved: Checkpoint) -> None:
        """Put the pool back exactly as ``saved`` recorded it."""
        self.value = self.prior = saved.value
        for name, value in zip(_OBSERVED, saved.observed, strict=True):
            setattr(self, name, _copied(value))

    # --- outbox ----------------------------------------------------------------------------

    def emit(self, body: EventBody) -> Event:
        """Append an event with the next per-pool sequence, and evolve the pool by it."""
        if self.pending_claim is not None and body.__class__ is not PoolClaimed:
            claim, self.pending_claim = self.pending_claim, None
            self.emit(claim)
        command_id, traceparent = self.step_cause if self.step_cause is not None else self.value.cause
        event = Event(
            v=SCHEMA_VERSION,
            seq=self.value.seq + 1,
            ts=self.ctx.now,
            node=self.node,
            pool=self.pool_id,
            command_id=command_id,
            traceparent=traceparent,
            fingerprint=self.fingerprint,
            # A claim opens its epoch; every other event is written under the one held.
            epoch=body.epoch if isinstance(body, PoolClaimed) else (self.value.epoch or None),
            body=body,
        )
        if isinstance(body, StateChanged):
            self.prior = self.value
            if body.dst in _HEALTH_RESET:
                self.health = HealthState()
                self.verifying = None
        self.value = evolve(self.value, event)
        self.events.append(event)
        return event

    def arm(self, name: TimerName, delay_s: float) -> None:
        self.timer_seq += 1
        self.timers[name] = self.timer_seq
        self.effects.append(ArmTimer(name, max(0.0, delay_s), self.timer_seq))

    def cancel(self, *names: TimerName) -> None:
        for name in names:
            if self.timers.pop(name, None) is not None:
                self.effects.append(CancelTimer(name))

    def stop_engine(self, reason: str, grace_s: float | None = None) -> None:
        """Ask the shell to stop the engine the transition left behind; its exit is then expected,
        not a crash."""
        engine = self.prior.engine
        if engine is None or (self.value.engine is not None and self.value.engine.pid == engine.pid):
            return
        self.stopping.add(engine.pid)
        spec = self.prior.spec or self.spec
        grace = spec.stop_grace_s if grace_s is None else grace_s
        self.effects.append(StopEngine(engine.pid, engine.pgid, grace, reason))

    # --- one step: begin, fire rows, collect the outcome ----------------------------------------

    def begin(self, ctx: Context) -> None:
        """Start a step at ``ctx``: an empty outbox, no command cause yet."""
        self.ctx = ctx
        self.events = []
        self.effects = []
        self.fingerprint = None
        self.step_cause = None
        self.prior = self.value

    def outcome(self, reply: Accepted | Rejected | StatusReply | None) -> Outcome:
        """The step's result: ``reply`` and what the outbox collected."""
        return Outcome(reply, self.events, self.effects)

    def fire(self, trigger: str, **kwargs: Any) -> bool:
        """Fire ``trigger`` if the table allows it from the current state. Returns whether the
        state machine took a row; raises :class:`IllegalTransition` otherwise."""
        if trigger not in ALLOWED[self.state]:
            raise IllegalTransition(self.pool_id, trigger, self.state, ALLOWED[self.state])
        before = len(self.events)
        self.trigger(trigger, **kwargs)  # type: ignore[attr-defined]
        # A row was taken iff it recorded its state_changed event (before_state_change).
        return any(isinstance(e.body, StateChanged) for e in self.events[before:])

    # --- leases: what every step that drops one does ---------------------------------------------

    def drop_expired_leases(self) -> None:
        """Drop the leases expired by now (``lease_expired`` each), then what any drop does."""
        for lease_id in expired(self.value, self.ctx.now):
            self.emit(LeaseExpired(lease_id=lease_id, active=self.value.active_leases - 1))
        self.after_lease_drop()

    def arm_lease_expiry(self) -> None:
        """Arm the ``lease_expiry`` timer for the next lease to expire, or cancel it if none."""
        nxt = self.value.next_expiry()
        if nxt is None:
            self.cancel("lease_expiry")
        else:
            self.arm("lease_expiry", nxt - self.ctx.now)

    def after_lease_drop(self) -> None:
        """A lease went: a drain with none left completes, otherwise the expiry timer moves."""
        if self.state == "draining" and drain_policy.complete_now(self.value.active_leases):
            self.fire("drained", reason="leases reached 0", leases_left=0)
        else:
            self.arm_lease_expiry()

    # --- prepare callbacks: compute decisions unless replay supplied them --------------------

    def _place(self, ev: EventData) -> None:
        kw = ev.kwargs
        if "placement" in kw or "plan_rejected" in kw:
            return
        spec: EngineSpec = kw.get("new_spec") or kw.get("spec") or self.pending_spec or self.spec
        mask = kw["mask"] if kw.get("mask") is not None else self.mask
        policy = kw.get("policy") or self.split_policy
        request = PlanRequest(self.pool_id, spec, mask, policy, self.ctx.snapshot, self.ctx.host, self.definition)
        result = self.planner(request)
        if isinstance(result, PlanRejected):
            kw["plan_rejected"] = result
            self.last_plan_rejected = result
        else:
            kw["placement"] = result
            self.last_plan_rejected = None

    def _supervise(self, ev: EventData) -> None:
        kw = ev.kwargs
        if "decision" in kw:
            return
        cause = str(kw.get("cause") or ev.event.name)
        if ev.event.name == "backoff_elapsed" and "plan_rejected" in kw:
            cause = f"re-placement failed: {kw['plan_rejected'].message}"
        if self.rollback is not None and ev.event.name == "preload_failed":
            # A reloaded spec that fails is not a crash loop of the pool: restore the old spec now.
            # The old engine is gone too: the pool is not ready since anything any more.
            settled = replace(self.supervision, ready_since=None)
            kw["decision"] = Decision(True, 0.0, self.supervision.consecutive_failures,
                                      f"{cause}; reload failed, rolling back", settled)  # fmt: skip
            kw["rollback"] = True
            return
        policy = self.definition.restart
        kw["decision"] = supervision.on_failure(policy, self.supervision, self.ctx.now, self.ctx.rand, cause)

    # --- guards ----------------------------------------------------------------------------

    def _is_placed(self, ev: EventData) -> bool:
        return ev.kwargs.get("placement") is not None

    def _will_restart(self, ev: EventData) -> bool:
        return bool(ev.kwargs["decision"].restart)

    def _is_reload(self, ev: EventData) -> bool:
        return self.reloading

    # --- the state_changed record (machine-wide before_state_change) -------------------------

    def _record(self, ev: EventData) -> None:
        kw = ev.kwargs
        trigger = ev.event.name
        assert ev.transition is not None
        src = cast(PoolState, ev.transition.source)
        dst = cast(PoolState, ev.transition.dest)
        decision: Decision | None = kw.get("decision")
        placement: Placement | None = kw.get("placement") if dst in ("preloading", "draining") else None
        spec: EngineSpec | None = None
        deadline_at = None
        mask: str | list[str] | None = None
        policy: str | None = None
        value = self.value
        if trigger == "drained" and dst == "preloading":
            mask, policy = value.pending_mask, value.pending_policy or self.split_policy
        elif trigger in ("preload", "reload") or dst == "preloading":
            mask = kw["mask"] if kw.get("mask") is not None else self.mask
            policy = kw.get("policy") or self.split_policy
        if dst == "preloading" or trigger == "reload":
            mask = "auto" if mask is None else mask
        if dst == "preloading":
            if trigger == "drained" and value.pending_spec:
                spec = value.pending_spec
            else:
                spec = kw.get("spec") or self.spec
            if trigger == "drained":
                placement = value.pending_placement
            deadline_at = self.ctx.now + spec.load_timeout_s
        elif trigger == "reload":
            spec = kw.get("new_spec")
        if dst == "draining":
            deadline_at = self.ctx.now + float(kw.get("deadline_s", 30.0))
        reason = str(kw.get("reason") or (decision.reason if decision else "") or kw.get("cause") or "")
        self.emit(
            StateChanged(
                trigger=trigger,
                src=src,
                dst=dst,
                reason=reason,
                placement=placement,
                spec=spec,
                delay_s=decision.delay_s if decision and decision.restart else None,
                deadline_at=deadline_at,
                exit_code=kw.get("exit_code"),
                leases_left=kw.get("leases_left"),
                attempt=decision.attempt if decision else None,
                # A rollback's restart is part of the reload, not a crash restart of the pool.
                reload=self.reloading or trigger == "reload" or bool(kw.get("rollback")),
                mask=mask,
                policy=policy,
                crashed=bool(kw.get("crashed")),
            )
        )

    # --- after callbacks: effects and the events that follow a transition ----------------------

    def _spawn(self, ev: EventData) -> None:
        placement = self.value.placement
        if not isinstance(placement, Placement):
            # Guarded by _is_placed / staged by reload: anything else is a planner breaking its
            # contract, found after the row was taken; the step is undone as a whole.
            raise TypeError(f"the planner returned {type(placement).__name__}, not a Placement")
        self.arm("load_timeout", self.spec.load_timeout_s)
        self.effects.append(SpawnEngine(self.spec, placement, self.attempt))

    def _became_ready(self, ev: EventData) -> None:
        self.cancel("load_timeout")

    def _settle_failure(self, ev: EventData, grace_s: float | None) -> Decision:
        """What every failure row does, restart or not: stop the engine (the recorded row has
        already dropped its leases and counted the failure)."""
        decision: Decision = ev.kwargs["decision"]
        self.stop_engine(decision.reason, grace_s=grace_s)
        return decision

    def _schedule_restart(self, ev: EventData) -> None:
        self.cancel("load_timeout", "lease_expiry")
        # An engine that exited needs no grace; a hung or timed-out one is killed at once too.
        decision = self._settle_failure(ev, grace_s=0.0 if ev.event.name != "engine_exited" else None)
        if ev.kwargs.get("rollback"):
            self.emit(ReloadRolledBack(reason=decision.reason))
        else:
            self.emit(BackoffScheduled(delay_s=decision.delay_s, attempt=decision.attempt, reason=decision.reason))
        self.arm("backoff", decision.delay_s)

    def _give_up(self, ev: EventData) -> None:
        self.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        decision = self._settle_failure(ev, grace_s=0.0)
        policy = self.definition.restart
        restarts = len(decision.state.restart_times)
        self.emit(RestartLimitReached(restarts=restarts, window_s=policy.window_s, reason=decision.reason))

    def _begin_drain(self, ev: EventData) -> None:
        self.drain_deadline_s = float(ev.kwargs.get("deadline_s", 30.0))
        if drain_policy.complete_now(self.value.active_leases):
            # Queued by the machine: runs right after this transition completes.
            self.drained(reason="no leases held")  # type: ignore[attr-defined]
        else:
            self.arm("drain_deadline", self.drain_deadline_s)

    def _swap_to_reload(self, ev: EventData) -> None:
        self.cancel("drain_deadline", "lease_expiry")
        self.stop_engine("reload: stopping the old engine")

    def _stop_and_clear(self, ev: EventData) -> None:
        self.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        self.stop_engine(str(ev.kwargs.get("reason") or ev.event.name), ev.kwargs.get("grace_s"))

    def _force_drain(self, ev: EventData) -> None:
        # The leases the deadline cut short: the recorded row has dropped them already.
        leases_left = int(ev.kwargs.get("leases_left") or 0)
        self.emit(DrainForced(leases_left=leases_left, deadline_s=self.drain_deadline_s))
        self._stop_and_clear(ev)

    def _abort_reload(self, ev: EventData) -> None:
        self.cancel("drain_deadline")

    def _internal_failure(self, ev: EventData) -> None:
        self.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        self.stop_engine(str(ev.kwargs.get("reason") or "internal error"))
