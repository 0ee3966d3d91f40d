"""Recovery at start-up: rebuild each pool from its events, then reconcile with the processes the
spawn record names.

* An engine the log names that is alive (same pid, same start time, same group) is adopted:
  pid, port and placement are kept and an ``engine_adopted`` event says so.
* One that is dead becomes an ``engine_exited`` and normal supervision takes over.
* A pool left ``preloading`` with no engine (the daemon died between the transition and the
  spawn) counts as a failed spawn and is retried after a backoff.
* Recorded processes that no pool claims are stopped by process group (``orphan_reaped``).
* Pools the log knows but the configuration no longer lists are drained (if serving) or stopped,
  then forgotten once ``unready``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from pool_managerd.adapters.process import AdoptedProcess, SpawnEntry, SpawnRecord, kill_leftovers, stop_group
from pool_managerd.contract.messages import (
    EngineInfo,
    EngineSpec,
    Event,
    EventBody,
    OrphanReaped,
)
from pool_managerd.core.definitions import PoolDefinition
from pool_managerd.core.fold import Fold
from pool_managerd.core.inputs import (
    ClaimInput,
    EngineAdoptedInput,
    EngineExitedInput,
    RemoveInput,
    RestoreInput,
    SpawnFailed,
)
from pool_managerd.core.state import PoolValue, initial
from pool_managerd.runtime.actor import PoolActor
from pool_managerd.runtime.pools import PoolRuntime

log = logging.getLogger(__name__)

EventReader = Callable[[str], Awaitable[list[Event]]]


@dataclass(slots=True)
class RecoveryReport:
    """What recovery did, for the log, the tests and the operator."""

    restored: dict[str, str] = field(default_factory=dict)
    adopted: dict[str, int] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)
    respawned: list[str] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    taken_over: dict[str, str] = field(default_factory=dict)
    """Pools claimed from another node, with the state they were in there."""


async def recover(
    runtime: PoolRuntime,
    read_events: EventReader,
    *,
    known_pools: list[str],
    publish_node: Callable[[EventBody], Awaitable[None]],
    orphan_grace_s: float = 5.0,
    removed_drain_s: float = 30.0,
    claims: Mapping[str, ClaimInput] | None = None,
) -> RecoveryReport:
    """Restore every registered pool from its events and reconcile with the spawn record.

    ``known_pools`` are pools that have events but are not configured any more. ``claims``: the
    ownership lease this node won for each pool, recorded right after the pool is restored.
    """
    report = RecoveryReport()
    record_entries = SpawnRecord.load(runtime.spawn_record.path)
    by_pid = {e.pid: e for e in record_entries}
    claimed: set[int] = set()

    for pool, actor in list(runtime.actors.items()):
        events = await read_events(pool)
        claim = (claims or {}).get(pool)
        claimed |= restore_pool(runtime, actor, events, claim, by_pid, report)

    for pool in known_pools:
        if pool in runtime.actors:
            continue
        events = await read_events(pool)
        fold = Fold()
        for event in events:
            fold.apply(event)
        view = fold.views.get(pool)
        if view is None or view.state == "unready":
            continue
        # A pool dropped from the configuration: a serving pool is drained (its lease holders
        # get until the deadline), anything else is stopped; the daemon forgets it once unready.
        spec = view.spec or EngineSpec(argv=["removed"])
        actor = runtime.add_pool(PoolDefinition(pool=pool, spec=spec))
        actor.submit(RestoreInput(view))
        claimed |= _reconcile(runtime, actor, view, fold.writer(pool), by_pid, report, adopt_only=True)
        # Decided inside the actor, after the restore and reconcile steps queued above: an engine
        # found dead has already moved the pool on by then.
        fut = actor.submit(RemoveInput(removed_drain_s), want_reply=True)
        if fut is not None:
            await fut
        report.removed.append(pool)

    dropped: list[int] = []
    for entry in record_entries:
        if entry.pid in claimed:
            continue
        if not entry.is_live():
            # The leader is gone (its pool reports engine_exited); children it left in its group
            # die now, since the group kill that normally follows an exit never ran.
            leftovers = await asyncio.to_thread(kill_leftovers, entry)
            log.info("spawn record entry pid %d (pool %s) is no longer running; dropped (killed %s)",
                     entry.pid, entry.pool, leftovers or "nothing")  # fmt: skip
            dropped.append(entry.pid)
            continue
        log.warning("reaping orphan engine pid %d (pool %s, pgid %d)", entry.pid, entry.pool, entry.pgid)
        await stop_group(entry.pgid, orphan_grace_s)
        report.orphans.append(entry.pid)
        await publish_node(OrphanReaped(pid=entry.pid, pgid=entry.pgid, pool=entry.pool))
        dropped.append(entry.pid)
    # Only what recovery dropped leaves the record: actors already run, and an engine a backoff
    # spawned meanwhile has its own entry.
    for pid in dropped:
        await asyncio.to_thread(runtime.spawn_record.remove, pid)  # two fsyncs each: off the loop
    return report


def restore_pool(
    runtime: PoolRuntime,
    actor: PoolActor,
    events: list[Event],
    claim: ClaimInput | None,
    by_pid: dict[int, SpawnEntry],
    report: RecoveryReport,
) -> set[int]:
    """Restore one registered pool from its events, record its claim, and reconcile it with the
    engines on this host; returns the pids it adopted.

    A pool claimed from another node is not reconciled: the engine its log names runs on that
    node (a pid there means nothing here), so it is neither adopted nor reported exited; the
    claim itself records that this node starts with none."""
    view = None
    writer = None
    if events:
        # Folded from the pool's definition: the value is then the one the live pool evolved.
        fold = Fold(start=_from_definition(runtime.lifecycle.pool(actor.pool).definition))
        for event in events:
            fold.apply(event)
        report.violations += [v.message for v in fold.violations]
        view = fold.views.get(actor.pool)
        writer = fold.writer(actor.pool)
    if view is not None:
        actor.submit(RestoreInput(view))
        report.restored[actor.pool] = view.state
    if claim is not None:
        if claim.previous_node is None and writer is not None:
            # A log from before leases: its last writer is whom the pool is taken from.
            claim = dataclasses.replace(claim, previous_node=writer)
        actor.submit(claim)
        if claim.previous_node not in (None, runtime.node):
            if view is not None:
                report.taken_over[actor.pool] = view.state
            return set()
    if view is None:
        return set()
    return _reconcile(runtime, actor, view, writer, by_pid, report)


def _from_definition(definition: PoolDefinition) -> Callable[[str], PoolValue]:
    def start(pool: str) -> PoolValue:
        return initial(pool, definition.spec, definition.device_mask, definition.split_policy)

    return start


def _reconcile(
    runtime: PoolRuntime,
    actor: PoolActor,
    view: PoolValue,
    writer: str | None,
    by_pid: dict[int, SpawnEntry],
    report: RecoveryReport,
    *,
    adopt_only: bool = False,
) -> set[int]:
    pool = view.pool
    engine = view.engine
    if engine is None:
        if view.state == "preloading" and not adopt_only:
            report.respawned.append(pool)
            actor.submit(SpawnFailed("engine lost across a daemon restart"))
        return set()
    entry = by_pid.get(engine.pid)
    if entry is None and writer == runtime.node:
        # The record lost it (or never got it: the daemon died right after the spawn event): the
        # log's facts still identify the process, and adoption checks it is alive and leads its
        # own group before taking it over. Only for engines this node started: a pid written by
        # another host means nothing here.
        entry = SpawnEntry(pool=pool, pid=engine.pid, pgid=engine.pgid, port=engine.port, host="127.0.0.1",
                           started_at=engine.started_at, argv=list(engine.argv), log_path=engine.log_path)  # fmt: skip
        if view.spec is not None:
            entry = dataclasses.replace(entry, host=view.spec.host)
    handle = None
    if entry is not None and entry.pool == pool:
        handle = AdoptedProcess.adopt(entry, record=runtime.spawn_record, on_exit=actor.on_engine_exit)
    if handle is None:
        report.exited[pool] = engine.pid
        pid = engine.pid
        actor.submit(EngineExitedInput(pid, None, None))
        return set()
    report.adopted[pool] = handle.pid
    if handle.pid not in by_pid:
        runtime.spawn_record.add(handle.entry())  # so the next restart finds it in the record
    info = EngineInfo(
        pid=handle.pid,
        pgid=handle.pgid,
        port=handle.port,
        started_at=handle.started_at,
        argv=list(handle.argv),
        log_path=str(handle.log_path) if handle.log_path else None,
    )
    actor.submit(EngineAdoptedInput(info))
    spec = view.spec
    actor.track(handle, spec.health_path if spec else "/health", spec.probe_interval_s if spec else 2.0,
                steady=view.state != "preloading")  # fmt: skip
    return {handle.pid}
