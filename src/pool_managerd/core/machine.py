"""The pool lifecycle: the table as data, and ONE shared ``transitions.Machine`` for all pools.

The table (:data:`ROWS`) is plain data. It drives the live machine built here, the replay fold
(:mod:`pool_managerd.core.fold`), the generated diagrams in ``schemas/`` and the property tests.

Callbacks never do I/O. Guards and ``prepare`` callbacks call pure policy functions (the
injected planner for placement/preflight, :mod:`pool_managerd.lifecycle.supervision` for restart
decisions); ``before``/``after`` callbacks append events and effects to the pool's outbox, which
the shell executes. Decisions are stored in the trigger's keyword arguments and recorded in the
``state_changed`` event, so a replay can pass them back in and needs no clock, RNG or GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import msgspec
from transitions import EventData, Machine

from pool_managerd.core.definitions import Context, Planner, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import ArmTimer, CancelTimer, Effect, ReleaseEngine, SpawnEngine, StopEngine, TimerName
from pool_managerd.core.inputs import (
    CommandInput,
    EngineAdoptedInput,
    EngineExitedInput,
    EngineStarted,
    ExpireLeases,
    HealthInput,
    PoolInput,
    RemoveInput,
    RestoreInput,
    SpawnFailed,
    TimerFired,
    label,
)

if TYPE_CHECKING:
    from pool_managerd.core.fold import PoolView
from pool_managerd.core.errors import IllegalTransition, LeaseRefused, UnknownLease, UnknownPool
from pool_managerd.core.health import HealthState, assess
from pool_managerd.core.registry import Entry, Lease, Registry
from pool_managerd.lifecycle import drain as drain_policy
from pool_managerd.lifecycle import preload as preload_policy
from pool_managerd.lifecycle import supervision
from pool_managerd.lifecycle.supervision import Decision, SupervisionState
from pool_managerd.messages import (
    SCHEMA_VERSION,
    Accepted,
    BackoffScheduled,
    CommandRejected,
    DrainCmd,
    DrainForced,
    EngineAdopted,
    EngineExited,
    EngineInfo,
    EngineSpawned,
    EngineSpec,
    Event,
    EventBody,
    HealthChanged,
    HealthReport,
    InternalError,
    LeaseCmd,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LifecycleReply,
    Placement,
    PoolCommand,
    PoolState,
    PreloadCmd,
    PreloadRejected,
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
        "first healthy probe (HTTP 200) of the current engine", after=("_became_ready",)),
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
        ("_place",), ("_is_placed",), (), ("_stage_reload", "_begin_drain")),
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
    Row("reset", "failed", "unready", "command", "operator acknowledges a crash loop",
        after=("_reset_supervision",)),
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


def allowed_triggers(state: PoolState) -> tuple[str, ...]:
    """Triggers the table allows from ``state``."""
    return ALLOWED[state]


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


_MODEL_FIELDS = (
    "spec", "mask", "split_policy", "pending_spec", "pending_mask", "pending_placement", "rollback",
    "pending_policy", "reloading", "supervision", "timers", "timer_seq", "stopping", "attempt",
    "drain_deadline_s", "last_plan_rejected", "cause",
)  # fmt: skip
_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A pool as it was before a step: machine state, model fields and registry entry."""

    state: PoolState
    model: dict[str, Any]
    entry: dict[str, Any]


def _copied(value: Any) -> Any:
    # The mutable containers a step may change in place; everything else is immutable.
    return copy.copy(value) if isinstance(value, dict | set | list) else value


# ----------------------------------------------------------------------------------------------
# The model: one per pool, all held by the shared machine
# ----------------------------------------------------------------------------------------------


class PoolModel:
    """The ``transitions`` model of one pool. Its trigger methods are bound by the machine; the
    shell never calls them directly but goes through :class:`Lifecycle`."""

    state: PoolState

    def __init__(self, definition: PoolDefinition, entry: Entry, planner: Planner) -> None:
        self.definition = definition
        self.entry = entry
        self.planner = planner
        self.spec: EngineSpec = definition.spec
        self.mask: str | list[str] | None = definition.device_mask
        self.split_policy: str | None = definition.split_policy
        self.pending_spec: EngineSpec | None = None
        self.pending_mask: str | list[str] | None = None
        self.pending_placement: Placement | None = None
        self.rollback: tuple[EngineSpec, str | list[str] | None, str | None] | None = None
        self.pending_policy: str | None = None
        self.reloading = False
        self.supervision = SupervisionState()
        self.timers: dict[TimerName, int] = {}
        self.timer_seq = 0
        self.stopping: set[int] = set()
        self.attempt = 0
        self.drain_deadline_s = 0.0
        self.ctx = Context(now=0.0)
        self.last_plan_rejected: PlanRejected | None = None
        self.cause: tuple[str | None, str | None] = (None, None)
        """(command_id, traceparent) of the pool's last command: every event carries them."""
        self.fingerprint: str | None = None
        """Set while a command's own step runs: what its events carry as ``fingerprint``."""
        self.events: list[Event] = []
        self.effects: list[Effect] = []

    @property
    def pool_id(self) -> str:
        return self.entry.pool

    # --- transactions ----------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """Everything a step may change, copied."""
        return Checkpoint(
            self.state,
            {name: _copied(getattr(self, name)) for name in _MODEL_FIELDS},
            {name: _copied(getattr(self.entry, name)) for name in _ENTRY_FIELDS},
        )

    def revert(self, saved: Checkpoint, machine: Machine) -> None:
        """Put the pool back exactly as ``saved`` recorded it."""
        machine.set_state(saved.state, model=self)
        for name, value in saved.model.items():
            setattr(self, name, _copied(value))
        for name, value in saved.entry.items():
            setattr(self.entry, name, _copied(value))

    # --- outbox ----------------------------------------------------------------------------

    def emit(self, body: EventBody) -> Event:
        """Append an event with the next per-pool sequence."""
        self.entry.seq += 1
        command_id, traceparent = self.cause
        event = Event(
            v=SCHEMA_VERSION,
            seq=self.entry.seq,
            ts=self.ctx.now,
            node=self.entry.node,
            pool=self.entry.pool,
            command_id=command_id,
            traceparent=traceparent,
            fingerprint=self.fingerprint,
            body=body,
        )
        # For a state change the trigger says more than "state_changed" (watch and status show it).
        self.entry.last_event = body.trigger if isinstance(body, StateChanged) else event.type
        self.entry.updated_at = self.ctx.now
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
        """Ask the shell to stop the current engine; its exit is then expected, not a crash."""
        engine = self.entry.engine
        if engine is None:
            return
        self.stopping.add(engine.pid)
        self.entry.engine = None
        grace = self.spec.stop_grace_s if grace_s is None else grace_s
        self.effects.append(StopEngine(engine.pid, engine.pgid, grace, reason))

    # --- prepare callbacks: compute decisions unless replay supplied them --------------------

    def _place(self, ev: EventData) -> None:
        kw = ev.kwargs
        if "placement" in kw or "plan_rejected" in kw:
            return
        spec: EngineSpec = kw.get("new_spec") or self.pending_spec or self.spec
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
        if trigger == "drained" and dst == "preloading":
            mask, policy = self.pending_mask, self.pending_policy or self.split_policy
        elif trigger in ("preload", "reload") or dst == "preloading":
            mask = kw["mask"] if kw.get("mask") is not None else self.mask
            policy = kw.get("policy") or self.split_policy
        if dst == "preloading" or trigger == "reload":
            mask = "auto" if mask is None else mask
        if dst == "preloading":
            spec = self.pending_spec if (trigger == "drained" and self.pending_spec) else self.spec
            if trigger == "drained":
                placement = self.pending_placement
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

    # --- after callbacks: effects ------------------------------------------------------------

    def _spawn(self, ev: EventData) -> None:
        placement: Placement | None = ev.kwargs.get("placement")
        if ev.event.name == "drained":
            placement = self.pending_placement
            self.pending_placement = None
        if not isinstance(placement, Placement):
            # Guarded by _is_placed / staged by reload: anything else is a planner breaking its
            # contract, found after the row was taken; the step is undone as a whole.
            raise TypeError(f"the planner returned {type(placement).__name__}, not a Placement")
        self.entry.placement = placement
        self.entry.model = self.spec.model or None
        self.entry.engine_version = self.spec.engine_version
        self.entry.version = spec_version(self.spec)
        self.entry.engine_digest = self.spec.model_digest
        self.entry.slots_total = self.spec.slots
        self.entry.health = HealthState()
        self.attempt += 1
        self.arm("load_timeout", self.spec.load_timeout_s)
        self.effects.append(SpawnEngine(self.spec, placement, self.attempt))

    def _became_ready(self, ev: EventData) -> None:
        self.cancel("load_timeout")
        self.supervision = supervision.on_ready(self.supervision, self.ctx.now)
        self.rollback = None
        self.entry.last_error = None

    def _settle_failure(self, ev: EventData, grace_s: float | None) -> Decision:
        """What every failure row does, restart or not: record the decision, stop the engine,
        drop its leases and health, count a crash."""
        decision: Decision = ev.kwargs["decision"]
        self.supervision = decision.state
        self.stop_engine(decision.reason, grace_s=grace_s)
        self.entry.drop_leases()
        self.entry.health = HealthState()
        self.entry.last_error = decision.reason
        if ev.kwargs.get("crashed"):
            self.entry.crashes += 1
        return decision

    def _schedule_restart(self, ev: EventData) -> None:
        self.cancel("load_timeout", "lease_expiry")
        # An engine that exited needs no grace; a hung or timed-out one is killed at once too.
        decision = self._settle_failure(ev, grace_s=0.0 if ev.event.name != "engine_exited" else None)
        if ev.kwargs.get("rollback"):
            old_spec, old_mask, old_policy = self.rollback or (self.spec, self.mask, self.split_policy)
            self.split_policy = old_policy
            self.emit(ReloadRolledBack(reason=decision.reason))
            self.spec, self.mask = old_spec, old_mask
            self.rollback = None
        else:
            self.entry.restarts += 1
            self.emit(BackoffScheduled(delay_s=decision.delay_s, attempt=decision.attempt, reason=decision.reason))
        self.arm("backoff", decision.delay_s)

    def _give_up(self, ev: EventData) -> None:
        self.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        decision = self._settle_failure(ev, grace_s=0.0)
        # A failed pool holds no GPUs; the next preload (after reset) places it afresh.
        self.entry.placement = None
        policy = self.definition.restart
        restarts = len(decision.state.restart_times)
        self.emit(RestartLimitReached(restarts=restarts, window_s=policy.window_s, reason=decision.reason))

    def _begin_drain(self, ev: EventData) -> None:
        self.drain_deadline_s = float(ev.kwargs.get("deadline_s", 30.0))
        if drain_policy.complete_now(self.entry.active_leases):
            # Queued by the machine: runs right after this transition completes.
            self.drained(reason="no leases held")  # type: ignore[attr-defined]
        else:
            self.arm("drain_deadline", self.drain_deadline_s)

    def _stage_reload(self, ev: EventData) -> None:
        self.reloading = True
        self.pending_spec = ev.kwargs["new_spec"]
        self.pending_mask = ev.kwargs.get("mask") if ev.kwargs.get("mask") is not None else self.mask
        self.pending_placement = ev.kwargs["placement"]
        self.pending_policy = ev.kwargs.get("policy")

    def _swap_to_reload(self, ev: EventData) -> None:
        assert self.pending_spec is not None
        self.cancel("drain_deadline", "lease_expiry")
        self.stop_engine("reload: stopping the old engine")
        self.entry.drop_leases()
        self.rollback = (self.spec, self.mask, self.split_policy)
        self.split_policy = self.pending_policy or self.split_policy
        self.pending_policy = None
        self.spec, self.mask = self.pending_spec, self.pending_mask
        self.pending_spec = None
        self.pending_mask = None
        self.reloading = False

    def _stop_and_clear(self, ev: EventData) -> None:
        self.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        self.stop_engine(str(ev.kwargs.get("reason") or ev.event.name), ev.kwargs.get("grace_s"))
        self.entry.drop_leases()
        self.entry.health = HealthState()
        self.entry.placement = None
        self._clear_reload()
        self.rollback = None

    def _force_drain(self, ev: EventData) -> None:
        self.emit(DrainForced(leases_left=self.entry.active_leases, deadline_s=self.drain_deadline_s))
        self._stop_and_clear(ev)

    def _abort_reload(self, ev: EventData) -> None:
        self.cancel("drain_deadline")
        self._clear_reload()

    def _clear_reload(self) -> None:
        self.reloading = False
        self.pending_spec = None
        self.pending_mask = None
        self.pending_policy = None
        self.pending_placement = None

    def _reset_supervision(self, ev: EventData) -> None:
        self.supervision = supervision.reset(self.supervision)
        self.entry.last_error = None

    def _internal_failure(self, ev: EventData) -> None:
        self.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        reason = str(ev.kwargs.get("reason") or "internal error")
        self.stop_engine(reason)
        self.entry.drop_leases()
        self.entry.health = HealthState()
        self.entry.placement = None
        self.entry.last_error = reason
        # Not ready any more: a later failure must not count this run as a stable period.
        self.supervision = replace(self.supervision, ready_since=None)
        self._clear_reload()
        self.rollback = None


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
        entry = self.registry.register(definition.pool, slots=definition.spec.slots, simulated=simulated)
        model = PoolModel(definition, entry, self.planner)
        self.machine.add_model(model, initial=INITIAL)
        entry.state = model.state
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
            model.revert(saved, self.machine)
            outcome = self._internal_error(model, inp, exc, ctx, saved)
        outcome.undo = saved
        return outcome

    def revert(self, pool: str, outcome: Outcome) -> None:
        """Undo a step whose events could not be appended (its effects must not run)."""
        if outcome.undo is not None and pool in self.pools:
            self.pools[pool].revert(outcome.undo, self.machine)

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
            return self.restore(pool, inp.view, ctx)
        if isinstance(inp, RemoveInput):
            return self.remove(pool, inp.drain_s, ctx)
        if isinstance(inp, ExpireLeases):
            return self.expire_leases(pool, ctx)
        raise TypeError(f"not a pool input: {type(inp).__name__}")

    def _internal_error(
        self, model: PoolModel, inp: PoolInput, exc: Exception, ctx: Context, saved: Checkpoint
    ) -> Outcome:
        name = label(inp)
        verb = name if isinstance(inp, CommandInput) else None
        self._begin(model, ctx)
        if isinstance(inp, CommandInput):
            model.cause = (ctx.command_id or inp.cmd.command_id, ctx.traceparent)
            model.fingerprint = command_fingerprint(inp.cmd)
        # The exception's class names the bug without leaking its text (paths, values) anywhere.
        error = type(exc).__name__
        try:
            model.emit(InternalError(step=name, error=error))
            if model.state != "failed":
                self._fire(model, "internal_error", reason=f"internal error in step {name} ({error}); pool stopped")
        except Exception:
            # Even the way out failed: keep the pool exactly as it was and report the bare error.
            model.revert(saved, self.machine)
            self._begin(model, ctx)
        reply: Rejected | None = None
        if verb is not None:
            reply = Rejected(command_id=model.cause[0], pool=model.pool_id, verb=verb, code="internal",
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
        model.entry.state = model.state
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
            model.cause = (ctx.command_id, ctx.traceparent)
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
        return self._end(model, reply)

    def _command(self, model: PoolModel, verb: str, cmd: PoolCommand) -> Accepted | Rejected | StatusReply:
        if isinstance(cmd, StatusCmd):
            return StatusReply(pool=self.registry.snapshot(model.pool_id))
        if isinstance(cmd, PreloadCmd):
            spec = model.spec
            if cmd.model is not None and "preload" in ALLOWED[model.state]:
                model.spec = _with_model(spec, cmd.model)
            taken = self._fire(model, "preload", mask=cmd.device_mask, policy=cmd.policy)
            if not taken:
                model.spec = spec
                return self._plan_rejected(model, verb)
            if cmd.device_mask is not None:
                model.mask = cmd.device_mask
            if cmd.policy is not None:
                model.split_policy = cmd.policy
        elif isinstance(cmd, DrainCmd):
            self._fire(model, "drain", deadline_s=cmd.deadline_s)
        elif isinstance(cmd, ReloadCmd):
            new_spec = model.spec
            if cmd.model is not None:
                new_spec = _with_model(new_spec, cmd.model)
            if cmd.argv is not None:
                new_spec = _with_argv(new_spec, cmd.argv)
            mask_same = cmd.device_mask is None or cmd.device_mask == model.mask
            policy_same = cmd.policy is None or cmd.policy == model.split_policy
            if new_spec == model.spec and mask_same and policy_same and model.state == "ready":
                # Reloading the very same spec is a no-op, not a needless restart.
                return self._accept(model, verb, seq=model.entry.seq)
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
            lease_id = cmd.lease_id or cmd.command_id
            lease = model.entry.acquire(lease_id, cmd.ttl_s, model.ctx.now, cmd.holder)
            model.emit(LeaseGranted(lease_id=lease_id, expires_at=lease.expires_at,
                                    active=model.entry.active_leases, holder=cmd.holder))  # fmt: skip
            self._arm_lease_expiry(model)
            first = model.events[0].seq
            return self._accept(model, verb, seq=first, lease_id=lease_id, expires_at=lease.expires_at)
        elif isinstance(cmd, ReleaseCmd):
            model.entry.release(cmd.lease_id)
            model.emit(LeaseReleased(lease_id=cmd.lease_id, active=model.entry.active_leases))
            self._after_lease_drop(model)
        first_seq = model.events[0].seq if model.events else model.entry.seq
        return self._accept(model, verb, seq=first_seq)

    def _accept(self, model: PoolModel, verb: str, *, seq: int, lease_id: str | None = None,
                expires_at: float | None = None) -> Accepted:  # fmt: skip
        return Accepted(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, seq=seq,
                        last_seq=model.entry.seq, state=model.state, lease_id=lease_id,
                        expires_at=expires_at)  # fmt: skip

    def _reject(self, model: PoolModel, verb: str, code: RejectCode, message: str,
                allowed: Iterable[str] = (), problems: Iterable[Problem] = ()) -> Rejected:  # fmt: skip
        model.emit(CommandRejected(verb=verb, code=code, message=message, state=model.state))
        return Rejected(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, code=code,
                        message=message, state=model.state, allowed=list(allowed), problems=list(problems))  # fmt: skip

    def _plan_rejected(self, model: PoolModel, verb: str) -> Rejected:
        # The prepare callback kept the planner's refusal on the model for exactly this reply.
        rejected = model.last_plan_rejected
        code: RejectCode = rejected.code if rejected else "placement_failed"
        message = rejected.message if rejected else "placement failed"
        problems: list[Problem] = list(rejected.problems) if rejected else []
        model.emit(PreloadRejected(code=code, message=message, problems=problems))
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
            previous = model.entry.engine
            if previous is not None and previous.pid != info.pid:
                # Never two engines for one pool: the one recorded earlier goes.
                model.stopping.add(previous.pid)
                model.effects.append(StopEngine(previous.pid, previous.pgid, 0.0, "superseded by a newer spawn"))
            model.entry.engine = info
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
        model.entry.engine = info
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
        current = model.entry.engine
        if current is None or current.pid != pid:
            expected = pid in model.stopping
            model.stopping.discard(pid)
            model.emit(EngineExited(pid=pid, exit_code=exit_code, signal=signal, expected=expected,
                                    during=model.state))  # fmt: skip
            return self._end(model, None)
        state = model.state
        model.entry.engine = None
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
                       leases_left=model.entry.active_leases)  # fmt: skip
        return self._end(model, None)

    def health(self, pool: str, report: HealthReport, ctx: Context) -> Outcome:
        """Fold one health report; may make the pool ready or declare health lost."""
        model = self.pool(pool)
        self._begin(model, ctx)
        engine = model.entry.engine
        if engine is None or (report.engine_pid is not None and report.engine_pid != engine.pid):
            return self._end(model, None)  # a report about an engine this pool no longer runs
        model.entry.last_heartbeat = report.ts
        threshold = model.spec.probe_failure_threshold
        # "Loading" is expected while preloading; an engine that was ready and answers 503 again
        # cannot serve, so it counts against the threshold like a failed probe.
        loading = report.loading and model.state == "preloading"
        verdict = assess(model.entry.health, ok=report.ok, loading=loading, ts=report.ts, threshold=threshold)
        model.entry.health = verdict.state
        if report.latency_ms is not None:
            model.entry.perf_hints["probe_latency_ms"] = report.latency_ms
        if verdict.changed:
            model.emit(HealthChanged(live=verdict.state.live, ready=verdict.state.ready,
                                     consecutive_failures=verdict.state.consecutive_failures))  # fmt: skip
        if model.state == "preloading" and preload_policy.ready_gate(
            probe_ok=report.ok, probe_pid=report.engine_pid, engine_pid=engine.pid
        ):
            self._fire(model, "engine_ready", reason="first healthy probe")
        elif model.state == "ready" and verdict.lost:
            failures = verdict.state.consecutive_failures
            self._fire(model, "health_lost", cause=f"{failures} consecutive failed health probes")
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
            outcome = drain_policy.at_deadline(reload=model.reloading, active_leases=model.entry.active_leases,
                                               deadline_s=model.drain_deadline_s)  # fmt: skip
            self._fire(model, "drain_deadline", reason=outcome.reason, leases_left=outcome.leases_left)
        elif name == "lease_expiry":
            self._expire(model)
        return self._end(model, None)

    def restore(self, pool: str, view: PoolView, ctx: Context) -> Outcome:
        """Put a registered pool back where its event log left it (daemon recovery).

        No event is emitted: the state is the log's. The effects re-arm what was pending: the
        rest of a load timeout, a drain deadline, a backoff, lease expiries. Reconciling with the
        engine processes found on the host is the shell's part (adopt, or report an exit).
        """
        model = self.pool(pool)
        self._begin(model, ctx)
        self.machine.set_state(view.state, model=model)
        model.cause = view.cause
        entry = model.entry
        entry.seq = view.seq
        entry.placement = view.placement
        entry.engine = view.engine
        entry.restarts, entry.crashes, entry.last_error = view.restarts, view.crashes, view.last_error
        entry.leases = {lid: Lease(lid, exp) for lid, exp in sorted(view.leases.items())}
        entry.last_event = view.last_event
        entry.updated_at = view.last_ts
        if view.spec is not None:
            model.spec = view.spec
            entry.version = spec_version(view.spec) if view.placement is not None else None
            entry.model = view.spec.model or None
            entry.slots_total = view.spec.slots
        if view.mask_known:
            model.mask = view.mask
        if view.policy is not None:
            model.split_policy = view.policy
        model.reloading = view.reloading and view.state == "draining"
        model.pending_spec = view.pending_spec if model.reloading else None
        model.pending_placement = view.pending_placement if model.reloading else None
        model.pending_mask = view.pending_mask if model.reloading else None
        model.pending_policy = view.pending_policy if model.reloading else None
        if view.rollback_spec is not None:
            rollback_mask = view.rollback_mask if view.mask_known else model.mask
            model.rollback = (view.rollback_spec, rollback_mask, view.rollback_policy or model.split_policy)
        model.supervision = view.supervision()
        remaining = max(0.0, (view.deadline_at or ctx.now) - ctx.now)
        if view.state == "preloading":
            model.arm("load_timeout", remaining)
        elif view.state == "draining":
            model.drain_deadline_s = remaining
            model.arm("drain_deadline", remaining)
        elif view.state == "restarting":
            model.arm("backoff", remaining)
        if entry.leases:
            self._arm_lease_expiry(model)
        return self._end(model, None)

    def expire_leases(self, pool: str, ctx: Context) -> Outcome:
        """Drop expired leases now (also done by the ``lease_expiry`` timer)."""
        model = self.pool(pool)
        self._begin(model, ctx)
        self._expire(model)
        return self._end(model, None)

    def _expire(self, model: PoolModel) -> None:
        for lease_id in model.entry.expire(model.ctx.now):
            model.emit(LeaseExpired(lease_id=lease_id, active=model.entry.active_leases))
        self._after_lease_drop(model)

    # --- helpers -------------------------------------------------------------------------------

    def _arm_lease_expiry(self, model: PoolModel) -> None:
        nxt = model.entry.next_expiry()
        if nxt is None:
            model.cancel("lease_expiry")
        else:
            model.arm("lease_expiry", nxt - model.ctx.now)

    def _after_lease_drop(self, model: PoolModel) -> None:
        if model.state == "draining" and drain_policy.complete_now(model.entry.active_leases):
            self._fire(model, "drained", reason="leases reached 0", leases_left=0)
        else:
            self._arm_lease_expiry(model)


def internal_error_message(verb: str, pool: str) -> str:
    """The message of the ``internal`` rejection a command gets when its step raised."""
    return f"internal error while applying {verb!r} to pool {pool!r}; the pool is failed until it is reset"


def spec_version(spec: EngineSpec) -> str:
    """A short, stable fingerprint of an engine spec: which spec a pool runs, at a glance."""
    return hashlib.blake2b(msgspec.json.encode(spec), digest_size=6).hexdigest()


def _with_model(spec: EngineSpec, model: str) -> EngineSpec:
    return msgspec.structs.replace(spec, model=model)


def _with_argv(spec: EngineSpec, argv: list[str]) -> EngineSpec:
    return msgspec.structs.replace(spec, argv=list(argv))
