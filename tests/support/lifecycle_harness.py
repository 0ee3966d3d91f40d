"""The pure lifecycle driven by a scripted shell: one :class:`LifecycleHarness` for the unit tests
of the machine, its property and restore tests, and the golden-log script.

The harness plays the shell's part with plain values: it answers ``SpawnEngine`` with
``engine_spawned`` (pids it counts itself), fires the timers it was asked to arm with the tokens
it was given, feeds health reports and exits, and keeps every event the machine wrote. It holds
no clock of its own: ``now`` is a number the test sets, or that moves by ``tick`` on every input
(the golden script and the restore tests want each fact at a later instant).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from pool_managerd.contract.messages import (
    Accepted,
    EngineInfo,
    Event,
    GpuSnapshot,
    HealthReport,
    Placement,
    PoolCommand,
    PoolState,
    PreloadCmd,
    StateChanged,
)
from pool_managerd.core.definitions import Context, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import ArmTimer, CancelTimer, SpawnEngine, TimerName
from pool_managerd.core.machine import PoolMachine
from pool_managerd.core.pool_model import Outcome, PoolModel

Planner = Callable[[PlanRequest], Placement | PlanRejected]
EngineFactory = Callable[[int, float], EngineInfo]
Row = tuple[str, str, str]


def fake_engine(pid: int, now: float) -> EngineInfo:
    """The engine a harness reports spawned unless told otherwise."""
    return EngineInfo(pid=pid, pgid=pid, port=9000 + pid, started_at=now, argv=["fake-engine"])


class LifecycleHarness:
    """One :class:`PoolMachine` plus the shell's bookkeeping: the events it wrote (all of them and
    per pool), the timers armed, the last spawn asked for, the plans asked for, the clock."""

    def __init__(
        self,
        node: str,
        definitions: Iterable[PoolDefinition] = (),
        *,
        plan: Placement | PlanRejected | None = None,
        planner: Planner | None = None,
        now: float = 0.0,
        tick: float = 0.0,
        rand: float = 0.5,
        snapshot: GpuSnapshot | None = None,
        pid: int = 100,
        gpu: str = "GPU-0",
        engine: EngineFactory = fake_engine,
        simulated: bool = False,
    ) -> None:
        """``plan`` is what the default planner answers (settable between steps); ``planner``
        replaces it with a function of the request. ``pid`` is the last pid handed out, ``gpu``
        the device the spawned engines report, ``tick`` how far ``now`` moves per input."""
        self.plan: Placement | PlanRejected | None = plan
        self._planner = planner
        self.requests: list[PlanRequest] = []
        self.lc = PoolMachine(node, self.planner)
        self.now = now
        self.tick = tick
        self.rand = rand
        self.snapshot = snapshot
        self.pid = pid
        self.gpu = gpu
        self.engine = engine
        self.events: list[Event] = []
        self.log: defaultdict[str, list[Event]] = defaultdict(list)
        self.timers: defaultdict[str, dict[TimerName, int]] = defaultdict(dict)
        self.last_spawn: SpawnEngine | None = None
        self.default_pool: str | None = None
        for definition in definitions:
            self.register(definition, simulated=simulated)

    def register(self, definition: PoolDefinition, *, simulated: bool = False) -> PoolModel:
        """Add a pool; the first one added is the pool every input names by default."""
        model = self.lc.register(definition, simulated=simulated)
        self.default_pool = self.default_pool or definition.pool
        self.log[definition.pool] = []
        self.timers[definition.pool] = {}
        return model

    def planner(self, request: PlanRequest) -> Placement | PlanRejected:
        self.requests.append(request)
        if self._planner is not None:
            return self._planner(request)
        assert self.plan is not None, "the harness was given no plan"
        return self.plan

    def ctx(self, **kwargs: Any) -> Context:
        """The context of one input; ``now`` moves by ``tick`` first."""
        self.now += self.tick
        return Context(now=self.now, rand=self.rand, snapshot=self.snapshot, **kwargs)

    def _pool(self, pool: str | None) -> str:
        name = pool or self.default_pool
        assert name is not None, "no pool registered"
        return name

    def take(self, outcome: Outcome, pool: str | None = None) -> Outcome:
        """Record what one step wrote and asked for (timers armed and cancelled, spawns)."""
        name = self._pool(pool)
        self.events.extend(outcome.events)
        self.log[name].extend(outcome.events)
        for effect in outcome.effects:
            if isinstance(effect, ArmTimer):
                self.timers[name][effect.name] = effect.token
            elif isinstance(effect, CancelTimer):
                self.timers[name].pop(effect.name, None)
            elif isinstance(effect, SpawnEngine):
                self.last_spawn = effect
        return outcome

    # --- inputs ---------------------------------------------------------------------------------

    def cmd(self, cmd: PoolCommand, pool: str | None = None, **ctx: Any) -> Outcome:
        """Apply a command; ``ctx`` goes into its Context (``new_lease_id``, ``command_id``, ...)."""
        name = self._pool(pool)
        return self.take(self.lc.command(name, cmd, self.ctx(**ctx)), name)

    def spawned(self, pool: str | None = None) -> tuple[Outcome, EngineInfo]:
        """Report the next engine spawned (a new pid, started now)."""
        name = self._pool(pool)
        self.pid += 1
        info = self.engine(self.pid, self.now)
        return self.take(self.lc.engine_spawned(name, info, self.gpu, self.ctx()), name), info

    def spawned_pid(self, pool: str | None = None) -> int:
        """:meth:`spawned`, for a caller that needs only the new engine's pid."""
        return self.spawned(pool)[1].pid

    def spawn_failed(self, error: str = "no such file", pool: str | None = None, attempt: int | None = None) -> Outcome:
        name = self._pool(pool)
        return self.take(self.lc.spawn_failed(name, error, self.ctx(), attempt), name)

    def exited(
        self, pid: int, exit_code: int | None = 1, signal: int | None = None, pool: str | None = None
    ) -> Outcome:
        name = self._pool(pool)
        return self.take(self.lc.engine_exited(name, pid, exit_code, signal, self.ctx()), name)

    def probe(
        self,
        pid: int | None,
        *,
        ok: bool = True,
        loading: bool = False,
        status: int | None = None,
        pool: str | None = None,
    ) -> Outcome:
        """A health report about engine ``pid`` (None: a report that names no engine)."""
        name = self._pool(pool)
        ctx = self.ctx()
        report = HealthReport(pool=name, ts=ctx.now, ok=ok, loading=loading, status=status, engine_pid=pid)
        return self.take(self.lc.health(name, report, ctx), name)

    def fire(self, name: TimerName, pool: str | None = None, token: int | None = None) -> Outcome:
        """Fire a timer with the token it was armed with (or ``token``, a stale one)."""
        target = self._pool(pool)
        if token is None:
            token = self.timers[target].pop(name)
        return self.take(self.lc.timer_fired(target, name, token, self.ctx()), target)

    def bug(self, pool: str | None = None) -> Outcome:
        """A step that raises (an input the core does not know): the pool records internal_error."""
        name = self._pool(pool)
        return self.take(self.lc.step(name, object(), self.ctx()), name)  # type: ignore[arg-type]

    # --- reads ----------------------------------------------------------------------------------

    def state(self, pool: str | None = None) -> PoolState:
        return self.lc.state(self._pool(pool))

    def model(self, pool: str | None = None) -> PoolModel:
        return self.lc.pool(self._pool(pool))

    def entry(self, pool: str | None = None) -> Any:
        return self.model(pool).entry

    @property
    def rows(self) -> list[Row]:
        """Every row of the table the pools took, in order."""
        return [(e.body.src, e.body.trigger, e.body.dst) for e in self.events if isinstance(e.body, StateChanged)]

    # --- macros ---------------------------------------------------------------------------------

    def to_ready(self, pool: str | None = None) -> EngineInfo:
        """Preload (if unready), spawn and probe healthy: the pool ends ready."""
        if self.state(pool) == "unready":
            out = self.cmd(PreloadCmd(command_id=f"preload-{self.now}"), pool)
            assert isinstance(out.reply, Accepted), out.reply
        assert self.state(pool) == "preloading"
        _, info = self.spawned(pool)
        self.probe(info.pid, pool=pool)
        assert self.state(pool) == "ready"
        return info
