"""The pool runtime: the shared lifecycle machine, one actor per pool, and what every actor needs
from the outside world (clock, RNG, GPU snapshots, host facts, the event sink)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from pool_managerd.adapters.engines.ports import PortAllocator
from pool_managerd.adapters.engines.procs import group_members
from pool_managerd.adapters.engines.record import SpawnRecord
from pool_managerd.adapters.host_facts import gather_host_facts
from pool_managerd.contract.errors import PoolManagerError, UnknownPool
from pool_managerd.contract.messages import (
    Accepted,
    EngineSpec,
    Event,
    GpuSnapshot,
    HealthReport,
    LeaseCmd,
    LogCorrupt,
    Placement,
    PoolCommand,
    PoolSnapshot,
    Problem,
    Rejected,
    StatusCmd,
    StatusReply,
)
from pool_managerd.core.command_spec import BadCommand, check_command, requested_spec
from pool_managerd.core.definitions import Context, PoolDefinition
from pool_managerd.core.effects import VerifyGpus
from pool_managerd.core.inputs import CommandInput, GpuChecked, PoolInput
from pool_managerd.core.machine import PoolMachine
from pool_managerd.core.pool_model import Outcome
from pool_managerd.lifecycle.preload import model_path, plan_preload
from pool_managerd.runtime.actor import Overloaded, PoolActor
from pool_managerd.runtime.gpu_check import check_engine

log = logging.getLogger(__name__)

PoolReply = Accepted | Rejected | StatusReply

PLAN_VERBS = frozenset({"preload", "reload"})

LEASE_ID_BYTES = 18
"""Random bytes in a lease id (144 bits, 24 URL-safe characters)."""


class EventSink(Protocol):
    """Where a step's events go before its effects run (JetStream in the daemon)."""

    async def append(self, pool: str, events: Sequence[Event]) -> None: ...

    async def acknowledge(self, pool: str, corrupt: LogCorrupt, next_seq: int) -> LogCorrupt | None:
        """An operator acknowledged ``corrupt``: the pool's next append (the acknowledgement)
        follows those messages and any foreign ones stored after them; returns the latter (still
        to acknowledge), or None."""
        ...


GpuSource = Callable[[], GpuSnapshot]


PROBE_OPTIONS: dict[str, Any] = {"preload_initial_s": 0.005, "preload_max_s": 0.025}
"""The daemon's probe schedule while an engine loads: from 5 ms, backing off to 25 ms, so the
first 200 is seen ~12 ms after it happens on average. Loopback /health requests are cheap; a
slow-loading engine costs 40 requests a second until it is ready, then the configured interval."""


@dataclass(slots=True)
class RuntimeOptions:
    """Knobs of the runtime that tests and the daemon set."""

    node: str = "node-1"
    run_dir: Path = Path("run")
    probe_options: dict[str, Any] = field(default_factory=lambda: dict(PROBE_OPTIONS))
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)


class PoolRuntime:
    """Every pool of this node: the lifecycle, its actors, and the effect executor's world."""

    def __init__(
        self,
        sink: EventSink,
        gpu_source: GpuSource,
        options: RuntimeOptions | None = None,
        *,
        health_out: Callable[[HealthReport], None] | None = None,
        gpu_reader: GpuSource | None = None,
        engine_env: Callable[[Placement], dict[str, str]] | None = None,
    ) -> None:
        self.options = options or RuntimeOptions()
        self.gpu_reader = gpu_reader
        """Fresh per-process GPU memory for the post-launch check; without one, pools skip it."""
        self._engine_env = engine_env

        self.node = self.options.node
        self.sink = sink
        self.gpu_source = gpu_source
        self.lifecycle = PoolMachine(self.node, plan_preload)
        self.actors: dict[str, PoolActor] = {}
        self.health_out = health_out
        self.listeners: list[Callable[[str, Outcome], None]] = []
        self.probe_listeners: list[Callable[[str, HealthReport], None]] = []
        """Called for each probe absorbed without a step (:meth:`PoolActor.absorb_probe`)."""
        self.run_dir = self.options.run_dir
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.spawn_record = SpawnRecord(self.run_dir / "engines.json")
        self.ports = PortAllocator()
        """Ports of the engines started without one of their own, held until each is gone."""
        self.probe_options = dict(self.options.probe_options)
        self._state_waiters: list[tuple[str, frozenset[str], asyncio.Future[str]]] = []
        self.on_quarantine: Callable[[str], None] | None = None
        """Called when a pool enters or leaves ``log_corrupt``."""

    # --- pools ---------------------------------------------------------------------------------

    def add_pool(self, definition: PoolDefinition, *, simulated: bool = False) -> PoolActor:
        if self.gpu_reader is None and definition.gpu_check is not None:
            definition = dataclasses.replace(definition, gpu_check=None)
        self.lifecycle.register(definition, simulated=simulated)
        actor = PoolActor(self, definition.pool)
        self.actors[definition.pool] = actor
        return actor

    async def remove_pool(self, pool: str) -> None:
        """Stop serving ``pool``: close its actor (stopping any engine it still holds) and forget it."""
        actor = self.actor(pool)
        await actor.close(stop_engines=True)
        del self.actors[pool]
        self.lifecycle.unregister(pool)

    def actor(self, pool: str) -> PoolActor:
        try:
            return self.actors[pool]
        except KeyError:
            raise UnknownPool(pool) from None

    async def command(self, pool: str, cmd: PoolCommand, traceparent: str | None = None) -> PoolReply:
        """Apply one command to ``pool`` and return its reply (after its events are appended)."""
        actor = self.actor(pool)
        if isinstance(cmd, StatusCmd):
            # A read needs no serialisation: the loop is single-threaded and steps are synchronous.
            return StatusReply(pool=self.snapshot(pool))
        verb = str(cmd.__struct_config__.tag)
        if actor.fenced:
            return Rejected(command_id=cmd.command_id, pool=pool, verb=verb, code="fenced",
                            message=f"pool {pool!r} is fenced: another daemon writes its events")  # fmt: skip
        try:
            check_command(self.lifecycle.pool(pool).definition, cmd)
        except BadCommand as exc:
            # Refused before the pool sees it: what the configuration does not allow changes nothing.
            return Rejected(command_id=cmd.command_id, pool=pool, verb=verb, code="bad_request", message=str(exc))
        try:
            fut = actor.submit(
                CommandInput(cmd),
                needs_plan=verb in PLAN_VERBS,
                command_id=cmd.command_id,
                traceparent=traceparent,
                want_reply=True,
            )
        except Overloaded:
            return Rejected(command_id=cmd.command_id, pool=pool, verb=verb, code="overloaded",
                            message=f"pool {pool!r} has too many commands waiting; retry later")  # fmt: skip
        assert fut is not None
        outcome = await fut
        assert outcome.reply is not None
        return outcome.reply

    def snapshot(self, pool: str) -> PoolSnapshot:
        """The pool as ``status`` and the KV bucket show it, its quarantine included."""
        return self.overlay(self.lifecycle.registry.snapshot(pool))

    def overlay(self, snapshot: PoolSnapshot) -> PoolSnapshot:
        """``snapshot`` with its pool's quarantine (``log_corrupt``), which lives in the actor."""
        actor = self.actors.get(snapshot.pool)
        if actor is not None and actor.quarantine is not None:
            snapshot = msgspec.structs.replace(snapshot, log_corrupt=actor.quarantine)
        return snapshot

    def quarantine(self, pool: str, corrupt: LogCorrupt) -> None:
        """Put ``pool`` in ``log_corrupt`` (recovery found unacknowledged foreign messages)."""
        self.actor(pool).quarantine = corrupt
        self.quarantine_changed(pool)

    async def acknowledge_corrupt(self, pool: str, corrupt: LogCorrupt) -> LogCorrupt | None:
        return await self.sink.acknowledge(pool, corrupt, self.lifecycle.pool(pool).value.seq + 1)

    def quarantine_changed(self, pool: str) -> None:
        if self.on_quarantine is not None:
            self.on_quarantine(pool)

    def health_report(self, report: HealthReport) -> bool:
        """Route a health report to its pool's actor; reports for pools not owned here are
        ignored and counted. Returns whether it was routed."""
        actor = self.actors.get(report.pool)
        if actor is None:
            return False
        return actor.health_report(report)

    def publish_health(self, actor: PoolActor, report: HealthReport) -> None:
        """Where our own prober's results go: straight to the pool (no round trip through NATS),
        then to ``health_out`` for observers when wired. A healthy probe that changes nothing
        is absorbed without a step; any other is queued in the own-probe lane."""
        if not actor.absorb_probe(report):
            actor.own_probe(report)
        if self.health_out is not None:
            self.health_out(report)

    # --- the world as the actors see it --------------------------------------------------------

    async def context(
        self, needs_plan: bool, pool: str, command_id: str | None, traceparent: str | None, inp: PoolInput | None = None
    ) -> Context:
        now = self.options.clock()
        rand = self.options.rng.random()
        cmd = inp.cmd if isinstance(inp, CommandInput) else None
        # Drawn here, never taken from the wire: only the holder of the grant's reply knows it.
        lease_id = secrets.token_urlsafe(LEASE_ID_BYTES) if isinstance(cmd, LeaseCmd) and cmd.lease_id is None else None
        if not needs_plan:
            return Context(now=now, rand=rand, command_id=command_id, traceparent=traceparent, new_lease_id=lease_id)
        snapshot, problem = self.snapshot_for(pool)
        spec = self._spec_for_plan(pool, cmd)
        engine = self.lifecycle.registry.get(pool).engine
        # A reload is checked while the old engine still runs: the port it holds is the pool's own.
        own_port = engine.port if engine is not None else None
        host = await asyncio.to_thread(_host_facts, spec, problem, own_port)
        return Context(now=now, rand=rand, command_id=command_id, traceparent=traceparent, snapshot=snapshot, host=host)

    def _spec_for_plan(self, pool: str, cmd: PoolCommand | None = None) -> EngineSpec:
        """The spec whose binary and files preflight checks: the one ``cmd`` will run (a reload's
        new model, say), not the one running now."""
        model = self.lifecycle.pool(pool)
        current = model.pending_spec or model.spec
        if cmd is None:
            return current
        try:
            return requested_spec(model.definition, current, cmd)
        except BadCommand:
            return current  # the step refuses it with bad_request; nothing is placed

    def snapshot_for(self, pool: str) -> tuple[GpuSnapshot | None, Problem | None]:
        """The GPU snapshot a placement of ``pool`` decides against.

        Simulated inventory: the budgets of the other pools' placements are taken off the free
        memory, so capacity planning sees what NVML would report once those engines load.
        Real inventory: the memory this pool's own running engine holds is given back, so a
        reload (placed while the old engine still runs) is not refused for the old engine's sake.
        """
        try:
            snapshot = self.gpu_source()
        except PoolManagerError as exc:
            return None, Problem(code=exc.code, message=exc.message)
        taken: dict[str, int] = {}
        if snapshot.simulated:
            listed = {p.pid for gpu in snapshot.gpus for p in gpu.processes}
            # Straight from the state values: one registry Entry per pool, built and sorted for
            # every placement, made a thousand preloads quadratic (seconds of the loop).
            for other, model in self.lifecycle.pools.items():
                value = model.value
                placement = value.placement
                if other == pool or placement is None:
                    continue
                if value.engine is not None and value.engine.pid in listed:
                    # The simulated driver already takes what this engine holds off free memory.
                    continue
                held = value.vram_held
                for uuid, budget in zip(placement.uuids, placement.budgets, strict=False):
                    # What the engine really holds once verified, not only what was planned.
                    taken[uuid] = taken.get(uuid, 0) + held.get(uuid, budget)
        else:
            engine = self.lifecycle.registry.get(pool).engine
            if engine is not None:
                members = set(group_members(engine.pgid)) | {engine.pid}
                for gpu in snapshot.gpus:
                    own = sum(p.used_memory for p in gpu.processes if p.pid in members)
                    if own:
                        taken[gpu.uuid] = -own
        return (_adjusted(snapshot, taken) if taken else snapshot), None

    def engine_env(self, placement: Placement) -> dict[str, str]:
        return self._engine_env(placement) if self._engine_env is not None else {}

    async def check_gpus(self, effect: VerifyGpus, alive: Callable[[], bool]) -> GpuChecked | None:
        if self.gpu_reader is None:
            return None
        return await check_engine(effect, self.gpu_reader, alive=alive)

    async def append_events(self, pool: str, events: Sequence[Event]) -> None:
        await self.sink.append(pool, events)

    async def wait_state(self, pool: str, states: frozenset[str]) -> str:
        """Wait until ``pool`` is in one of ``states``; returns the state (bound it with a timeout)."""
        state = str(self.lifecycle.state(pool))
        if state in states:
            return state
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._state_waiters.append((pool, states, fut))
        return await fut

    def after_step(self, pool: str, outcome: Outcome) -> None:
        if self._state_waiters:
            state = str(self.lifecycle.state(pool))
            for waiter in [w for w in self._state_waiters if w[0] == pool and (state in w[1] or w[2].done())]:
                self._state_waiters.remove(waiter)
                if not waiter[2].done():
                    waiter[2].set_result(state)
        for listener in self.listeners:
            try:
                listener(pool, outcome)
            except Exception:
                log.exception("listener failed for pool %s", pool)

    def after_probe(self, pool: str, report: HealthReport) -> None:
        for listener in self.probe_listeners:
            try:
                listener(pool, report)
            except Exception:
                log.exception("probe listener failed for pool %s", pool)

    def log_path(self, pool: str) -> Path:
        return self.run_dir / "logs" / f"{pool}.log"

    # --- shutdown ------------------------------------------------------------------------------

    async def close(self, *, stop_engines: bool = True) -> None:
        """Stop every actor and (by default) every engine; waits for the processes to be reaped."""
        await asyncio.gather(*(a.close(stop_engines=stop_engines) for a in self.actors.values()))


def mark_unhealthy(snapshot: GpuSnapshot, unhealthy: dict[str, str]) -> GpuSnapshot:
    """``snapshot`` with the faulted devices marked ``healthy=False`` (placement avoids them)."""
    if not unhealthy or not any(g.uuid in unhealthy for g in snapshot.gpus):
        return snapshot
    gpus = [msgspec.structs.replace(g, healthy=False, fault=unhealthy[g.uuid]) if g.uuid in unhealthy else g
            for g in snapshot.gpus]  # fmt: skip
    return msgspec.structs.replace(snapshot, gpus=gpus)


def _adjusted(snapshot: GpuSnapshot, taken: dict[str, int]) -> GpuSnapshot:
    """``snapshot`` with ``taken[uuid]`` bytes moved from free to used (negative: given back)."""
    gpus = []
    for gpu in snapshot.gpus:
        migs = [
            msgspec.structs.replace(m, memory_free=min(m.memory_total, max(0, m.memory_free - taken.get(m.uuid, 0))))
            for m in gpu.mig_instances
        ]
        delta = taken.get(gpu.uuid, 0) + sum(taken.get(m.uuid, 0) for m in gpu.mig_instances)
        free = min(gpu.memory_total, max(0, gpu.memory_free - delta))
        used = max(0, gpu.memory_used + (gpu.memory_free - free))
        gpus.append(msgspec.structs.replace(gpu, memory_free=free, memory_used=used, mig_instances=migs))
    return msgspec.structs.replace(snapshot, gpus=gpus)


def _host_facts(spec: EngineSpec, gpu_problem: Problem | None, own_port: int | None = None) -> object:
    path = model_path(spec)
    files = [path] if path else []
    ports = [spec.port] if spec.port is not None and spec.port != own_port else []
    facts = gather_host_facts(
        executables=[spec.argv[0]] if spec.argv else [],
        files=files,
        hash_files=files if spec.model_digest else [],
        ports=ports,
        host=spec.host,
        gpu_problem=gpu_problem,
    )
    if own_port is not None and spec.port == own_port:
        facts = dataclasses.replace(facts, free_ports=facts.free_ports | {own_port})
    return facts
