"""Graceful shutdown of the daemon, in order: stop taking commands, stop (or leave) the engines,
release the leases, write the last events and snapshots, then close the connection.

Every phase is bounded, and the log says how long each took. A daemon standing down from a
server below the floor writes nothing more and leaves its engines running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from pool_managerd.contract.messages import DaemonStopping, StopCmd
from pool_managerd.runtime.pools import PoolRuntime

if TYPE_CHECKING:
    from pool_managerd.runtime.daemon import Daemon

log = logging.getLogger(__name__)

SHUTDOWN_POOLS_S = 30.0
"""How long shutdown waits for the pools' stops (beyond the longest engine grace period)."""


class _Steps:
    """The shutdown's phases: each logged with the time since the start as it ends."""

    def __init__(self, first: str) -> None:
        self._phase = first
        self._t0 = time.monotonic()

    def next(self, name: str) -> None:
        log.info("shutdown: %s done after %.3f s; next: %s", self._phase, time.monotonic() - self._t0, name)
        self._phase = name


async def shut_down(daemon: Daemon, *, stop_engines: bool | None = None) -> None:
    """Graceful shutdown: stop taking commands, stop (or leave) engines, flush events.

    ``stop_engines`` None follows the configuration's ``on_shutdown``. A daemon already closed
    (stopped, or refused at start-up) is left as it is."""
    if daemon.closed.is_set():
        return
    daemon.stopping.set()
    stop = daemon.config.on_shutdown == "stop" if stop_engines is None else stop_engines
    # Standing down from a server below the floor: write nothing more, leave the engines.
    writable = daemon.incompatible is None
    stop = stop and writable
    step = _Steps("commands").next

    if daemon.commands is not None:
        await daemon.commands.stop()
    await daemon.gpus.stop_watching()
    for sub in (daemon.health_sub, daemon.commands.unclaimed_sub if daemon.commands is not None else None):
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    if daemon.snapshots is not None:
        step("kv watch")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(daemon.snapshots.stop_watch(), 5.0)
    if stop:
        step("stopping pools")
        grace = max((d.spec.stop_grace_s for d in daemon.config.definitions()), default=0.0)
        try:
            if daemon.runtime is not None:
                await asyncio.wait_for(stop_pools(daemon.runtime, daemon.node), grace + SHUTDOWN_POOLS_S)
        except TimeoutError:
            log.error("shutdown: pools not stopped within %.0f s; closing the actors anyway",
                      grace + SHUTDOWN_POOLS_S)  # fmt: skip
        step("releasing leases")
        await daemon.claims.release_pools()
    if daemon.ownership is not None:
        # No more renewals: a lease not released (engines left running) lapses after its ttl.
        await daemon.ownership.close()
    if writable:
        await daemon.publish_node(DaemonStopping(reason="engines stopped" if stop else "engines left running"))
    if daemon.runtime is not None:
        step("closing actors")
        try:
            # Each engine stop is bounded by its grace and settle time; the whole phase too.
            await asyncio.wait_for(daemon.runtime.close(stop_engines=stop), SHUTDOWN_POOLS_S * 2)
        except TimeoutError:
            log.error("shutdown: actors not closed within %.0f s", SHUTDOWN_POOLS_S * 2)
        # The final snapshots say what the pools are now.
        for pool in daemon.runtime.actors:
            daemon.kv.mark_dirty(pool)
        if writable:
            step("final snapshots")
            await daemon.kv.drain(daemon.nc is not None and daemon.nc.is_connected)
    if daemon.publisher is not None:
        step("flushing events")
        if not writable and daemon.publisher.backlog:
            log.error("%d event(s) not written: the server cannot fence them", daemon.publisher.backlog)
        await daemon.publisher.close(grace_s=5.0 if writable else 0.0)
    if daemon.audit is not None:
        await daemon.audit.close()
    step("background tasks")
    await daemon.tasks.cancel_all(5.0)
    nc = daemon.nc
    if nc is not None and not nc.is_closed:
        step("closing the connection")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5.0)
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()
    step("done")
    daemon.metrics.close()
    daemon.gpus.close()
    if daemon.embedded is not None:
        daemon.embedded.stop()
    daemon.closed.set()


async def stop_pools(runtime: PoolRuntime, node: str) -> None:
    """Stop every running pool through the lifecycle, so the log and the snapshots say what
    is true once the daemon is gone: unready, no engine. Failed pools stay failed (an operator
    still has to acknowledge them). Commands queued before the signal are applied first."""
    stamp = f"{time.time():.6f}"
    waits = []
    for pool, actor in runtime.actors.items():
        if actor.fenced or runtime.lifecycle.state(pool) in ("unready", "failed"):
            continue
        cmd = StopCmd(command_id=f"shutdown-{node}-{stamp}")
        waits.append(runtime.command(pool, cmd))
    for result in await asyncio.gather(*waits, return_exceptions=True):
        if isinstance(result, BaseException):
            log.warning("pool not stopped cleanly at shutdown: %s", result)
