"""The pool lifecycle table as data: states, rows, and what is derived from them.

The table (:data:`ROWS`) is plain data. It drives the live machine (:mod:`pool_managerd.core.
machine`), the replay fold (:mod:`pool_managerd.core.fold`), the generated diagrams in
``schemas/`` and the property tests. The callbacks its rows name are methods of
:class:`~pool_managerd.core.pool_model.PoolModel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pool_managerd.contract.messages import LifecycleReply, PoolState, TransitionRow

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
