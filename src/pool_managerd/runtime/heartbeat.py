"""The node heartbeat: every ``heartbeat_s``, a ``node_heartbeat`` event with the GPU summary and
how many pools are in each state (and the event backlog into metrics)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from pool_managerd.adapters.eventlog.publisher import EventPublisher
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import EventBody, GpuSnapshot, NodeHeartbeat
from pool_managerd.runtime.metrics import Metrics
from pool_managerd.runtime.pools import PoolRuntime

log = logging.getLogger(__name__)


async def heartbeat(
    *,
    period_s: float,
    metrics: Metrics,
    publisher: EventPublisher,
    runtime: PoolRuntime,
    gpu_source: Callable[[], GpuSnapshot],
    publish_node: Callable[[EventBody], Coroutine[Any, Any, None]],
) -> None:
    """Beat until cancelled; a GPU read that fails skips that beat's event, not the next."""
    while True:
        try:
            metrics.backlog.set(publisher.backlog)
            snap = gpu_source()
            states: dict[str, int] = {}
            # Straight from the state values: iterating the registry builds and sorts an Entry
            # per pool (tens of milliseconds of the loop at 1,000 pools, every beat).
            for model in runtime.lifecycle.pools.values():
                state = str(model.value.state)
                states[state] = states.get(state, 0) + 1
            await publish_node(
                NodeHeartbeat(
                    gpus=len(snap.gpus),
                    memory_total=sum(g.memory_total for g in snap.gpus),
                    memory_free=sum(g.memory_free for g in snap.gpus),
                    simulated=snap.simulated,
                    states=states,
                    period_s=period_s,
                )
            )
        except PoolManagerError as exc:
            log.warning("heartbeat without GPU summary: %s", exc)
        await asyncio.sleep(period_s)
