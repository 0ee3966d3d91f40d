"""The fleet as a reader sees it: every node of one deployment, from what NATS already holds.

Three sources, no node-to-node calls and no daemon asked for anything it does not publish anyway:

* **discovery**: ``$SRV.PING.pool-managerd`` — which daemons answer now, and their version;
* **the KV bucket** ``poold_pools``: every pool's snapshot, which names the node serving it;
* **the event stream**: each node's newest ``heartbeat`` (GPU summary, pools per state, its own
  beat period) and its newest node event (a ``daemon_stopping`` after the last beat means the
  daemon stopped on purpose).

A node is ``live`` when it answers discovery and its last beat is younger than
:data:`STALE_BEATS` of its own periods; ``stale`` when the beat is older (a paused or cut-off
host, or one whose NATS link is down); ``silent`` when its beat is fresh but it did not answer
discovery in time; ``stopped`` when its last word was ``daemon_stopping``. Used by
``pool-managerd ctl nodes``, ``ctl pools`` (no ``--node``), ``watch`` and ``fleet-demo`` (``pool_managerd.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from pool_managerd.adapters.event_log import SnapshotStore
from pool_managerd.cli.format import format_age, format_clock, table
from pool_managerd.client import NodeInfo, PoolClient
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import EVENT_DECODER, DaemonStopping, Event, NodeHeartbeat, PoolSnapshot
from pool_managerd.contract.subjects import ID_RE, KV_BUCKET, STREAM_NAME, Subjects
from pool_managerd.placement import format_bytes

__all__ = [
    "STALE_BEATS",
    "NodeView",
    "gather_nodes",
    "liveness",
    "node_record",
    "node_views",
    "read_heartbeats",
    "read_snapshots",
    "render_nodes",
]

STALE_BEATS = 3.0
"""A node whose newest heartbeat is older than this many of its own beat periods is ``stale``."""

_DEFAULT_PERIOD_S = 10.0
NODES_HEADERS = ["NODE", "STATUS", "VERSION", "HEARTBEAT", "GPUS", "VRAM FREE", "POOLS", "STATES"]


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the fleet views show it (see the module docstring for the sources)."""

    node: str
    answering: bool = False
    version: str | None = None
    beat: Event | None = None
    last_node_event: Event | None = None
    pools: tuple[str, ...] = ()
    states: Mapping[str, int] = field(default_factory=dict)

    @property
    def period_s(self) -> float:
        """The node's own heartbeat period (the daemon default when its beat does not say)."""
        body = self.beat.body if self.beat is not None else None
        if isinstance(body, NodeHeartbeat) and body.period_s:
            return float(body.period_s)
        return _DEFAULT_PERIOD_S


def liveness(view: NodeView, now: float) -> str:
    """``live``, ``stale``, ``silent`` or ``stopped`` (pure: ``now`` is the reader's clock)."""
    last = view.last_node_event
    if (
        last is not None
        and isinstance(last.body, DaemonStopping)
        and (view.beat is None or last.ts >= view.beat.ts)
        and not view.answering
    ):
        return "stopped"
    if view.beat is None or now - view.beat.ts > STALE_BEATS * view.period_s:
        return "stale"
    return "live" if view.answering else "silent"


def node_views(
    found: Iterable[NodeInfo],
    snapshots: Mapping[str, PoolSnapshot],
    beats: Mapping[str, Event],
    last_node_events: Mapping[str, Event] | None = None,
) -> list[NodeView]:
    """Join the three sources into one view per node, sorted by node id (pure)."""
    info = {i.node: i for i in found if i.node}
    pools: dict[str, list[str]] = {}
    states: dict[str, dict[str, int]] = {}
    for snap in snapshots.values():
        if not snap.node:
            continue
        pools.setdefault(snap.node, []).append(snap.pool)
        counts = states.setdefault(snap.node, {})
        counts[snap.state] = counts.get(snap.state, 0) + 1
    last = last_node_events or {}
    names = set(info) | set(beats) | set(pools)
    return [
        NodeView(
            node=name,
            answering=name in info,
            version=info[name].version if name in info else None,
            beat=beats.get(name),
            last_node_event=last.get(name),
            pools=tuple(sorted(pools.get(name, ()))),
            states=dict(sorted(states.get(name, {}).items())),
        )
        for name in sorted(names)
    ]


def node_record(view: NodeView, now: float) -> dict[str, object]:
    """One node as plain data (``ctl nodes --json``); every field written, ``null`` included."""
    body = view.beat.body if view.beat is not None else None
    beat = body if isinstance(body, NodeHeartbeat) else None
    return {
        "node": view.node,
        "status": liveness(view, now),
        "version": view.version,
        "heartbeat_age_s": round(now - view.beat.ts, 3) if view.beat is not None else None,
        "heartbeat_period_s": view.period_s,
        "gpus": beat.gpus if beat else None,
        "memory_total": beat.memory_total if beat else None,
        "memory_free": beat.memory_free if beat else None,
        "simulated": beat.simulated if beat else None,
        "pools": list(view.pools),
        "states": dict(view.states),
    }


def _pools_cell(pools: tuple[str, ...], width: int = 40) -> str:
    if not pools:
        return "-"
    text = ",".join(pools)
    return text if len(text) <= width else f"{len(pools)} pools: " + text[: width - 12] + "…"


def render_nodes(views: Iterable[NodeView], now: float, *, title: str = "pool-managerd fleet") -> str:
    """The nodes as a text table (pure): id, liveness, version, heartbeat age, GPUs, pools."""
    views = list(views)
    live = sum(1 for v in views if liveness(v, now) == "live")
    lines = [f"{title}: {len(views)} node(s), {live} live, at {format_clock(now)}"]
    if not views:
        return "\n".join([*lines, "(no nodes: no daemon answered and the stream holds no heartbeat)"])
    rows = [NODES_HEADERS]
    simulated = False
    for view in views:
        body = view.beat.body if view.beat is not None else None
        beat_age = format_age(now - view.beat.ts) if view.beat is not None else "never"
        if isinstance(body, NodeHeartbeat):
            gpus = f"{body.gpus}{'*' if body.simulated else ''}"
            simulated = simulated or body.simulated
            vram = f"{format_bytes(body.memory_free)} / {format_bytes(body.memory_total)}"
        else:
            gpus, vram = "-", "-"
        counts = ", ".join(f"{state} {n}" for state, n in view.states.items()) or "-"
        rows.append(
            [view.node, liveness(view, now), view.version or "-", beat_age, gpus, vram, _pools_cell(view.pools), counts]
        )
    lines += table(rows, right=frozenset({3}))
    if simulated:
        lines.append("* simulated GPUs")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading the sources
# --------------------------------------------------------------------------------------------


async def read_snapshots(nc: NATS, bucket: str = KV_BUCKET, timeout: float = 5.0) -> dict[str, PoolSnapshot]:
    """Every pool's current snapshot from the bucket (empty when it does not exist yet)."""
    try:
        store = SnapshotStore(await asyncio.wait_for(nc.jetstream().key_value(bucket), timeout))
    except nats.js.errors.BucketNotFoundError:
        return {}
    found: dict[str, PoolSnapshot] = {}

    def on_snapshot(pool: str, snapshot: PoolSnapshot | None) -> None:
        if snapshot is None:
            found.pop(pool, None)
        else:
            found[pool] = snapshot

    try:
        await store.watch(on_snapshot)
        await asyncio.wait_for(store.wait_synced(), timeout)
    finally:
        with contextlib.suppress(Exception):
            await store.close()
    return dict(found)


async def read_heartbeats(
    nc: NATS, subjects: Subjects, *, stream: str = STREAM_NAME, timeout: float = 5.0
) -> tuple[dict[str, Event], dict[str, Event]]:
    """``(newest heartbeat, newest node event)`` per node id, from the stream.

    The nodes are the heartbeat subjects the stream holds (one ``STREAM.INFO`` with a subject
    filter), so a node that is down now still shows, with its last word."""
    js = nc.jetstream()
    filter_subject = f"{subjects.prefix}.node.*.evt.heartbeat"
    try:
        info = await asyncio.wait_for(js.stream_info(stream, subjects_filter=filter_subject), timeout)
    except nats.js.errors.NotFoundError:
        return {}, {}
    beats: dict[str, Event] = {}
    last: dict[str, Event] = {}
    for subject in sorted((info.state.subjects or {}) if info.state else {}):
        node = subject.split(".")[-3]
        if not ID_RE.fullmatch(node):
            continue  # not a subject a daemon writes: nothing to show for it
        for target, filter_for in ((beats, subject), (last, subjects.node_events(node))):
            with contextlib.suppress(nats.js.errors.NotFoundError, PoolManagerError, msgspec.MsgspecError):
                raw = await asyncio.wait_for(js.get_last_msg(stream, filter_for), timeout)
                event = EVENT_DECODER.decode(raw.data or b"")
                target[node] = event
    return beats, last


async def gather_nodes(
    nc: NATS, subjects: Subjects, *, bucket: str = KV_BUCKET, timeout: float = 5.0, settle_s: float = 0.2
) -> tuple[list[NodeView], dict[str, PoolSnapshot]]:
    """Every node and every pool snapshot of the deployment, from discovery, the bucket and the stream."""
    client = PoolClient(nc, prefix=subjects.prefix, timeout=timeout)
    try:
        found = await client.discover(timeout=min(timeout, 2.0), settle_s=settle_s)
    except nats.errors.Error:
        found = []
    snapshots = await read_snapshots(nc, bucket, timeout)
    beats, last = await read_heartbeats(nc, subjects, timeout=timeout)
    return node_views(found, snapshots, beats, last), snapshots
