"""Property tests of the lifecycle: a hypothesis state machine plays an adversarial shell.

Every command and every fact is a rule; after each step the invariants of the table, the event
log and the registry are checked. A deterministic driver then proves that every row of the
table is reachable, and the property run must reach every row too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pool_managerd.contract.messages import (
    Accepted,
    DrainCmd,
    EngineExited,
    EngineInfo,
    EngineSpec,
    HealthReport,
    InternalError,
    LeaseCmd,
    Placement,
    PoolCommand,
    PoolSnapshot,
    PoolState,
    PreloadCmd,
    Problem,
    Rejected,
    ReleaseCmd,
    ReloadCmd,
    ResetCmd,
    StateChanged,
    StatusCmd,
    StatusReply,
    StopCmd,
)
from pool_managerd.core.definitions import Context, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import ArmTimer, CancelTimer, SpawnEngine, StopEngine, TimerName
from pool_managerd.core.fold import Fold
from pool_managerd.core.inputs import CommandInput, TimerFired
from pool_managerd.core.machine import PoolMachine
from pool_managerd.core.pool_model import Outcome
from pool_managerd.core.state import PoolValue, initial
from pool_managerd.core.table import ALLOWED, COMMAND_TRIGGERS, ROWS, STATES, client_verbs, is_legal
from pool_managerd.lifecycle.supervision import RestartPolicy
from support.lifecycle_harness import LifecycleHarness

NODE = "node-1"
POOL = "p"
SLOTS = 2
SPEC = EngineSpec(
    argv=["fake-engine", "{model}"], model="m0", load_timeout_s=30.0, probe_failure_threshold=2, slots=SLOTS
)
POLICY = RestartPolicy(initial_s=1.0, max_s=8.0, stable_s=30.0, max_consecutive_failures=3, max_restarts=6)
PLACEMENT = Placement(mask=["0"], uuids=["GPU-0"], cuda_visible_devices="GPU-0", simulated=True)
REFUSAL = PlanRejected("placement_failed", "not enough memory", (Problem(code="oom", message="GPU 0 is full"),))
BROKEN = object()
"""What a buggy planner returns: not a Placement, so the preload row's after-callback raises."""
TIMER_NAMES: tuple[TimerName, ...] = ("load_timeout", "backoff", "drain_deadline", "lease_expiry")
LEASE_IDS = ("l1", "l2", "l3")

ALL_ROWS = frozenset((r.source, r.trigger, r.dest) for r in ROWS)
SEEN_ROWS: set[tuple[str, str, str]] = set()
"""Rows taken during the property run (every StateChanged event observed)."""


def without_bookkeeping(snap: PoolSnapshot) -> PoolSnapshot:
    """A snapshot minus the fields any appended event changes."""
    return msgspec.structs.replace(snap, seq=0, last_event=None, updated_at=0.0)


@dataclass
class Timer:
    token: int
    due: float


class LifecycleMachine(RuleBasedStateMachine):
    """The test is the shell: it tracks what it was asked to do and answers with facts."""

    def __init__(self) -> None:
        super().__init__()
        self.plan_ok = True
        self.lc = PoolMachine(NODE, self.planner)
        self.lc.register(PoolDefinition(POOL, SPEC, restart=POLICY))
        self.now = 0.0
        self.seq = 0
        self.model_counter = 0
        self.next_pid = 1000
        self.timers: dict[TimerName, Timer] = {}
        self.pending_spawns: list[SpawnEngine] = []  # answered in order, as the runtime actor does
        self.live: set[int] = set()  # engines the shell started that have not exited
        self.asked_to_stop: set[int] = set()
        self.cause: str | None = None  # the last command: what every later event carries
        # Every event the pool produced, folded as replay and recovery do (from the pool's definition).
        self.folded = Fold(expect_start=True, start=lambda pool: initial(pool, SPEC))
        self.bug = False

    # --- the fake planner ---------------------------------------------------------------------

    def planner(self, request: PlanRequest) -> Placement | PlanRejected:
        assert request.pool == POOL
        if self.bug:
            return BROKEN  # type: ignore[return-value]
        return PLACEMENT if self.plan_ok else REFUSAL

    # --- helpers ------------------------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        return self.lc.state(POOL)

    @property
    def entry(self) -> Any:
        return self.lc.pool(POOL).entry

    def ctx(self, rand: float = 0.5, new_lease_id: str | None = None) -> Context:
        return Context(now=self.now, rand=rand, new_lease_id=new_lease_id)

    def check(self, before: PoolState, out: Outcome) -> None:
        """Invariants of one step's outcome, and the shell's bookkeeping of its effects."""
        state = before
        for event in out.events:
            self.folded.apply(event)
        for event in out.events:
            assert event.seq == self.seq + 1, (event.seq, self.seq)
            self.seq = event.seq
            assert (event.pool, event.node, event.ts) == (POOL, NODE, self.now)
            body = event.body
            if isinstance(body, StateChanged):
                assert body.src == state, (body, state)
                assert is_legal(body.src, body.trigger, body.dst), body
                SEEN_ROWS.add((body.src, body.trigger, body.dst))
                state = body.dst
            elif isinstance(body, EngineExited):
                assert body.expected == (body.pid in self.asked_to_stop)
        assert state == self.state
        assert self.entry.state == self.state
        assert self.entry.seq == self.seq
        for effect in out.effects:
            if isinstance(effect, ArmTimer):
                assert effect.delay_s >= 0.0
                self.timers[effect.name] = Timer(effect.token, self.now + effect.delay_s)
            elif isinstance(effect, CancelTimer):
                self.timers.pop(effect.name, None)
            elif isinstance(effect, SpawnEngine):
                self.pending_spawns.append(effect)
                assert effect.placement == PLACEMENT
            elif isinstance(effect, StopEngine):
                # Only engines that exist are stopped, and each of them once.
                assert effect.pid in self.live, effect
                assert effect.pid not in self.asked_to_stop, effect
                assert effect.grace_s >= 0.0
                self.asked_to_stop.add(effect.pid)

    def command(self, cmd: PoolCommand, rand: float = 0.5, new_lease_id: str | None = None) -> Outcome:
        before = self.state
        before_snap = self.lc.registry.snapshot(POOL)
        before_timers = dict(self.lc.pool(POOL).timers)
        out = self.lc.command(POOL, cmd, self.ctx(rand, new_lease_id))
        self.check(before, out)
        verb = cmd.__struct_config__.tag
        assert out.reply is not None
        assert all(e.command_id == cmd.command_id for e in out.events)
        if verb != "status" and out.events:
            # A refused command writes nothing, so later facts still name the last applied one.
            self.cause = cmd.command_id
        if verb in COMMAND_TRIGGERS and verb not in ALLOWED[before]:
            # An illegal trigger: refused, no event (the audit stream has it), nothing changes.
            assert isinstance(out.reply, Rejected), out.reply
            assert out.reply.code == "illegal_transition"
            assert out.reply.allowed == list(client_verbs(before))
            assert out.events == []
            assert out.effects == []
            assert self.state == before
            assert without_bookkeeping(self.lc.registry.snapshot(POOL)) == without_bookkeeping(before_snap)
            assert self.lc.pool(POOL).timers == before_timers
        elif isinstance(out.reply, Accepted):
            assert out.reply.state == self.state
            assert out.reply.command_id == cmd.command_id
        return out

    def fact(self, before: PoolState, out: Outcome) -> Outcome:
        assert out.reply is None
        self.check(before, out)
        assert all(e.command_id == self.cause and e.fingerprint is None for e in out.events)
        return out

    # --- rules: a bug inside a step -----------------------------------------------------------

    BUGS = True

    @precondition(lambda self: self.BUGS)
    @rule(kind=st.sampled_from(["unknown_input", "broken_plan"]), after_crash=st.booleans())
    def buggy_step(self, kind: str, after_crash: bool) -> None:
        """A step raises (after the machine may already have moved): nothing it did is kept, an
        internal_error is recorded without a gap, and the pool is failed."""
        if after_crash:
            self._bring_up(6)
            if self.entry.engine is not None and self.state == "ready":
                self._engine_exited(self.entry.engine.pid, (1, None), 0.5)
        before = self.state
        before_seq = self.seq
        if kind == "broken_plan" and before not in ("unready", "restarting"):
            kind = "unknown_input"  # only a preload or a restart's re-placement asks the planner
        if kind == "broken_plan" and before == "restarting" and "backoff" in self.timers:
            # The restart's re-placement gets the broken plan: the row to preloading raises.
            timer = self.timers.pop("backoff")
            self.now = max(self.now, timer.due)
            self.bug = True
            try:
                out = self.lc.step(POOL, TimerFired("backoff", timer.token), self.ctx())
            finally:
                self.bug = False
        elif kind == "broken_plan" and before == "unready":
            self.bug = True
            cmd = PreloadCmd(command_id=f"bug-{self.seq}")
            try:
                out = self.lc.step(POOL, CommandInput(cmd), self.ctx())
            finally:
                self.bug = False
            self.cause = cmd.command_id
        else:
            out = self.lc.step(POOL, object(), self.ctx())  # type: ignore[arg-type]
        raised = any(isinstance(e.body, InternalError) for e in out.events)
        if kind == "unknown_input":
            assert raised
        if not raised:
            self.check(before, out)  # a reload refused before any placement was asked for
            return
        self.check(before, out)
        assert self.state == "failed"
        assert out.events[0].seq == before_seq + 1 and isinstance(out.events[0].body, InternalError)
        changes = [e.body for e in out.events if isinstance(e.body, StateChanged)]
        if before != "failed":
            assert [(c.src, c.trigger, c.dst) for c in changes] == [(before, "internal_error", "failed")]
        assert not any(isinstance(e, SpawnEngine) for e in out.effects)
        assert self.entry.active_leases == 0 and self.entry.placement is None

    # --- rules: time ------------------------------------------------------------------------

    @rule(dt=st.floats(min_value=0.0, max_value=20.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    # --- rules: commands ----------------------------------------------------------------------

    @rule(ok=st.booleans(), model=st.none() | st.sampled_from(["m0", "alt"]))
    def preload(self, ok: bool, model: str | None) -> None:
        self.plan_ok = ok
        before = self.state
        spec_before = self.lc.pool(POOL).spec
        out = self.command(PreloadCmd(command_id=f"preload-{self.seq}", model=model))
        if before == "unready" and not ok:
            assert isinstance(out.reply, Rejected) and out.reply.code == "placement_failed"
            assert out.reply.problems == list(REFUSAL.problems)
            assert out.events == []
            assert out.effects == [] and self.state == "unready"
            assert self.lc.pool(POOL).spec == spec_before
        elif before == "unready":
            assert self.state == "preloading"

    @rule(deadline=st.sampled_from([0.0, 5.0, 30.0]))
    def drain(self, deadline: float) -> None:
        before = self.state
        out = self.command(DrainCmd(command_id=f"drain-{self.seq}", deadline_s=deadline))
        if before in ("ready", "preloading"):
            assert isinstance(out.reply, Accepted)
            # Without leases a drain completes in the same step.
            assert self.state == ("draining" if self.entry.active_leases else "unready")

    @rule(ok=st.booleans(), deadline=st.sampled_from([0.0, 10.0]))
    def reload(self, ok: bool, deadline: float) -> None:
        self.plan_ok = ok
        self.model_counter += 1
        before = self.state
        out = self.command(
            ReloadCmd(command_id=f"reload-{self.seq}", model=f"m{self.model_counter}", deadline_s=deadline)
        )
        if before == "ready" and not ok:
            assert isinstance(out.reply, Rejected) and out.reply.code == "placement_failed"
            assert self.state == "ready"
        elif before == "ready":
            assert isinstance(out.reply, Accepted)
            assert self.state in ("draining", "preloading")

    @rule(grace=st.none() | st.sampled_from([0.0, 2.0]))
    def stop(self, grace: float | None) -> None:
        before = self.state
        self.command(StopCmd(command_id=f"stop-{self.seq}", grace_s=grace))
        if before != "unready":
            assert self.state == "unready"
            assert self.entry.engine is None
            assert self.timers == {}

    @rule()
    def reset(self) -> None:
        before = self.state
        self.command(ResetCmd(command_id=f"reset-{self.seq}"))
        if before == "failed":
            assert self.state == "unready"

    @rule(lease_id=st.sampled_from(LEASE_IDS), ttl=st.sampled_from([1.0, 10.0, 100.0]))
    def lease(self, lease_id: str, ttl: float) -> None:
        """A renewal of ``lease_id`` when it is held, else a grant for which the shell drew it."""
        before = self.state
        held = lease_id in self.entry.leases
        active = self.entry.active_leases
        if held:
            out = self.command(LeaseCmd(command_id=f"lease-{self.seq}", lease_id=lease_id, ttl_s=ttl))
        else:
            out = self.command(LeaseCmd(command_id=f"lease-{self.seq}", ttl_s=ttl), new_lease_id=lease_id)
        if before == "draining":
            expected = "draining"
        elif before != "ready":
            expected = "not_ready"
        elif not held and active == SLOTS:
            expected = "no_slots"
        else:
            assert isinstance(out.reply, Accepted), out.reply
            assert out.reply.expires_at == self.now + ttl
            assert self.entry.active_leases == active + (0 if held else 1)
            return
        assert isinstance(out.reply, Rejected) and out.reply.code == expected
        assert out.events == []
        assert self.entry.active_leases == active

    @rule(lease_id=st.sampled_from((*LEASE_IDS, "ghost")))
    def release(self, lease_id: str) -> None:
        held = lease_id in self.entry.leases
        active = self.entry.active_leases
        out = self.command(ReleaseCmd(command_id=f"release-{self.seq}", lease_id=lease_id))
        if held:
            assert isinstance(out.reply, Accepted)
            assert self.entry.active_leases == active - 1 or self.state == "unready"
        else:
            assert isinstance(out.reply, Rejected) and out.reply.code == "unknown_lease"

    @rule()
    def status(self) -> None:
        seq = self.seq
        out = self.command(StatusCmd(command_id=f"status-{self.seq}"))
        assert isinstance(out.reply, StatusReply)
        assert out.reply.pool == self.lc.registry.snapshot(POOL)
        assert out.reply.pool.state == self.state
        assert out.events == [] and out.effects == [] and self.seq == seq

    # --- facts (shared by the single-step rules and the macros) -------------------------------

    def _engine_spawned(self) -> None:
        self.next_pid += 1
        pid = self.next_pid
        self.pending_spawns.pop(0)
        self.live.add(pid)
        before = self.state
        previous = self.entry.engine
        info = EngineInfo(pid=pid, pgid=pid, port=20000 + pid % 1000, started_at=self.now)
        out = self.fact(before, self.lc.engine_spawned(POOL, info, "GPU-0", self.ctx()))
        if before == "preloading":
            assert self.entry.engine == info
            assert [e.type for e in out.events] == ["engine_spawned"]
            if previous is not None:
                # A second spawn report while loading: the engine it supersedes is stopped.
                assert previous.pid in self.asked_to_stop
        else:
            # The pool moved on while the spawn was in flight: the newcomer is stopped at once.
            assert out.events == []
            assert pid in self.asked_to_stop

    def _engine_exited(self, pid: int, how: tuple[int | None, int | None], rand: float) -> None:
        self.live.discard(pid)
        before = self.state
        current = self.entry.engine is not None and self.entry.engine.pid == pid
        out = self.fact(before, self.lc.engine_exited(POOL, pid, how[0], how[1], self.ctx(rand)))
        (exited,) = [e.body for e in out.events if isinstance(e.body, EngineExited)]
        assert exited.pid == pid and exited.during == before
        if current:
            assert not exited.expected
            assert self.entry.engine is None
        else:
            # An engine we stopped (or that is not ours): recorded, never a state change.
            assert self.state == before
            assert len(out.events) == 1

    def _health(self, kind: str, who: str, rand: float) -> None:
        engine = self.entry.engine
        pid = {"current": engine.pid if engine else None, "unnamed": None, "other": 1}[who]
        report = HealthReport(pool=POOL, ts=self.now, ok=kind == "ok", loading=kind == "loading", engine_pid=pid)
        before = self.state
        out = self.fact(before, self.lc.health(POOL, report, self.ctx(rand)))
        if engine is None or who == "other":
            assert out.events == [] and out.effects == []
        elif before == "preloading" and kind == "ok":
            assert self.state == "ready"
        elif before == "preloading":
            assert self.state == "preloading"  # never ready without a 200

    def _fire(self, name: TimerName, ok: bool, rand: float) -> None:
        timer = self.timers.pop(name)
        self.now = max(self.now, timer.due)
        self.plan_ok = ok
        before = self.state
        self.fact(before, self.lc.timer_fired(POOL, name, timer.token, self.ctx(rand)))
        if name == "backoff":
            assert before == "restarting" and self.state in ("preloading", "restarting", "failed")
        elif name == "load_timeout":
            assert before == "preloading" and self.state in ("restarting", "failed")
        elif name == "drain_deadline":
            assert before == "draining" and self.state in ("unready", "ready")

    # --- rules: facts -------------------------------------------------------------------------

    @precondition(lambda self: bool(self.pending_spawns))
    @rule()
    def engine_spawned(self) -> None:
        self._engine_spawned()

    @precondition(lambda self: bool(self.pending_spawns))
    @rule(rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
    def spawn_failed(self, rand: float) -> None:
        self.pending_spawns.pop(0)
        before = self.state
        out = self.fact(before, self.lc.spawn_failed(POOL, "cannot bind port", self.ctx(rand)))
        if before == "preloading":
            assert self.state in ("restarting", "failed")
        else:
            assert out.events == []

    @precondition(lambda self: bool(self.live))
    @rule(
        data=st.data(),
        how=st.sampled_from([(0, None), (1, None), (None, 9), (None, 15)]),
        rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    )
    def engine_exited(self, data: st.DataObject, how: tuple[int | None, int | None], rand: float) -> None:
        self._engine_exited(data.draw(st.sampled_from(sorted(self.live))), how, rand)

    @rule(
        kind=st.sampled_from(["ok", "loading", "fail"]),
        who=st.sampled_from(["current", "unnamed", "other"]),
        rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    )
    def health(self, kind: str, who: str, rand: float) -> None:
        self._health(kind, who, rand)

    @precondition(lambda self: bool(self.timers))
    @rule(
        data=st.data(),
        ok=st.booleans(),
        rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    )
    def timer_fired(self, data: st.DataObject, ok: bool, rand: float) -> None:
        self._fire(data.draw(st.sampled_from(sorted(self.timers))), ok, rand)

    # --- rules: macros of a well-behaved shell, so that deep states are reached often -----------

    def _bring_up(self, steps: int, warmup: tuple[str, ...] = ()) -> None:
        for _ in range(steps):
            if self.state == "unready":
                self.plan_ok = True
                self.command(PreloadCmd(command_id=f"preload-{self.seq}"))
            elif self.state == "preloading" and self.pending_spawns:
                self._engine_spawned()
            elif self.state == "preloading" and self.entry.engine is not None:
                for kind in warmup:  # 503s and failed probes while loading never make it ready
                    self._health(kind, "current", 0.5)
                    assert self.state == "preloading"
                self._health("ok", "current", 0.5)
            elif self.state == "restarting":
                self._fire("backoff", True, 0.5)
            else:
                return

    @rule(
        steps=st.integers(min_value=1, max_value=6),
        warmup=st.lists(st.sampled_from(["loading", "fail"]), max_size=3).map(tuple),
    )
    def bring_up(self, steps: int, warmup: tuple[str, ...]) -> None:
        """Take the natural next steps towards ready: preload, spawn, a 200, the backoff timer."""
        self._bring_up(steps, warmup)

    @rule(reload=st.booleans(), ok=st.booleans(), deadline_passes=st.booleans())
    def drain_while_leased(self, reload: bool, ok: bool, deadline_passes: bool) -> None:
        """A client holds a slot while the operator drains (or reloads) the pool."""
        self._bring_up(6)
        if self.state != "ready":
            return
        if not self.entry.leases:
            self.command(LeaseCmd(command_id=f"lease-{self.seq}", ttl_s=1000.0), new_lease_id=LEASE_IDS[0])
        if reload:
            self.model_counter += 1
            self.plan_ok = ok
            self.command(ReloadCmd(command_id=f"reload-{self.seq}", model=f"m{self.model_counter}", deadline_s=5.0))
        else:
            self.command(DrainCmd(command_id=f"drain-{self.seq}", deadline_s=5.0))
        assert self.lc.state(POOL) == ("ready" if reload and not ok else "draining")
        if deadline_passes and self.lc.state(POOL) == "draining":
            self._fire("drain_deadline", True, 0.5)
            assert self.lc.state(POOL) == ("ready" if reload else "unready")

    @rule(
        how=st.sampled_from(["crash", "sick", "load_timeout"]),
        times=st.integers(min_value=1, max_value=3),
        replace_ok=st.none() | st.booleans(),
    )
    def flap(self, how: str, times: int, replace_ok: bool | None) -> None:
        """The engine keeps failing right after it comes up: the crash loop supervision must stop."""
        for _ in range(times):
            if how == "load_timeout":
                self._bring_up(2)
                if self.state == "preloading":
                    self._fire("load_timeout", True, 0.5)
                continue
            self._bring_up(6)
            if self.state != "ready":
                return
            if how == "crash":
                self._engine_exited(self.entry.engine.pid, (1, None), 0.5)
            else:
                for _ in range(SPEC.probe_failure_threshold):
                    self._health("fail", "current", 0.5)
        if replace_ok is not None and self.state == "restarting":
            self._fire("backoff", replace_ok, 0.5)  # the restart's re-placement may fail too

    @precondition(lambda self: self.entry.engine is not None)
    @rule(rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
    def crash(self, rand: float) -> None:
        """The current engine dies."""
        self._engine_exited(self.entry.engine.pid, (1, None), rand)

    @precondition(lambda self: self.entry.engine is not None)
    @rule(n=st.integers(min_value=1, max_value=SPEC.probe_failure_threshold))
    def sick(self, n: int) -> None:
        """The current engine stops answering for ``n`` probes."""
        for _ in range(n):
            self._health("fail", "current", 0.5)

    @rule(name=st.sampled_from(TIMER_NAMES), token=st.integers(min_value=-1, max_value=60))
    def stale_timer(self, name: TimerName, token: int) -> None:
        current = self.timers.get(name)
        if current is not None and current.token == token:
            token += 1_000_000  # never issued
        before = self.state
        out = self.fact(before, self.lc.timer_fired(POOL, name, token, self.ctx()))
        assert out.events == [] and out.effects == []
        assert self.state == before

    @rule()
    def expire_leases(self) -> None:
        before = self.state
        active = self.entry.active_leases
        out = self.fact(before, self.lc.expire_leases(POOL, self.ctx()))
        expired = [e for e in out.events if e.type == "lease_expired"]
        assert self.entry.active_leases == active - len(expired) or self.state == "unready"

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def state_is_known(self) -> None:
        assert self.state in STATES

    @invariant()
    def the_log_folds_to_the_live_state(self) -> None:
        """Replay and recovery hold exactly the value the live machine holds: the whole state,
        compared as one value and, for a readable failure, field by field."""
        assert not self.folded.violations, self.folded.violations
        view = self.folded.views.get(POOL)
        live = self.lc.pool(POOL).value
        if view is None:
            assert self.state == "unready" and self.seq == 0
            assert live == initial(POOL, SPEC)
            return
        for name in PoolValue.__struct_fields__:
            assert getattr(view, name) == getattr(live, name), (
                f"{name}: folded {getattr(view, name)!r} != live {getattr(live, name)!r}"
            )
        assert view == live
        # A daemon restarted from the log takes the folded value as it is (recovery).
        other = PoolMachine(NODE, self.planner)
        other.register(PoolDefinition(POOL, SPEC, restart=POLICY))
        other.restore(POOL, view, self.ctx())
        assert other.pool(POOL).value == live
        assert other.state(POOL) == self.state

    @invariant()
    def leases_are_bounded_and_only_on_a_serving_pool(self) -> None:
        entry = self.entry
        assert 0 <= entry.active_leases <= SLOTS
        assert entry.slots_free == SLOTS - entry.active_leases
        if entry.active_leases:
            assert self.state in ("ready", "draining")

    @invariant()
    def engine_matches_the_state(self) -> None:
        engine = self.entry.engine
        if self.state in ("ready", "draining"):
            assert engine is not None
        if self.state in ("unready", "restarting", "failed"):
            assert engine is None
        if engine is not None:
            assert engine.pid in self.live
            assert engine.pid not in self.asked_to_stop

    @invariant()
    def timers_match_the_state(self) -> None:
        # The machine's own timer table is exactly what its effects told the shell.
        assert {n: t.token for n, t in self.timers.items()} == self.lc.pool(POOL).timers
        assert ("load_timeout" in self.timers) == (self.state == "preloading")
        assert ("backoff" in self.timers) == (self.state == "restarting")
        if "drain_deadline" in self.timers:
            assert self.state == "draining"

    @invariant()
    def draining_flag_matches_the_state(self) -> None:
        assert self.entry.draining == (self.state == "draining")


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class _SoundSteps(LifecycleMachine):
    """The property machine without injected bugs (their rows are walked below)."""

    BUGS = False


SOUND_ROWS = frozenset(row for row in ALL_ROWS if row[1] != "internal_error")


def test_property_run_reaches_every_row() -> None:
    """A fixed-seed run of the same machine takes every row of the table."""
    SEEN_ROWS.clear()
    run_state_machine_as_test(
        _SoundSteps,
        settings=settings(
            max_examples=200,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert SEEN_ROWS == SOUND_ROWS, sorted(SOUND_ROWS - SEEN_ROWS)


# --- deterministic coverage: walk every row explicitly ------------------------------------------


def driver(policy: RestartPolicy = POLICY) -> LifecycleHarness:
    """A scripted shell for pool ``p``, whose plan a walk switches to ``REFUSAL`` and back."""
    return LifecycleHarness(NODE, [PoolDefinition(POOL, SPEC, restart=policy)], plan=PLACEMENT, pid=0)


def sick(d: LifecycleHarness, pid: int) -> None:
    """Failed probes enough to lose the pool's health."""
    for _ in range(SPEC.probe_failure_threshold):
        d.probe(pid, ok=False)


def bug(d: LifecycleHarness) -> None:
    d.bug()
    assert d.state() == "failed"


def walk_every_row() -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []

    # Happy path, drains, reloads, stops.
    d = driver()
    pid = d.to_ready().pid  # preload, engine_ready
    d.cmd(DrainCmd(command_id="d"))  # ready -drain-> draining -drained-> unready
    d.cmd(PreloadCmd(command_id="p"))
    d.cmd(DrainCmd(command_id="d"))  # preloading -drain-> draining
    pid = d.to_ready().pid
    d.cmd(ReloadCmd(command_id="r", model="m2"))  # ready -reload-> draining -drained-> preloading
    pid = d.spawned_pid()
    d.probe(pid)
    d.cmd(LeaseCmd(command_id="l", ttl_s=999.0))
    d.cmd(ReloadCmd(command_id="r", model="m3"))
    d.fire("drain_deadline")  # draining -drain_deadline-> ready (reload aborted)
    d.cmd(DrainCmd(command_id="d"))
    d.cmd(StopCmd(command_id="s"))  # draining -stop-> unready
    pid = d.to_ready().pid
    d.cmd(LeaseCmd(command_id="l", ttl_s=999.0))
    d.cmd(DrainCmd(command_id="d"))
    d.fire("drain_deadline")  # draining -drain_deadline-> unready
    d.cmd(PreloadCmd(command_id="p"))
    d.cmd(StopCmd(command_id="s"))  # preloading -stop-> unready
    d.to_ready()
    d.cmd(StopCmd(command_id="s"))  # ready -stop-> unready
    seen += d.rows

    # Failures that restart.
    d = driver(RestartPolicy(max_consecutive_failures=100))
    pid = d.to_ready().pid
    d.exited(pid)  # ready -engine_exited-> restarting
    d.plan = REFUSAL
    d.fire("backoff")  # restarting -backoff_elapsed-> restarting
    d.plan = PLACEMENT
    d.fire("backoff")  # restarting -backoff_elapsed-> preloading
    d.fire("load_timeout")  # preloading -preload_failed-> restarting
    d.fire("backoff")
    pid = d.to_ready().pid
    sick(d, pid)  # ready -health_lost-> restarting
    d.cmd(StopCmd(command_id="s"))  # restarting -stop-> unready
    seen += d.rows

    # Failures that give up: a limit of one failure.
    d = driver(RestartPolicy(max_consecutive_failures=1))
    d.cmd(PreloadCmd(command_id="p"))
    d.fire("load_timeout")  # preloading -preload_failed-> failed
    d.cmd(ResetCmd(command_id="x"))  # failed -reset-> unready
    pid = d.to_ready().pid
    d.exited(pid)  # ready -engine_exited-> failed
    d.cmd(StopCmd(command_id="s"))  # failed -stop-> unready
    pid = d.to_ready().pid
    sick(d, pid)  # ready -health_lost-> failed
    seen += d.rows

    # Re-placement failing at the limit: restarting -backoff_elapsed-> failed.
    d = driver(RestartPolicy(max_consecutive_failures=2))
    pid = d.to_ready().pid
    d.exited(pid)
    d.plan = REFUSAL
    d.fire("backoff")
    assert d.state() == "failed"
    seen += d.rows

    # A bug inside a step, from every state but failed: -internal_error-> failed.
    d = driver(RestartPolicy(max_consecutive_failures=100))
    bug(d)  # unready
    d.cmd(ResetCmd(command_id="x"))
    d.cmd(PreloadCmd(command_id="p"))
    bug(d)  # preloading
    d.cmd(ResetCmd(command_id="x"))
    pid = d.to_ready().pid
    bug(d)  # ready
    d.cmd(ResetCmd(command_id="x"))
    pid = d.to_ready().pid
    d.cmd(LeaseCmd(command_id="l", ttl_s=999.0))
    d.cmd(DrainCmd(command_id="d"))
    bug(d)  # draining
    d.cmd(ResetCmd(command_id="x"))
    pid = d.to_ready().pid
    d.exited(pid)
    bug(d)  # restarting
    seen += d.rows
    return seen


def test_every_row_is_reachable() -> None:
    seen = walk_every_row()
    assert all(is_legal(*row) for row in seen)  # type: ignore[arg-type]
    assert set(seen) == ALL_ROWS, sorted(ALL_ROWS - set(seen))


@pytest.mark.parametrize("row", sorted(ALL_ROWS), ids="-".join)
def test_row_is_taken_by_the_walk(row: tuple[str, str, str]) -> None:
    assert row in set(walk_every_row())
