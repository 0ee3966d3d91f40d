"""Pool actors: one per pool. Each serialises its pool's inputs (commands, engine facts, timer
firings, health reports) through the shared lifecycle machine, appends the resulting events to
the event sink, then executes the effects. Results of effects come back as new inputs.

Nothing here decides anything: decisions live in the pure core. This module only turns effects
into processes, probes and timers, and process facts back into triggers.

One job, a long module: the loop of one pool and the effect handlers it dispatches to (spawn,
stop, probe, timers, adoption) share the actor's state and its order guarantee, and read only
together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from pool_managerd.adapters.engines.argv import render_argv
from pool_managerd.adapters.engines.errors import SpawnError, TemplateError
from pool_managerd.adapters.engines.handles import EngineHandle, EngineProcess, ExitInfo
from pool_managerd.adapters.engines.ports import allocate_port
from pool_managerd.adapters.engines.record import SpawnRecord
from pool_managerd.adapters.engines.spawn import spawn
from pool_managerd.adapters.eventlog.errors import PoolFenced, PoolQuarantined
from pool_managerd.adapters.faults import fault_point
from pool_managerd.adapters.http_probe import HealthProber, ProbeResult
from pool_managerd.contract.errors import UnknownPool
from pool_managerd.contract.messages import (
    AckCorruptCmd,
    EngineInfo,
    Event,
    HealthReport,
    LogCorrupt,
    Placement,
    RejectCode,
    Rejected,
)
from pool_managerd.core.definitions import Context
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
from pool_managerd.core.inputs import (
    CommandInput,
    EngineExitedInput,
    EngineStarted,
    GpuChecked,
    HealthInput,
    PoolInput,
    SpawnFailed,
    TimerFired,
    label,
)
from pool_managerd.core.machine import PoolMachine
from pool_managerd.core.pool_model import Outcome
from pool_managerd.runtime import quarantine

log = logging.getLogger(__name__)

MAX_QUEUED_HEALTH = 64
"""Outside health reports waiting in one pool's inbox at most; more are dropped (counted)."""
OWN_PROBER = "prober"
"""``source`` of the reports this daemon's own prober makes."""
MAX_QUEUED_PROBES = 64
"""Own prober results waiting in one pool's inbox at most (a newer one follows soon)."""
OUTSIDE = "outside"
"""``source`` every report from the health subject is given, whatever it claimed."""
MAX_QUEUED_COMMANDS = 64
"""Commands waiting in one pool's inbox at most; past it a command is answered ``overloaded``."""


class ActorHost(Protocol):
    """What a pool actor needs from the runtime around it, and nothing more."""

    lifecycle: PoolMachine
    spawn_record: SpawnRecord
    probe_options: dict[str, Any]

    async def context(
        self, needs_plan: bool, pool: str, command_id: str | None, traceparent: str | None, inp: PoolInput | None = None
    ) -> Context:
        """The clock, RNG and (for placements) GPU snapshot and host facts of one step: the
        facts of the spec that step's input (a preload or reload command) will really run."""
        ...

    async def append_events(self, pool: str, events: Sequence[Event]) -> None:
        """Make a step's events durable (or queued in order, past the ack bound)."""
        ...

    async def acknowledge_corrupt(self, pool: str, corrupt: LogCorrupt) -> LogCorrupt | None:
        """The operator acknowledged ``corrupt``: the next append follows it and any foreign
        messages stored after it, which it returns (still to acknowledge), or None."""
        ...

    def quarantine_changed(self, pool: str) -> None:
        """The pool entered or left ``log_corrupt``: derived state (snapshots, metrics) follows."""
        ...

    def after_step(self, pool: str, outcome: Outcome) -> None:
        """Derived state (snapshots, metrics, waiters) after a step's effects ran."""
        ...

    def after_probe(self, pool: str, report: HealthReport) -> None:
        """Derived state after a probe that changed only the probe bookkeeping (no step ran)."""
        ...

    def log_path(self, pool: str) -> Path:
        """The engine log of ``pool``."""
        ...

    def publish_health(self, actor: PoolActor, report: HealthReport) -> None:
        """Where this actor's own prober results go."""
        ...

    def engine_env(self, placement: Placement) -> dict[str, str]:
        """What the engine's environment gets besides its spec's and ``CUDA_VISIBLE_DEVICES``."""
        ...

    async def check_gpus(self, effect: VerifyGpus, alive: Callable[[], bool]) -> GpuChecked | None:
        """The post-launch GPU check's final sample (None: the engine went away first)."""
        ...


class Overloaded(Exception):
    """The pool's inbox holds :data:`MAX_QUEUED_COMMANDS` commands already."""


@dataclass(slots=True)
class _Input:
    inp: PoolInput
    needs_plan: bool = False
    command_id: str | None = None
    traceparent: str | None = None
    reply: asyncio.Future[Outcome] | None = None


@dataclass(slots=True)
class _Engine:
    handle: EngineHandle
    prober: HealthProber | None = None
    stopping: asyncio.Task[ExitInfo] | None = None
    health_path: str = "/health"
    probe_interval_s: float = 2.0


@dataclass(slots=True)
class ActorStats:
    steps: int = 0
    spawns: int = 0
    spawn_failures: int = 0
    stops: int = 0
    health_dropped: int = 0
    probes_absorbed: int = 0
    probes_dropped: int = 0
    internal_errors: int = 0
    reverted: int = 0


class PoolActor:
    """Runs one pool: a serial input queue over the shared lifecycle, and the effect executor."""

    def __init__(self, runtime: ActorHost, pool: str) -> None:
        self.runtime = runtime
        self.pool = pool
        self.engines: dict[int, _Engine] = {}
        self.timers: dict[TimerName, asyncio.TimerHandle] = {}
        self.stats = ActorStats()
        self.fenced = False
        self.quarantine: LogCorrupt | None = None
        """Set while foreign messages in the pool's stream wait for an operator (``log_corrupt``)."""
        self._parked = quarantine.Parked()
        # Two lanes: outside reports, and this daemon's own probe results, each with its own
        # bound, so a flood of the first can never push out or delay the second.
        self._health_queued = 0
        self._probes_queued = 0
        self._commands_queued = 0
        self._busy = False
        """A step is running (between taking an input and settling it)."""
        self._background: set[asyncio.Task[None]] = set()
        self._spawns: set[asyncio.Task[None]] = set()
        self._checks: set[asyncio.Task[None]] = set()
        self._spawn_lock = asyncio.Lock()
        self._queue: asyncio.Queue[_Input | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pool-actor-{pool}")

    # --- inputs --------------------------------------------------------------------------------

    def submit(
        self,
        inp: PoolInput,
        *,
        needs_plan: bool = False,
        command_id: str | None = None,
        traceparent: str | None = None,
        want_reply: bool = False,
    ) -> asyncio.Future[Outcome] | None:
        """Queue one input; with ``want_reply`` a future resolves with its outcome once the step's
        events are appended (before its effects run). A command past the pool's bound raises
        :class:`Overloaded` (facts are never refused: each stands for a process or a timer)."""
        if isinstance(inp, CommandInput):
            if self._commands_queued >= MAX_QUEUED_COMMANDS:
                raise Overloaded(self.pool)
            self._commands_queued += 1
        elif isinstance(inp, HealthInput):
            if inp.report.source == OWN_PROBER:
                self._probes_queued += 1
            else:
                self._health_queued += 1
        fut: asyncio.Future[Outcome] | None = None
        if want_reply:
            fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Input(inp, needs_plan, command_id, traceparent, fut))
        return fut

    @property
    def queued_commands(self) -> int:
        return self._commands_queued

    def health_report(self, report: HealthReport) -> bool:
        """Feed one outside health report. Returns False when it was dropped: anyone may publish
        on the health subject, and a flood must not grow the pool's input queue without bound
        (at most ``MAX_QUEUED_HEALTH`` outside reports wait at once)."""
        if self._health_queued >= MAX_QUEUED_HEALTH:
            self.stats.health_dropped += 1
            return False
        self.submit(HealthInput(msgspec.structs.replace(report, source=OUTSIDE)))
        return True

    def absorb_probe(self, report: HealthReport) -> bool:
        """Take our prober's healthy report of a healthy ready engine without a step: it changes
        only the probe bookkeeping (:meth:`PoolMachine.absorb_probe`), so it costs no queue turn,
        no checkpoint and no outcome. Only while the inbox is empty and no step runs, so it is
        exactly the step it replaces; otherwise (or for any other report) returns False and the
        caller queues the report."""
        if self._busy or self.fenced or self.quarantine is not None or self._parked or not self._queue.empty():
            return False
        if not self.runtime.lifecycle.absorb_probe(self.pool, report):
            return False
        self.stats.probes_absorbed += 1
        self.runtime.after_probe(self.pool, report)
        return True

    def own_probe(self, report: HealthReport) -> None:
        """Feed one result of this daemon's own prober. Its lane is not the outside reports': a
        flood on the health subject never drops or delays it. Bounded all the same (a step that
        waits long on the log must not let a fast preload probe pile up results)."""
        if self._probes_queued >= MAX_QUEUED_PROBES:
            self.stats.probes_dropped += 1
            return
        if report.source != OWN_PROBER:
            report = msgspec.structs.replace(report, source=OWN_PROBER)
        self.submit(HealthInput(report))

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        rt = self.runtime
        lc = rt.lifecycle
        while True:
            self._busy = False
            item = self._parked.take() if self.quarantine is None else None
            if item is None:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item.inp, CommandInput):
                    self._commands_queued -= 1
                elif isinstance(item.inp, HealthInput):
                    if item.inp.report.source == OWN_PROBER:
                        self._probes_queued -= 1
                    else:
                        self._health_queued -= 1
            self._busy = True
            ack = isinstance(item.inp, CommandInput) and isinstance(item.inp.cmd, AckCorruptCmd)
            remaining: LogCorrupt | None = None
            if ack:
                matched, remaining = await self._ack_matches(item)
                if not matched:
                    continue
            if self.pool not in lc.pools:
                if item.reply is not None and not item.reply.done():
                    item.reply.set_exception(UnknownPool(self.pool))
                continue
            try:
                ctx = await rt.context(item.needs_plan, self.pool, item.command_id, item.traceparent, item.inp)
            except Exception:
                # The world could not be read (host facts, GPU snapshot): nothing was applied.
                log.exception("pool %s: no context for step %s", self.pool, label(item.inp))
                _settle(item, Outcome(_rejected(self.pool, item, "unavailable", "the host could not be read"), [], []))
                continue
            # A step never raises: a bug inside it is recorded as internal_error (core.machine).
            outcome = lc.step(self.pool, item.inp, ctx)
            self.stats.steps += 1
            if any(e.type == "internal_error" for e in outcome.events):
                self.stats.internal_errors += 1
                log.error("pool %s: step %s raised; the pool is failed", self.pool, label(item.inp))
            if outcome.events and self.quarantine is not None and not ack:
                # Nothing more is written while foreign messages wait for an operator: a command
                # is refused, a fact waits (in order) and is applied once the pool is released.
                lc.revert(self.pool, outcome)
                self._hold(item)
                continue
            if outcome.events:
                try:
                    await rt.append_events(self.pool, outcome.events)
                except PoolQuarantined as exc:
                    lc.revert(self.pool, outcome)
                    self.quarantine = quarantine.merged(self.quarantine, exc.corrupt)
                    log.error("pool %s: quarantined (log_corrupt): %s", self.pool, self.quarantine.reason)
                    rt.quarantine_changed(self.pool)
                    self._hold(item)
                    continue
                except PoolFenced as exc:
                    lc.revert(self.pool, outcome)
                    self.fenced = True
                    _settle(item, Outcome(_fenced_reply(self.pool, outcome, exc.reason), [], []))
                    continue
                except Exception:
                    # Not in the log: the step did not happen. Memory goes back to what the log
                    # says, so the next event follows the last one appended.
                    log.exception("pool %s: events of step %s not appended; step undone", self.pool,
                                  label(item.inp))  # fmt: skip
                    lc.revert(self.pool, outcome)
                    self.stats.reverted += 1
                    reply = _rejected(self.pool, item, "unavailable", "the event log refused the step; nothing applied")
                    _settle(item, Outcome(reply, [], []))
                    continue
            if ack and self.quarantine is not None:
                log.warning("pool %s: foreign messages at stream sequences %s acknowledged; %s", self.pool,
                            self.quarantine.sequences, "serving again" if remaining is None else
                            f"more wait: {remaining.reason}")  # fmt: skip
                # A flood larger than one acknowledgement lists is acknowledged in batches.
                self.quarantine = remaining
                rt.quarantine_changed(self.pool)
            _settle(item, outcome)
            if self.fenced:
                continue
            for effect in outcome.effects:
                try:
                    self._execute(effect)
                except Exception:
                    log.exception("pool %s: effect %r failed", self.pool, effect)
            rt.after_step(self.pool, outcome)

    async def _ack_matches(self, item: _Input) -> tuple[bool, LogCorrupt | None]:
        """Check an ``ack_corrupt`` against the quarantine; on a match the publisher is told to
        follow the acknowledged messages, and the step (which records the ack) goes ahead.
        Returns whether it matched, and the foreign messages found after the acknowledged ones."""
        assert isinstance(item.inp, CommandInput) and isinstance(item.inp.cmd, AckCorruptCmd)
        problem = quarantine.ack_problem(self.pool, self.quarantine, item.inp.cmd.sequences)
        if problem is not None:
            _settle(item, Outcome(_rejected(self.pool, item, "ack_mismatch", problem), [], []))
            return False, None
        assert self.quarantine is not None
        try:
            return True, await self.runtime.acknowledge_corrupt(self.pool, self.quarantine)
        except Exception:
            log.exception("pool %s: the messages after the acknowledged ones could not be read", self.pool)
            _settle(item, Outcome(_rejected(self.pool, item, "unavailable", "the event log could not be read; "
                                            "nothing applied, retry"), [], []))  # fmt: skip
            return False, None

    def _hold(self, item: _Input) -> None:
        corrupt = self.quarantine
        assert corrupt is not None
        if isinstance(item.inp, CommandInput):
            message = quarantine.refusal(corrupt)
            _settle(item, Outcome(_rejected(self.pool, item, "log_corrupt", message), [], []))
        elif not self._parked.park(item, health=isinstance(item.inp, HealthInput)):
            self.stats.health_dropped += 1

    def _execute(self, effect: Effect) -> None:
        if isinstance(effect, SpawnEngine):
            # Off the inbox: the old engine's stop and the fork are waited for in a task, so the
            # pool keeps answering commands meanwhile; the result comes back as an input.
            task = asyncio.get_running_loop().create_task(self._spawn(effect), name=f"spawn-{self.pool}")
            self._spawns.add(task)
            task.add_done_callback(self._spawns.discard)
        elif isinstance(effect, ReleaseEngine):
            self._release(effect.pid)
        elif isinstance(effect, StopEngine):
            self._stop(effect.pid, effect.grace_s, effect.reason)
        elif isinstance(effect, ArmTimer):
            self._arm(effect)
        elif isinstance(effect, CancelTimer):
            handle = self.timers.pop(effect.name, None)
            if handle is not None:
                handle.cancel()
        elif isinstance(effect, VerifyGpus):
            task = asyncio.get_running_loop().create_task(self._check_gpus(effect), name=f"gpu-check-{self.pool}")
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check_gpus(self, effect: VerifyGpus) -> None:
        def alive() -> bool:
            engine = self.engines.get(effect.pid)
            return engine is not None and engine.stopping is None

        result = await self.runtime.check_gpus(effect, alive)
        if result is not None and alive():
            self.submit(result)

    # --- timers --------------------------------------------------------------------------------

    def _arm(self, effect: ArmTimer) -> None:
        old = self.timers.pop(effect.name, None)
        if old is not None:
            old.cancel()
        name, token = effect.name, effect.token

        def fire() -> None:
            self.timers.pop(name, None)
            self.submit(TimerFired(name, token), needs_plan=name == "backoff")

        self.timers[name] = asyncio.get_running_loop().call_later(effect.delay_s, fire)

    # --- engines -------------------------------------------------------------------------------

    async def _spawn(self, effect: SpawnEngine) -> None:
        rt = self.runtime
        async with self._spawn_lock:
            # A reload or restart reuses the same GPUs: the previous engine must be gone first.
            pending = [e.stopping for e in self.engines.values() if e.stopping is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            spec = effect.spec
            try:
                port = spec.port if spec.port is not None else allocate_port(spec.host)
                argv = render_argv(spec.argv, _placeholders(spec.model, port, spec.host, effect.placement))
                env = {**spec.env, **rt.engine_env(effect.placement),
                       "CUDA_VISIBLE_DEVICES": effect.placement.cuda_visible_devices}  # fmt: skip
                handle = await spawn(
                    argv,
                    pool=self.pool,
                    port=port,
                    host=spec.host,
                    env=env,
                    log_path=rt.log_path(self.pool),
                    record=rt.spawn_record,
                    on_exit=self._on_exit,
                    gated=True,
                )
            except (SpawnError, TemplateError, OSError) as exc:
                self.stats.spawn_failures += 1
                message = getattr(exc, "message", None) or str(exc)
                self.submit(SpawnFailed(message, effect.attempt))
                return
            self.stats.spawns += 1
            info = EngineInfo(
                pid=handle.pid,
                pgid=handle.pgid,
                port=port,
                started_at=handle.started_at,
                argv=list(argv),
                log_path=str(handle.log_path) if handle.log_path else None,
            )
            self.engines[handle.pid] = _Engine(handle, health_path=spec.health_path,
                                               probe_interval_s=spec.probe_interval_s)  # fmt: skip
            # Held at its gate until the machine has logged engine_spawned (ReleaseEngine).
            self.submit(EngineStarted(info, effect.placement.cuda_visible_devices, effect.attempt))

    def _release(self, pid: int) -> None:
        engine = self.engines.get(pid)
        if engine is None or engine.stopping is not None:
            return
        handle = engine.handle
        if isinstance(handle, EngineProcess):
            handle.release()
        fault_point("spawn:after_release")
        self._start_probing(handle, engine.health_path, engine.probe_interval_s)

    def track(self, handle: EngineHandle, health_path: str, probe_interval_s: float, *, steady: bool) -> None:
        """Hold and probe an engine this actor did not spawn (adopted after a daemon restart)."""
        self.engines[handle.pid] = _Engine(handle, health_path=health_path, probe_interval_s=probe_interval_s)
        self._start_probing(handle, health_path, probe_interval_s, steady=steady)

    def on_engine_exit(self, handle: EngineHandle, info: ExitInfo) -> None:
        """The exit callback to give engine handles: reports the exit as an input."""
        self._on_exit(handle, info)

    def _start_probing(self, handle: EngineHandle, path: str, interval_s: float, *, steady: bool = False) -> None:
        pid = handle.pid

        async def on_result(result: ProbeResult) -> None:
            report = HealthReport(
                pool=self.pool,
                ts=result.ts,
                ok=result.ok,
                loading=result.loading,
                status=result.status,
                latency_ms=round(result.latency_ms, 3),
                error=result.error,
                engine_pid=pid,
            )
            self.runtime.publish_health(self, report)

        prober = HealthProber(
            handle.host,
            handle.port,
            path,
            on_result=on_result,
            steady_interval_s=interval_s,
            mode="steady" if steady else "preload",
            name=f"{self.pool}/{pid}",
            **self.runtime.probe_options,
        )
        self.engines[pid].prober = prober
        prober.start()

    def _stop_probing(self, engine: _Engine) -> None:
        prober, engine.prober = engine.prober, None
        if prober is not None:
            task = asyncio.get_running_loop().create_task(prober.stop(), name=f"stop-probe-{self.pool}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_exit(self, handle: EngineHandle, info: ExitInfo) -> None:
        engine = self.engines.get(handle.pid)
        if engine is not None:
            self._stop_probing(engine)
        if engine is not None and engine.stopping is None:
            self.engines.pop(handle.pid, None)
        self.submit(EngineExitedInput(handle.pid, info.exit_code, info.signal))

    def _stop(self, pid: int, grace_s: float, reason: str) -> None:
        engine = self.engines.get(pid)
        if engine is None or engine.stopping is not None:
            return
        self._stop_probing(engine)
        self.stats.stops += 1
        log.info("pool %s: stopping engine pid %d (%s)", self.pool, pid, reason)
        task = asyncio.get_running_loop().create_task(engine.handle.stop(grace_s), name=f"stop-{self.pool}-{pid}")
        engine.stopping = task
        task.add_done_callback(lambda _t: self.engines.pop(pid, None))

    async def abandon(self) -> None:
        """The pool was fenced: cancel its timers and probes and stop its engines, outside the
        lifecycle (nothing is written for a pool another daemon owns now)."""
        self.fenced = True
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        if self._spawns:
            await asyncio.gather(*self._spawns, return_exceptions=True)
        grace = self.runtime.lifecycle.pool(self.pool).spec.stop_grace_s
        for pid in list(self.engines):
            self._stop(pid, grace, "pool fenced: another daemon writes it")
        stops = [e.stopping for e in self.engines.values() if e.stopping is not None]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)

    # --- shutdown ------------------------------------------------------------------------------

    async def close(self, *, stop_engines: bool, grace_s: float | None = None) -> None:
        """Stop taking inputs, cancel timers and probes, and (by default) stop every engine."""
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for check in list(self._checks):
            check.cancel()
        if self._spawns:
            # A spawn in flight registers its engine (or fails) within the old engine's stop;
            # its engine_spawned is never applied, so the engine is stopped below with the rest.
            await asyncio.gather(*self._spawns, return_exceptions=True)
        for engine in list(self.engines.values()):
            self._stop_probing(engine)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if stop_engines:
            grace = grace_s if grace_s is not None else self.runtime.lifecycle.pool(self.pool).spec.stop_grace_s
            waits = []
            for pid, engine in list(self.engines.items()):
                if engine.stopping is None:
                    self._stop(pid, grace, "daemon shutdown")
                stopping = self.engines.get(pid, engine).stopping
                if stopping is not None:
                    waits.append(stopping)
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)


def _settle(item: _Input, outcome: Outcome) -> None:
    if item.reply is not None and not item.reply.done():
        item.reply.set_result(outcome)


def _rejected(pool: str, item: _Input, code: RejectCode, message: str) -> Rejected | None:
    if not isinstance(item.inp, CommandInput):
        return None
    verb = str(item.inp.cmd.__struct_config__.tag)
    return Rejected(command_id=item.inp.cmd.command_id, pool=pool, verb=verb, code=code,
                    message=f"pool {pool!r}: {message}")  # fmt: skip


def _fenced_reply(pool: str, outcome: Outcome, reason: str) -> Rejected | None:
    if outcome.reply is None:
        return None
    cmd_id = getattr(outcome.reply, "command_id", None)
    verb = getattr(outcome.reply, "verb", None)
    return Rejected(command_id=cmd_id, pool=pool, verb=verb, code="fenced",
                    message=f"pool {pool!r} is fenced: {reason}")  # fmt: skip


def _placeholders(model: str, port: int, host: str, placement: Placement) -> dict[str, str | int]:
    return {
        "model": model,
        "port": port,
        "host": host,
        "tensor_split": placement.tensor_split or "",
        "n_gpus": max(1, len(placement.uuids)),
    }
