"""GPU faults as facts for the pools: the node's device health and what a fault does to pools.

A watcher thread (:mod:`pool_managerd.adapters.gpu_faults`) reports a fault; :class:`GpuWatch`
takes it on the loop, classifies it (:func:`pool_managerd.core.gpu_faults.classify`), records a
``gpu_fault`` node event naming the device, the Xid, the class and the pools placed on the
device, marks the device unhealthy where the class says so (placement avoids it from then on),
and drains (with a deadline) or stops exactly those pools through their ordinary commands, so
each pool's own events say what happened to it and why. ``gpu_cleared`` undoes the mark. The
marks are rebuilt from those node events when the daemon restarts (:meth:`GpuHealth.apply`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from pool_managerd.adapters.gpu_faults import GpuFaultFact
from pool_managerd.contract.messages import DrainCmd, EventBody, GpuCleared, GpuFault, PoolCommand, StopCmd
from pool_managerd.core.gpu_faults import DEFAULT_DRAIN_DEADLINE_S, affected, classify
from pool_managerd.runtime.pools import PoolRuntime

log = logging.getLogger(__name__)

MAX_QUEUED_FAULTS = 1024
"""Faults waiting for the loop at most; past it they are dropped (and logged): a storm of Xids
from one device says no more than its first few."""

_SERVING = frozenset({"preloading", "ready", "draining"})


class GpuHealth:
    """Which devices of this node are unhealthy, and why (UUID → description)."""

    def __init__(self) -> None:
        self.unhealthy: dict[str, str] = {}

    def apply(self, body: EventBody) -> None:
        """Fold one node event (``gpu_fault``, ``gpu_cleared``; others change nothing)."""
        if isinstance(body, GpuFault) and body.unhealthy:
            self.unhealthy[body.uuid] = body.description
        elif isinstance(body, GpuCleared):
            self.unhealthy.pop(body.uuid, None)

    def snapshot(self) -> dict[str, str]:
        return dict(self.unhealthy)


Publish = Callable[[EventBody], Awaitable[None]]


class GpuWatch:
    """Turns fault facts into node events, device marks and pool commands, one at a time."""

    def __init__(
        self,
        runtime: PoolRuntime,
        publish: Publish,
        health: GpuHealth,
        *,
        simulated: bool,
        drain_deadline_s: float = DEFAULT_DRAIN_DEADLINE_S,
    ) -> None:
        self.runtime = runtime
        self.publish = publish
        self.health = health
        self.simulated = simulated
        self.drain_deadline_s = drain_deadline_s
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GpuFaultFact] = asyncio.Queue(MAX_QUEUED_FAULTS)
        self.dropped = 0
        self.handled = 0

    def report(self, fact: GpuFaultFact) -> None:
        """Called from a watcher thread: hand the fact to the loop."""
        self.loop.call_soon_threadsafe(self._enqueue, fact)

    def _enqueue(self, fact: GpuFaultFact) -> None:
        try:
            self.queue.put_nowait(fact)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("GPU fault on %s dropped: %d faults already waiting", fact.uuid, MAX_QUEUED_FAULTS)

    async def run(self) -> None:
        while True:
            fact = await self.queue.get()
            try:
                await self.handle(fact)
            except Exception:
                log.exception("GPU fault on %s not handled", fact.uuid)
            self.handled += 1

    def _placements(self, parents: dict[str, str]) -> dict[str, list[str]]:
        """Pool → the devices its engine runs on, MIG instances' parent GPUs included."""
        out: dict[str, list[str]] = {}
        for entry in self.runtime.lifecycle.registry:
            if entry.placement is None or entry.state not in _SERVING:
                continue
            uuids = list(entry.placement.uuids)
            out[entry.pool] = uuids + [parents[u] for u in uuids if u in parents]
        return out

    async def handle(self, fact: GpuFaultFact) -> GpuFault | None:
        """Record the fault, mark the device, and drain or stop the pools on it. A fault about a
        GPU this node does not have is logged and dropped (None)."""
        try:
            snapshot = self.runtime.gpu_source()
        except Exception as exc:
            # The device may be what broke the read: act on the fact all the same.
            log.warning("GPU fault on %s while the GPUs cannot be read (%s)", fact.uuid, exc)
            known, parents = {fact.uuid}, {}
        else:
            known = {g.uuid for g in snapshot.gpus}
            parents = {m.uuid: g.uuid for g in snapshot.gpus for m in g.mig_instances}
        if fact.uuid not in known:
            log.warning("GPU fault on %s ignored: no such GPU on this node", fact.uuid)
            return None
        decision = classify(fact.kind, fact.xid)
        pools = affected(self._placements(parents), fact.uuid)
        body = GpuFault(uuid=fact.uuid, kind=fact.kind, xid=fact.xid, fault_class=decision.fault_class,
                        action=decision.action, unhealthy=decision.unhealthy, description=decision.description,
                        pools=pools if decision.action != "none" else [], simulated=self.simulated)  # fmt: skip
        log.warning("GPU fault on %s: %s (%s); %s %s", fact.uuid, decision.description, decision.fault_class,
                    decision.action, ", ".join(pools) or "no pool")  # fmt: skip
        self.health.apply(body)
        await self.publish(body)
        if decision.action == "none":
            return body
        stamp = int((fact.at or time.time()) * 1000)
        for pool in body.pools:
            command_id = f"gpu-fault-{stamp}-{pool}"
            reason = f"GPU {fact.uuid}: {decision.description}"
            cmd: PoolCommand
            if decision.action == "stop":
                cmd = StopCmd(command_id=command_id, grace_s=0.0)
            else:
                cmd = DrainCmd(command_id=command_id, deadline_s=self.drain_deadline_s)
            try:
                reply = await self.runtime.command(pool, cmd)
            except Exception:
                log.exception("pool %s: %s after a GPU fault failed", pool, decision.action)
                continue
            log.warning("pool %s: %s (%s): %s", pool, decision.action, reason, type(reply).__name__)
        return body

    async def clear(self, uuid: str) -> bool:
        """An operator clears ``uuid``: False when it was not marked unhealthy."""
        fault = self.health.unhealthy.get(uuid)
        if fault is None:
            return False
        body = GpuCleared(uuid=uuid, fault=fault)
        self.health.apply(body)
        await self.publish(body)
        return True
