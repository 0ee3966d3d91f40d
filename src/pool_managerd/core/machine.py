"""The pool lifecycle: the table as data, and ONE shared ``transitions.Machine`` for all pools.

The table (:data:`ROWS`) is plain data. It drives the live machine built here, the replay fold
(:mod:`pool_managerd.core.fold`), the generated diagrams in ``schemas/`` and the property tests.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import msgspec
from transitions import EventData, Machine

from pool_managerd.contract.errors import IllegalTransition, LeaseRefused, UnknownLease, UnknownPool
from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    Accepted,
    AckCorruptCmd,
    BackoffScheduled,
    DrainCmd,
    DrainForced,
    EngineAdopted,
    EngineExited,
    EngineInfo,
    EngineSpawned,
    EngineSpec,
    Event,
    EventBody,
    GpuVerified,
    HealthChanged,
    HealthReport,
    InternalError,
    LeaseCmd,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LifecycleReply,
    LogCorruptAcknowledged,
    Placement,
    PoolClaimed,
    PoolCommand,
    PoolReleased,
    PoolState,
    PreloadCmd,
    Problem,
    RejectCode,
    Rejected,
    ReleaseCmd,
    ReloadCmd,
    ReloadRolledBack,
    RestartLimitReached,
    StateChanged,
    StatusCmd,
    StatusReply,
    StopCmd,
    TransitionRow,
    command_fingerprint,
)
from pool_managerd.core import gpu_verify
from pool_managerd.core.command_spec import BadCommand, check_command, requested_spec
from pool_managerd.core.definitions import Context, Planner, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import (
    ArmTimer,
    CancelTimer,
    Effect,
    ReleaseEngine,
    SpawnEngine,
    StopEngine,
    TimerName,
    VerifyGpus,
)
from pool_managerd.core.health import HealthState, assess
from pool_managerd.core.inputs import (
    ClaimInput,
    CommandInput,
    EngineAdoptedInput,
    EngineExitedInput,
    EngineStarted,
    ExpireLeases,
    GpuChecked,
    HealthInput,
    PoolInput,
    ReleaseInput,
    RemoveInput,
    RestoreInput,
    SpawnFailed,
    TimerFired,
    label,
)
from pool_managerd.core.registry import Entry, Registry
from pool_managerd.core.state import PoolValue, check_acquire, check_release, evolve, expired, initial
from pool_managerd.lifecycle import drain as drain_policy
from pool_managerd.lifecycle import preload as preload_policy
from pool_managerd.lifecycle import supervision
from pool_managerd.lifecycle.supervision import Decision, SupervisionState

# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

STATES: tuple[PoolState, ...] = ("unready", "preloading", "ready", "draining", "restarting", "failed")
INITIAL: PoolState = "unready"

RowKind = Literal["command", "fact", "timer"]


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the lifecycle table. ``conditions``/``unless`` name model guards; ``prepare``
    names callbacks that compute decisions; ``after`` names the callback that emits effects."""

    trigger: str
    source: PoolState
    dest: PoolState
    kind: RowKind
    note: str
    prepare: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


_FAIL_PREP = ("_supervise",)


def _failure_rows(trigger: str, source: PoolState, kind: RowKind, what: str) -> list[Row]:
    return [
        Row(trigger, source, "restarting", kind, f"{what}; supervision schedules a restart",
            _FAIL_PREP, ("_will_restart",), (), ("_schedule_restart",)),
        Row(trigger, source, "failed", kind, f"{what}; restart limit reached",
            _FAIL_PREP, (), ("_will_restart",), ("_give_up",)),
    ]  # fmt: skip


ROWS: tuple[Row, ...] = (
    Row("preload", "unready", "preloading", "command",
        "preflight and placement succeed against the current GPU snapshot",
        ("_place",), ("_is_placed",), (), ("_spawn",)),
    Row("engine_ready", "preloading", "ready", "fact",
        "first healthy probe (HTTP 200) of the current engine, then its GPU memory verified (gpu_verified)",
        after=("_became_ready",)),
    *_failure_rows("preload_failed", "preloading", "fact", "spawn error, exit during load or load timeout"),
    *_failure_rows("engine_exited", "ready", "fact", "the engine process exited"),
    *_failure_rows("health_lost", "ready", "fact", "consecutive failed health probes"),
    Row("backoff_elapsed", "restarting", "preloading", "timer",
        "re-placed against the current snapshot", ("_place",), ("_is_placed",), (), ("_spawn",)),
    Row("backoff_elapsed", "restarting", "restarting", "timer",
        "re-placement failed; supervision schedules another try",
        ("_place", "_supervise"), ("_will_restart",), ("_is_placed",), ("_schedule_restart",)),
    Row("backoff_elapsed", "restarting", "failed", "timer",
        "re-placement failed; restart limit reached",
        ("_place", "_supervise"), (), ("_is_placed", "_will_restart"), ("_give_up",)),
    Row("drain", "ready", "draining", "command", "new leases refused; waits for leases to reach 0",
        after=("_begin_drain",)),
    Row("drain", "preloading", "draining", "command", "abandons the load; completes at once",
        after=("_begin_drain",)),
    Row("reload", "ready", "draining", "command",
        "the new spec is placed first; then drains the old engine",
        ("_place",), ("_is_placed",), (), ("_begin_drain",)),
    Row("drained", "draining", "unready", "fact", "leases reached 0; engine stopped",
        unless=("_is_reload",), after=("_stop_and_clear",)),
    Row("drained", "draining", "preloading", "fact", "reload: old engine stopped, new spec starts",
        conditions=("_is_reload",), after=("_swap_to_reload", "_spawn")),
    Row("drain_deadline", "draining", "unready", "timer", "deadline passed: engine stopped with leases held",
        unless=("_is_reload",), after=("_force_drain",)),
    Row("drain_deadline", "draining", "ready", "timer", "reload aborted at the deadline; old engine kept",
        conditions=("_is_reload",), after=("_abort_reload",)),
    *(Row("stop", s, "unready", "command", "graceful stop: SIGTERM to the group, SIGKILL after grace",
          after=("_stop_and_clear",)) for s in STATES if s != "unready"),
    Row("reset", "failed", "unready", "command", "operator acknowledges a crash loop"),
    *(Row("internal_error", s, "failed", "fact",
          "a step raised: nothing it computed is kept, the engine is stopped, an operator resets the pool",
          after=("_internal_failure",)) for s in STATES if s != "failed"),
)  # fmt: skip
"""The lifecycle table. Rows sharing (trigger, source) are tried in order; guards pick one."""

TRIGGERS: tuple[str, ...] = tuple(dict.fromkeys(row.trigger for row in ROWS))
COMMAND_TRIGGERS = frozenset(row.trigger for row in ROWS if row.kind == "command")

ALLOWED: Mapping[PoolState, tuple[str, ...]] = {
    state: tuple(dict.fromkeys(row.trigger for row in ROWS if row.source == state)) for state in STATES
}
"""Triggers allowed per state (in table order)."""

DESTINATIONS: Mapping[tuple[PoolState, str], frozenset[PoolState]] = {
    (row.source, row.trigger): frozenset(r.dest for r in ROWS if (r.source, r.trigger) == (row.source, row.trigger))
    for row in ROWS
}
"""(source, trigger) → the states the table may lead to: what the replay fold checks against."""


CLIENT_VERBS: tuple[str, ...] = ("preload", "drain", "reload", "stop", "reset", "lease", "release", "status")
"""The verbs a client may send on ``poold.cmd.<pool>.<verb>``."""


def client_verbs(state: PoolState) -> tuple[str, ...]:
    """The verbs a client may send to a pool in ``state`` (what ``illegal_transition`` lists as
    ``allowed``): the table's command rows from ``state``, ``lease`` when ready, ``release``
    while leases can be held, and ``status`` always. Internal facts never appear."""
    verbs = [t for t in ALLOWED[state] if t in COMMAND_TRIGGERS]
    if state == "ready":
        verbs.append("lease")
    if state in ("ready", "draining"):
        verbs.append("release")
    verbs.append("status")
    return tuple(v for v in CLIENT_VERBS if v in verbs)


def is_legal(source: PoolState, trigger: str, dest: PoolState) -> bool:
    """Whether ``source --trigger--> dest`` is a row of the table."""
    return dest in DESTINATIONS.get((source, trigger), frozenset())


def describe() -> LifecycleReply:
    """The table as a wire message (node ``lifecycle`` command, schemas/lifecycle.json)."""
    return LifecycleReply(
        states=list(STATES),
        initial=INITIAL,
        transitions=[TransitionRow(trigger=r.trigger, source=r.source, dest=r.dest, kind=r.kind, note=r.note)
                     for r in ROWS],
        allowed={state: list(triggers) for state, triggers in ALLOWED.items()},
    )  # fmt: skip


def mermaid() -> str:
    """The table as a Mermaid state diagram."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL}"]
    seen: set[tuple[str, str, str]] = set()
    for row in ROWS:
        key = (row.source, row.dest, row.trigger)
        if key not in seen:
            seen.add(key)
            lines.append(f"    {row.source} --> {row.dest}: {row.trigger}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Inputs and outputs of one step
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """The result of one step: the reply (for commands), events to append, effects to run.
    ``undo`` puts the pool back as it was before the step (see :meth:`Lifecycle.revert`)."""

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
    shell never calls them directly but goes through :class:`Lifecycle`.

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


# ----------------------------------------------------------------------------------------------
# The lifecycle: the shared machine and the pure step functions the shell calls
# ----------------------------------------------------------------------------------------------


def _build_machine() -> Machine:
    transitions = [
        {
            "trigger": r.trigger,
            "source": r.source,
            "dest": r.dest,
            "prepare": list(r.prepare),
            "conditions": list(r.conditions),
            "unless": list(r.unless),
            "after": list(r.after),
        }
        for r in ROWS
    ]
    return Machine(
        model=None,
        states=list(STATES),
        transitions=transitions,
        initial=INITIAL,
        auto_transitions=False,
        send_event=True,
        queued="model",  # type: ignore[arg-type]  # the stubs predate per-model queues
        ignore_invalid_triggers=False,
        before_state_change="_record",
    )


class Lifecycle:
    """Every pool of one node in one shared machine. Each public method is one pure step:
    inputs (a command or a fact, and a :class:`Context`) in, an :class:`Outcome` out."""

    def __init__(self, node: str, planner: Planner, registry: Registry | None = None) -> None:
        self.node = node
        self.planner = planner
        self.registry = registry if registry is not None else Registry(node)
        self.machine = _build_machine()
        self.pools: dict[str, PoolModel] = {}

    # --- pools -------------------------------------------------------------------------------

    def register(self, definition: PoolDefinition, *, simulated: bool = False) -> PoolModel:
        """Add a pool in ``unready`` (the only way a pool comes to exist)."""
        model = PoolModel(definition, self.node, self.planner, simulated=simulated)
        self.registry.register(definition.pool, lambda: model.entry)
        self.machine.add_model(model, initial=INITIAL)
        self.pools[definition.pool] = model
        return model

    def unregister(self, pool: str) -> None:
        """Forget a pool (removed from the configuration and stopped); its events stay in the log."""
        model = self.pool(pool)
        self.machine.remove_model(model)
        self.registry.remove(pool)
        del self.pools[pool]

    def pool(self, pool: str) -> PoolModel:
        try:
            return self.pools[pool]
        except KeyError:
            raise UnknownPool(pool) from None

    def state(self, pool: str) -> PoolState:
        return self.pool(pool).state

    # --- the one way a trigger is fired -------------------------------------------------------

    def _begin(self, model: PoolModel, ctx: Context) -> None:
        model.ctx = ctx
        model.events = []
        model.effects = []
        model.fingerprint = None
        model.step_cause = None
        model.prior = model.value

    # --- the one entry point of the shell ------------------------------------------------------

    def step(self, pool: str, inp: PoolInput, ctx: Context) -> Outcome:
        """Apply one input to ``pool``: a transaction.

        Either the step completes (its events, effects and reply are returned, and ``undo`` can
        still put the pool back, should its events not reach the log), or it raises inside and
        nothing it did is kept: the pool is put back as it was, an ``internal_error`` event is
        recorded and the pool moves to ``failed``, so memory is never ahead of the log and the
        next event never leaves a sequence gap."""
        model = self.pool(pool)
        saved = model.checkpoint()
        try:
            outcome = self._dispatch(pool, inp, ctx)
        except Exception as exc:
            model.revert(saved)
            outcome = self._internal_error(model, inp, exc, ctx, saved)
        outcome.undo = saved
        return outcome

    def revert(self, pool: str, outcome: Outcome) -> None:
        """Undo a step whose events could not be appended (its effects must not run)."""
        if outcome.undo is not None and pool in self.pools:
            self.pools[pool].revert(outcome.undo)

    def _dispatch(self, pool: str, inp: PoolInput, ctx: Context) -> Outcome:
        if isinstance(inp, CommandInput):
            return self.command(pool, inp.cmd, ctx)
        if isinstance(inp, HealthInput):
            return self.health(pool, inp.report, ctx)
        if isinstance(inp, TimerFired):
            return self.timer_fired(pool, inp.name, inp.token, ctx)
        if isinstance(inp, EngineStarted):
            return self.engine_spawned(pool, inp.info, inp.cuda_visible_devices, ctx, inp.attempt)
        if isinstance(inp, SpawnFailed):
            return self.spawn_failed(pool, inp.error, ctx, inp.attempt)
        if isinstance(inp, EngineExitedInput):
            return self.engine_exited(pool, inp.pid, inp.exit_code, inp.signal, ctx)
        if isinstance(inp, EngineAdoptedInput):
            return self.engine_adopted(pool, inp.info, ctx)
        if isinstance(inp, RestoreInput):
            return self.restore(pool, inp.value, ctx)
        if isinstance(inp, RemoveInput):
            return self.remove(pool, inp.drain_s, ctx)
        if isinstance(inp, ExpireLeases):
            return self.expire_leases(pool, ctx)
        if isinstance(inp, ClaimInput):
            return self.claim(pool, inp, ctx)
        if isinstance(inp, ReleaseInput):
            return self.release_ownership(pool, ctx)
        if isinstance(inp, GpuChecked):
            return self.gpu_checked(pool, inp, ctx)
        raise TypeError(f"not a pool input: {type(inp).__name__}")

    def _internal_error(
        self, model: PoolModel, inp: PoolInput, exc: Exception, ctx: Context, saved: Checkpoint
    ) -> Outcome:
        name = label(inp)
        verb = name if isinstance(inp, CommandInput) else None
        self._begin(model, ctx)
        command_id = None
        if isinstance(inp, CommandInput):
            command_id = ctx.command_id or inp.cmd.command_id
            model.step_cause = (command_id, ctx.traceparent)
            model.fingerprint = command_fingerprint(inp.cmd)
        # The exception's class names the bug without leaking its text (paths, values) anywhere.
        error = type(exc).__name__
        try:
            model.emit(InternalError(step=name, error=error))
            if model.state != "failed":
                self._fire(model, "internal_error", reason=f"internal error in step {name} ({error}); pool stopped")
        except Exception:
            # Even the way out failed: keep the pool exactly as it was and report the bare error.
            model.revert(saved)
            self._begin(model, ctx)
            command_id = model.cause[0] if verb is not None else None
        reply: Rejected | None = None
        if verb is not None:
            reply = Rejected(command_id=command_id, pool=model.pool_id, verb=verb, code="internal",
                             message=internal_error_message(verb, model.pool_id), state=model.state)  # fmt: skip
        return self._end(model, reply)

    def remove(self, pool: str, drain_s: float, ctx: Context) -> Outcome:
        """Take a pool the configuration dropped towards ``unready``: drain it if it serves (lease
        holders get ``drain_s``), let a plain drain run out, stop anything else."""
        model = self.pool(pool)
        cid = f"recovery-remove-{pool}"
        cmd: PoolCommand
        if model.state == "ready":
            cmd = DrainCmd(command_id=cid, deadline_s=drain_s)
        elif model.state in ("draining", "unready") and not model.reloading:
            cmd = StatusCmd(command_id=cid)  # its restored deadline stands, or nothing to do
        else:
            cmd = StopCmd(command_id=cid)  # preloading, restarting, failed, or a reload's drain
        return self.command(pool, cmd, ctx)

    def _end(self, model: PoolModel, reply: Accepted | Rejected | StatusReply | None) -> Outcome:
        return Outcome(reply, model.events, model.effects)

    def _fire(self, model: PoolModel, trigger: str, **kwargs: Any) -> bool:
        """Fire ``trigger`` if the table allows it from the current state. Returns whether the
        state machine took a row; raises :class:`IllegalTransition` otherwise."""
        if trigger not in ALLOWED[model.state]:
            raise IllegalTransition(model.pool_id, trigger, model.state, ALLOWED[model.state])
        before = len(model.events)
        model.trigger(trigger, **kwargs)  # type: ignore[attr-defined]
        # A row was taken iff it recorded its state_changed event (before_state_change).
        return any(isinstance(e.body, StateChanged) for e in model.events[before:])

    # --- commands ------------------------------------------------------------------------------

    def command(self, pool: str, cmd: PoolCommand, ctx: Context) -> Outcome:
        """Apply one pool command. Never raises for bad requests: they become ``Rejected``."""
        model = self.pool(pool)
        if ctx.command_id is None:
            ctx = replace(ctx, command_id=cmd.command_id)
        self._begin(model, ctx)
        verb = cmd.__struct_config__.tag
        assert isinstance(verb, str)
        if not isinstance(cmd, StatusCmd):
            # Every event from here to the pool's next command is caused by this one.
            model.step_cause = (ctx.command_id, ctx.traceparent)
            model.fingerprint = command_fingerprint(cmd)
        try:
            reply = self._command(model, verb, cmd)
        except IllegalTransition:
            verbs = client_verbs(model.state)
            message = (f"pool {model.pool_id!r}: {verb!r} is not allowed in state {model.state!r} "
                       f"(allowed: {', '.join(verbs)})")  # fmt: skip
            reply = self._reject(model, verb, "illegal_transition", message, verbs)
        except LeaseRefused as exc:
            reply = self._reject(model, verb, cast(RejectCode, exc.code), exc.message)
        except UnknownLease as exc:
            reply = self._reject(model, verb, "unknown_lease", exc.message)
        except BadCommand as exc:
            reply = self._reject(model, verb, "bad_request", str(exc))
        return self._end(model, reply)

    def _command(self, model: PoolModel, verb: str, cmd: PoolCommand) -> Accepted | Rejected | StatusReply:
        if isinstance(cmd, StatusCmd):
            return StatusReply(pool=self.registry.snapshot(model.pool_id))
        if isinstance(cmd, PreloadCmd):
            spec = model.spec
            if cmd.model is not None and "preload" in ALLOWED[model.state]:
                spec = requested_spec(model.definition, spec, cmd)
            # The recorded row carries the spec, mask and policy asked for: evolve takes them.
            taken = self._fire(model, "preload", spec=spec, mask=cmd.device_mask, policy=cmd.policy)
            if not taken:
                return self._plan_rejected(model, verb)
        elif isinstance(cmd, DrainCmd):
            self._fire(model, "drain", deadline_s=cmd.deadline_s)
        elif isinstance(cmd, ReloadCmd):
            # Only what the configuration declares: the argv is always its template.
            new_spec = requested_spec(model.definition, model.spec, cmd)
            mask_same = cmd.device_mask is None or cmd.device_mask == model.mask
            policy_same = cmd.policy is None or cmd.policy == model.split_policy
            if new_spec == model.spec and mask_same and policy_same and model.state == "ready":
                # Reloading the very same spec is a no-op, not a needless restart.
                return self._accept(model, verb, seq=model.value.seq)
            taken = self._fire(
                model, "reload", new_spec=new_spec, mask=cmd.device_mask, policy=cmd.policy, deadline_s=cmd.deadline_s
            )
            if not taken:
                return self._plan_rejected(model, verb)
        elif isinstance(cmd, StopCmd):
            self._fire(model, "stop", grace_s=cmd.grace_s, reason="stop command")
        elif verb == "reset":
            self._fire(model, "reset", reason="reset command")
        elif isinstance(cmd, LeaseCmd):
            check_command(model.definition, cmd)
            held = model.value.leases
            if cmd.lease_id is not None:
                # Renewal: only the id the grant returned names a lease; a client never picks one.
                check_release(model.value, cmd.lease_id)
                lease_id, holder = cmd.lease_id, held[cmd.lease_id].holder
            else:
                lease_id, holder = model.ctx.new_lease_id or cmd.command_id, cmd.holder
                if lease_id in held:
                    raise UnknownLease(f"pool {model.pool_id!r}: lease id {lease_id!r} is taken; retry")
            check_acquire(model.value, lease_id)
            expires_at = model.ctx.now + cmd.ttl_s
            active = len(held) + (0 if lease_id in held else 1)
            model.emit(LeaseGranted(lease_id=lease_id, expires_at=expires_at, active=active, holder=holder))
            self._arm_lease_expiry(model)
            first = model.events[0].seq
            return self._accept(model, verb, seq=first, lease_id=lease_id, expires_at=expires_at)
        elif isinstance(cmd, AckCorruptCmd):
            # In any state: the shell checked the sequences against the quarantine it holds.
            model.emit(LogCorruptAcknowledged(sequences=sorted(set(cmd.sequences))))
        elif isinstance(cmd, ReleaseCmd):
            check_release(model.value, cmd.lease_id)
            model.emit(LeaseReleased(lease_id=cmd.lease_id, active=model.value.active_leases - 1))
            self._after_lease_drop(model)
        first_seq = model.events[0].seq if model.events else model.value.seq
        return self._accept(model, verb, seq=first_seq)

    def _accept(self, model: PoolModel, verb: str, *, seq: int, lease_id: str | None = None,
                expires_at: float | None = None) -> Accepted:  # fmt: skip
        return Accepted(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, seq=seq,
                        last_seq=model.value.seq, state=model.state, lease_id=lease_id,
                        expires_at=expires_at)  # fmt: skip

    def _reject(self, model: PoolModel, verb: str, code: RejectCode, message: str,
                allowed: Iterable[str] = (), problems: Iterable[Problem] = ()) -> Rejected:  # fmt: skip
        # A refusal changes no state, so it is no event: the shell reports it (audit stream).
        return Rejected(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, code=code,
                        message=message, state=model.state, allowed=list(allowed), problems=list(problems))  # fmt: skip

    def _plan_rejected(self, model: PoolModel, verb: str) -> Rejected:
        # The prepare callback kept the planner's refusal on the model for exactly this reply.
        rejected = model.last_plan_rejected
        code: RejectCode = rejected.code if rejected else "placement_failed"
        message = rejected.message if rejected else "placement failed"
        problems: list[Problem] = list(rejected.problems) if rejected else []
        return Rejected(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, code=code,
                        message=message, state=model.state, problems=problems)  # fmt: skip

    # --- facts ---------------------------------------------------------------------------------

    def engine_spawned(
        self, pool: str, info: EngineInfo, cuda_visible_devices: str, ctx: Context, attempt: int | None = None
    ) -> Outcome:
        """The shell started the engine that ``SpawnEngine`` number ``attempt`` asked for."""
        model = self.pool(pool)
        self._begin(model, ctx)
        current = attempt is None or attempt == model.attempt
        if model.state == "preloading" and current:
            previous = model.value.engine
            if previous is not None and previous.pid != info.pid:
                # Never two engines for one pool: the one recorded earlier goes.
                model.stopping.add(previous.pid)
                model.effects.append(StopEngine(previous.pid, previous.pgid, 0.0, "superseded by a newer spawn"))
            model.emit(EngineSpawned(pid=info.pid, pgid=info.pgid, port=info.port, argv=list(info.argv),
                                     cuda_visible_devices=cuda_visible_devices, log_path=info.log_path,
                                     attempt=model.attempt))  # fmt: skip
            # The engine waits at its gate until this event is in the log.
            model.effects.append(ReleaseEngine(info.pid))
        else:
            # The pool moved on (stopped, drained) while the spawn was in flight: stop the newcomer.
            model.stopping.add(info.pid)
            model.effects.append(StopEngine(info.pid, info.pgid, 0.0, f"spawned after the pool became {model.state}"))
        return self._end(model, None)

    def engine_adopted(self, pool: str, info: EngineInfo, ctx: Context) -> Outcome:
        """After a daemon restart the engine the log names was found alive and taken over."""
        model = self.pool(pool)
        self._begin(model, ctx)
        model.emit(EngineAdopted(pid=info.pid, pgid=info.pgid, port=info.port))
        return self._end(model, None)

    def spawn_failed(self, pool: str, error: str, ctx: Context, attempt: int | None = None) -> Outcome:
        """The shell could not start the engine of spawn ``attempt`` (missing binary, port taken...).

        A report about an attempt the pool has moved past (stopped and preloaded again while the
        spawn was in flight) changes nothing."""
        model = self.pool(pool)
        self._begin(model, ctx)
        if model.state == "preloading" and (attempt is None or attempt == model.attempt):
            self._fire(model, "preload_failed", cause=f"spawn failed: {error}")
        return self._end(model, None)

    def engine_exited(self, pool: str, pid: int, exit_code: int | None, signal: int | None, ctx: Context) -> Outcome:
        """An engine process ended (observed by waiting on it)."""
        model = self.pool(pool)
        self._begin(model, ctx)
        current = model.value.engine
        if current is None or current.pid != pid:
            expected = pid in model.stopping
            model.stopping.discard(pid)
            model.emit(EngineExited(pid=pid, exit_code=exit_code, signal=signal, expected=expected,
                                    during=model.state))  # fmt: skip
            return self._end(model, None)
        state = model.state
        model.emit(EngineExited(pid=pid, exit_code=exit_code, signal=signal, expected=False, during=state))
        if exit_code is not None:
            how = f"exit code {exit_code}"
        elif signal is not None:
            how = f"signal {signal}"
        else:
            how = "status unknown: it ended while no daemon was watching it"
        if state == "preloading":
            self._fire(model, "preload_failed", cause=f"engine exited during load ({how})", exit_code=exit_code,
                       crashed=True)  # fmt: skip
        elif state == "ready":
            self._fire(model, "engine_exited", cause=f"engine exited ({how})", exit_code=exit_code, crashed=True)
        elif state == "draining":
            self._fire(model, "drained", reason=f"engine exited while draining ({how})",
                       leases_left=model.value.active_leases)  # fmt: skip
        return self._end(model, None)

    def health(self, pool: str, report: HealthReport, ctx: Context) -> Outcome:
        """Fold one health report; may make the pool ready or declare health lost."""
        model = self.pool(pool)
        self._begin(model, ctx)
        engine = model.value.engine
        if engine is None or (report.engine_pid is not None and report.engine_pid != engine.pid):
            return self._end(model, None)  # a report about an engine this pool no longer runs
        model.last_heartbeat = report.ts
        threshold = model.spec.probe_failure_threshold
        # "Loading" is expected while preloading; an engine that was ready and answers 503 again
        # cannot serve, so it counts against the threshold like a failed probe.
        loading = report.loading and model.state == "preloading"
        verdict = assess(model.health, ok=report.ok, loading=loading, ts=report.ts, threshold=threshold)
        model.health = verdict.state
        if report.latency_ms is not None:
            model.perf_hints["probe_latency_ms"] = report.latency_ms
        if verdict.changed:
            model.emit(HealthChanged(live=verdict.state.live, ready=verdict.state.ready,
                                     consecutive_failures=verdict.state.consecutive_failures))  # fmt: skip
        if model.state == "preloading" and preload_policy.ready_gate(
            probe_ok=report.ok, probe_pid=report.engine_pid, engine_pid=engine.pid
        ):
            self._healthy_while_loading(model, engine.pid, engine.pgid)
        elif model.state == "ready" and verdict.lost:
            failures = verdict.state.consecutive_failures
            self._fire(model, "health_lost", cause=f"{failures} consecutive failed health probes")
        return self._end(model, None)

    def absorb_probe(self, pool: str, report: HealthReport) -> bool:
        """Fold a report that can change nothing but the probe bookkeeping, without a step.

        A 200 from the engine of a ready pool whose health is already live and ready is what
        :meth:`health` would fold into no event, no effect and no reply; all it keeps is the
        probe streak, the time and the latency (bookkeeping outside the state value). Any other
        report returns False having changed nothing, and is stepped as usual. The caller must
        only ask while no step of the pool is running or queued, so the order of inputs holds."""
        model = self.pools.get(pool)
        if model is None or not report.ok or model.value.state != "ready":
            return False
        engine = model.value.engine
        if engine is None or report.engine_pid != engine.pid:
            return False
        verdict = assess(model.health, ok=True, loading=False, ts=report.ts,
                         threshold=model.spec.probe_failure_threshold)  # fmt: skip
        if verdict.changed:
            return False
        model.health = verdict.state
        model.last_heartbeat = report.ts
        if report.latency_ms is not None:
            model.perf_hints["probe_latency_ms"] = report.latency_ms
        return True

    def _healthy_while_loading(self, model: PoolModel, pid: int, pgid: int) -> None:
        """The first healthy probe: ready at once, or first the check that the engine holds memory
        on its GPUs (the shell samples it and answers with ``GpuChecked``)."""
        check = model.definition.gpu_check
        placement = model.value.placement
        if check is None or placement is None or not placement.uuids:
            self._fire(model, "engine_ready", reason="first healthy probe")
        elif model.verifying != pid:
            model.verifying = pid
            model.effects.append(VerifyGpus(pid, pgid, placement, check))

    def gpu_checked(self, pool: str, inp: GpuChecked, ctx: Context) -> Outcome:
        """The shell's final sample of the engine's GPU memory: ready, or a failed preload with the
        typed reason (``cpu_fallback``, ``wrong_devices``, ``under_budget``) recorded."""
        model = self.pool(pool)
        self._begin(model, ctx)
        engine = model.value.engine
        check = model.definition.gpu_check
        placement = model.value.placement
        if (model.state != "preloading" or engine is None or engine.pid != inp.pid or model.verifying != inp.pid
                or check is None or placement is None):  # fmt: skip
            return self._end(model, None)  # about an engine or a load this pool has moved past
        verdict = gpu_verify.judge(placement, inp.sample, check)
        if verdict.status == "pending":
            # Not final after all: the next healthy probe asks for another check.
            model.verifying = None
            return self._end(model, None)
        ok = verdict.status == "ok"
        model.emit(GpuVerified(ok=ok, reason=verdict.reason, message=verdict.message, pid=inp.pid,
                               pids=list(inp.sample.pids), held=dict(verdict.held), elapsed_s=inp.sample.elapsed_s,
                               deadline_s=check.deadline_s, min_fraction=check.min_fraction,
                               source=inp.source))  # fmt: skip
        model.verifying = None
        if ok:
            self._fire(model, "engine_ready", reason=f"first healthy probe; GPUs verified: {verdict.message}")
        else:
            self._fire(model, "preload_failed", cause=f"{verdict.reason}: {verdict.message}")
        return self._end(model, None)

    def timer_fired(self, pool: str, name: TimerName, token: int, ctx: Context) -> Outcome:
        """A timer armed by ``ArmTimer`` fired; stale tokens are ignored."""
        model = self.pool(pool)
        self._begin(model, ctx)
        if model.timers.get(name) != token:
            return self._end(model, None)
        del model.timers[name]
        if name == "load_timeout" and model.state == "preloading":
            self._fire(model, "preload_failed", cause=preload_policy.timeout_reason(model.spec))
        elif name == "backoff" and model.state == "restarting":
            self._fire(model, "backoff_elapsed")
        elif name == "drain_deadline" and model.state == "draining":
            outcome = drain_policy.at_deadline(reload=model.reloading, active_leases=model.value.active_leases,
                                               deadline_s=model.drain_deadline_s)  # fmt: skip
            self._fire(model, "drain_deadline", reason=outcome.reason, leases_left=outcome.leases_left)
        elif name == "lease_expiry":
            self._expire(model)
        return self._end(model, None)

    def restore(self, pool: str, value: PoolValue, ctx: Context) -> Outcome:
        """Put a registered pool back where its event log left it (daemon recovery).

        ``value`` is the fold of the pool's events: the pool takes it as it is, since the fold
        evolved it exactly as this machine did. No event is emitted: the state is the log's. The
        effects re-arm what was pending: the rest of a load timeout, a drain deadline, a backoff,
        lease expiries. Reconciling with the engine processes found on the host is the shell's
        part (adopt, or report an exit)."""
        model = self.pool(pool)
        self._begin(model, ctx)
        if value.pool != pool:
            raise ValueError(f"the state of pool {value.pool!r} cannot restore pool {pool!r}")
        if value.spec is None:
            # The log never named a spec (nothing was preloaded yet): the configured one stands.
            configured = model.value
            value = msgspec.structs.replace(value, spec=configured.spec, mask=configured.mask,
                                            policy=configured.policy)  # fmt: skip
        model.value = model.prior = value
        remaining = max(0.0, (value.deadline_at or ctx.now) - ctx.now)
        if value.state == "preloading":
            model.arm("load_timeout", remaining)
        elif value.state == "draining":
            model.drain_deadline_s = remaining
            model.arm("drain_deadline", remaining)
        elif value.state == "restarting":
            model.arm("backoff", remaining)
        if value.leases:
            self._arm_lease_expiry(model)
        return self._end(model, None)

    def claim(self, pool: str, inp: ClaimInput, ctx: Context) -> Outcome:
        """This node holds the pool's ownership lease at ``inp.epoch``: record the claim. Taken
        from another node, the pool starts here with nothing running (see :class:`PoolClaimed`),
        and whatever that node's timers were waiting for is no concern of this one."""
        model = self.pool(pool)
        self._begin(model, ctx)
        previous = inp.previous_node
        if previous is not None and previous != self.node:
            model.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        claim = PoolClaimed(node=self.node, epoch=inp.epoch, previous_node=previous,
                            previous_epoch=inp.previous_epoch, previous_state=model.state)  # fmt: skip
        model.pending_claim = None
        if model.value.seq == 0 and previous in (None, self.node):
            model.pending_claim = claim  # nothing to hand over: recorded with the first event
        else:
            model.emit(claim)
        return self._end(model, None)

    def release_ownership(self, pool: str, ctx: Context) -> Outcome:
        """This node gives the pool's lease up (a graceful stop): the last event of its epoch."""
        model = self.pool(pool)
        self._begin(model, ctx)
        if model.value.epoch:
            model.emit(PoolReleased(node=self.node, epoch=model.value.epoch))
        return self._end(model, None)

    def expire_leases(self, pool: str, ctx: Context) -> Outcome:
        """Drop expired leases now (also done by the ``lease_expiry`` timer)."""
        model = self.pool(pool)
        self._begin(model, ctx)
        self._expire(model)
        return self._end(model, None)

    def _expire(self, model: PoolModel) -> None:
        for lease_id in expired(model.value, model.ctx.now):
            model.emit(LeaseExpired(lease_id=lease_id, active=model.value.active_leases - 1))
        self._after_lease_drop(model)

    # --- helpers -------------------------------------------------------------------------------

    def _arm_lease_expiry(self, model: PoolModel) -> None:
        nxt = model.value.next_expiry()
        if nxt is None:
            model.cancel("lease_expiry")
        else:
            model.arm("lease_expiry", nxt - model.ctx.now)

    def _after_lease_drop(self, model: PoolModel) -> None:
        if model.state == "draining" and drain_policy.complete_now(model.value.active_leases):
            self._fire(model, "drained", reason="leases reached 0", leases_left=0)
        else:
            self._arm_lease_expiry(model)


def internal_error_message(verb: str, pool: str) -> str:
    """The message of the ``internal`` rejection a command gets when its step raised."""
    return f"internal error while applying {verb!r} to pool {pool!r}; the pool is failed until it is reset"
