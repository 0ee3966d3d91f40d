"""Start-up before the daemon serves: the storage it writes, the node event sequence, and the
recovery of its pools from their events.

Each step is a function of the daemon (or of just what it reads). A server that cannot hold what
the daemon needs is refused before any pool exists: :func:`close_before_serving` leaves nothing
to shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors

from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.adapters.eventlog.stream import ensure_stream
from pool_managerd.adapters.nats_internals import server_info
from pool_managerd.adapters.replication import (
    REPLICA_ERROR_CODES,
    ReplicasUnavailable,
    check_clustered,
    replicas_refused,
    stream_replicas,
)
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import Event, encode
from pool_managerd.contract.subjects import STREAM_NAME, Subjects
from pool_managerd.core.inputs import ClaimInput
from pool_managerd.core.log_integrity import scan_pool
from pool_managerd.core.replies import rebuild_replies
from pool_managerd.runtime import quarantine
from pool_managerd.runtime.connection import safe_url
from pool_managerd.runtime.recovery import recover
from pool_managerd.runtime.sink import NodeEvents

if TYPE_CHECKING:
    from pool_managerd.runtime.daemon import Daemon

log = logging.getLogger(__name__)


async def close_before_serving(daemon: Daemon) -> None:
    """Refuse to start: close the connection and the embedded server; the daemon is closed."""
    with contextlib.suppress(Exception):
        if daemon.nc is not None:
            await daemon.nc.close()
    if daemon.embedded is not None:
        daemon.embedded.stop()
    daemon.closed.set()


async def ensure_storage(daemon: Daemon, js: nats.js.JetStreamContext) -> SnapshotStore:
    """The event stream and the snapshot bucket, each with ``nats.replicas`` copies.

    A count the server cannot hold is a setup error (exit 2), found before any pool exists.
    """
    replicas = stream_replicas(daemon.config)
    assert daemon.nc is not None
    try:
        check_clustered(server_info(daemon.nc), replicas, url=safe_url(daemon.nc) or "the server")
        await ensure_stream(js, daemon.subjects, daemon.config.nats.event_max_age_s, replicas)
        return await SnapshotStore.open(js, replicas=replicas)
    except ReplicasUnavailable as exc:
        daemon.incompatible = exc
        await close_before_serving(daemon)
        raise
    except nats.js.errors.APIError as exc:
        if exc.err_code not in REPLICA_ERROR_CODES:
            raise
        daemon.incompatible = replicas_refused(replicas, "the event stream and bucket", exc.description or str(exc))
        await close_before_serving(daemon)
        raise daemon.incompatible from None


async def continue_node_sequence(js: Any, subjects: Subjects, node_events: NodeEvents) -> None:
    """Node events continue their sequence across restarts: their Msg-Id must stay unique.

    Starting again at 1 would have the server drop the heartbeats as duplicates within its
    dedupe window (and other nodes judge this one dead), so a sequence that cannot be read
    stops the start-up with the reason instead; a foreign last message is skipped over."""
    subject = subjects.node_events(node_events.node)
    for attempt in range(3):
        try:
            raw = await js.get_last_msg(STREAM_NAME, subject)
            break
        except nats.js.errors.NotFoundError:
            return  # this node never wrote an event: its sequence starts at 1
        except Exception as exc:
            if attempt == 2:
                raise PoolManagerError(
                    f"cannot read the last sequence of {subject} ({type(exc).__name__}: {exc}); "
                    "refusing to restart node events at 1"
                ) from None
            await asyncio.sleep(0.5)  # ok: a short retry of a read right after connecting
    try:
        node_events.seq = msgspec.json.decode(raw.data or b"{}", type=Event).seq
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        # A foreign message there must not keep the daemon from starting. Every node event
        # is one stream message, so the stream's last sequence is past any this node wrote:
        # continuing from it keeps every Msg-Id unique (the node's sequence shows a gap).
        info = await js.stream_info(STREAM_NAME)
        node_events.seq = max(info.state.last_seq, raw.seq or 0)
        log.warning("the last message on %s (stream sequence %s) is not an event (%s); node events continue "
                    "from %d", subject, raw.seq, exc, node_events.seq)  # fmt: skip


async def recover_pools(daemon: Daemon, claims: dict[str, ClaimInput]) -> None:
    """Rebuild every pool from its events and reconcile with the engines on this host."""
    assert daemon.nc is not None and daemon.runtime is not None and daemon.publisher is not None
    runtime, publisher = daemon.runtime, daemon.publisher
    logged = await pools_in_log(daemon.nc.jetstream(), daemon.subjects)
    candidates = list(runtime.actors) + [p for p in logged if p not in runtime.actors and p not in daemon.fenced
                                         and p not in daemon.standing_by]  # fmt: skip
    events: dict[str, list[Event]] = {}
    # One pass over the pool events for every pool, not a consumer per pool (~9 ms each, one
    # after another: 9 s for a thousand pools). Messages are judged one by one: a foreign one
    # quarantines its own pool and keeps nothing else from starting.
    entries = await quarantine.read_pool_entries(daemon.nc, daemon.subjects, candidates)
    for pool in candidates:
        scan = scan_pool(pool, entries[pool], daemon.subjects.prefix)
        events[pool] = [event for _, event in scan.events]
        corrupt = scan.quarantine()
        if corrupt is not None:
            log.error("pool %s: quarantined (log_corrupt): %s", pool, corrupt.reason)
            if pool in runtime.actors:
                runtime.quarantine(pool, corrupt)
        if pool in runtime.actors:
            # Writes continue from exactly what was recovered (foreign messages included: the
            # server's fence counts them): if another daemon appended since, the first write
            # here is refused and this daemon stops acting on the pool.
            publisher.assume(pool, scan.last_stream_seq)

    async def read(pool: str) -> list[Event]:
        return events.get(pool, [])

    removed = [p for p in logged if p not in runtime.actors and p in events and _last_writer(events[p]) == daemon.node]
    for pool, claim in list(claims.items()):
        claims[pool] = await daemon.claims.above_logged_epochs(pool, claim, events.get(pool, []))
    report = await recover(runtime, read, known_pools=removed, publish_node=daemon.publish_node, claims=claims)
    for pool, state in report.taken_over.items():
        daemon.tasks.start(daemon.claims.resume(pool, claims[pool].epoch, state), f"resume-{pool}")
    # Exactly once across restarts: the replies of the commands still in the cache window are
    # rebuilt from the log, so a client retrying across the restart gets its first answer.
    since = daemon.cache.clock() - daemon.cache.ttl_s
    for pool in runtime.actors:
        for old in rebuild_replies(events.get(pool, []), since=since):
            daemon.cache.seed(pool, old.command_id, old.fingerprint, encode(old.reply), old.at)
    for pool in report.removed:
        daemon.removing.add(pool)
        daemon.tasks.start(_forget(daemon, pool), f"forget-{pool}")
    daemon.recovery = report
    if report.violations:
        log.warning("event log violations found during recovery: %s", "; ".join(report.violations[:5]))
    log.info(
        "recovered %d pool(s); adopted %s; exited %s; orphans reaped %s; removed %s",
        len(report.restored), report.adopted, report.exited, report.orphans, report.removed,
    )  # fmt: skip


async def pools_in_log(js: nats.js.JetStreamContext, subjects: Subjects) -> list[str]:
    """Every pool with a subject in the event stream, sorted."""
    info = await js.stream_info(STREAM_NAME, subjects_filter=subjects.all_pool_events)
    pools: set[str] = set()
    for subject in info.state.subjects or {}:
        with contextlib.suppress(PoolManagerError):
            pools.add(subjects.parse_pool_event(subject)[0])
    return sorted(pools)


async def _forget(daemon: Daemon, pool: str) -> None:
    """A pool removed from the configuration: once recovery's drain or stop has made it
    unready, stop serving it entirely (its snapshot goes, commands get unknown_pool)."""
    runtime = daemon.runtime
    assert runtime is not None
    await runtime.wait_state(pool, frozenset({"unready"}))
    await runtime.remove_pool(pool)
    if daemon.snapshots is not None:
        with contextlib.suppress(Exception):
            await daemon.snapshots.delete(pool)
    daemon.removing.discard(pool)
    log.info("pool %s removed from the configuration: drained, stopped and forgotten", pool)


def _last_writer(events: list[Event]) -> str | None:
    return events[-1].node if events else None
