"""What every ``pool-managerd`` command prints the same way: exit codes, ages and clocks, event
lines, aligned tables, the pools table (``watch``, ``ctl pools``), and a quiet exit when the reader
of stdout goes away. Every command imports its formatting from here, never from another command;
nothing here connects or reads the clock (``now`` is an argument)."""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TextIO

import msgspec

from pool_managerd.contract.messages import (
    BackoffScheduled,
    CommandRejected,
    DaemonStarted,
    DaemonStopping,
    DrainForced,
    EngineAdopted,
    EngineExited,
    EngineSpawned,
    Event,
    GpuCleared,
    GpuFault,
    GpuVerified,
    HealthChanged,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LogCorruptAcknowledged,
    NodeHeartbeat,
    OrphanReaped,
    PoolClaimed,
    PoolFenced,
    PoolReleased,
    PoolSnapshot,
    PreloadRejected,
    ReloadRolledBack,
    RestartLimitReached,
    StateChanged,
)
from pool_managerd.placement import format_bytes

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

HEADERS = ["POOL", "NODE", "STATE", "PID", "PORT", "GPUS", "LEASES", "RESTARTS", "LAST EVENT", "AGE"]
"""The columns of :func:`render_table`."""

_LAST_EVENT_WIDTH = 48


def short_uuid(uuid: str) -> str:
    """``GPU-4090c0de-0000-...`` → ``GPU-4090c0de``; anything without a dash is kept."""
    head, sep, rest = uuid.partition("-")
    return f"{head}{sep}{rest[:8]}" if sep else uuid


def format_age(seconds: float) -> str:
    """A compact age: ``0.4s``, ``12s``, ``3m05s``, ``2h01m``, ``3d04h``."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def format_clock(ts: float) -> str:
    """Local wall-clock time with milliseconds: ``14:03:07.412``."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"


def event_detail(event: Event) -> str:
    """What happened, in a few words, without the event name (``preload unready → preloading``)."""
    b = event.body
    match b:
        case StateChanged():
            text = f"{b.trigger} {b.src} → {b.dst}"
            extra = [b.reason] if b.reason else []
            if b.delay_s is not None:
                extra.append(f"delay {b.delay_s:.2f}s")
            if b.exit_code is not None:
                extra.append(f"exit {b.exit_code}")
            if b.leases_left and not b.reason:
                extra.append(f"{b.leases_left} lease(s) left")
            if b.reload:
                extra.append("reload")
            return text + (f" ({'; '.join(extra)})" if extra else "")
        case PreloadRejected():
            return f"{b.code}: {b.message}"
        case CommandRejected():
            return f"{b.verb} {b.code}: {b.message}"
        case EngineSpawned():
            return f"pid {b.pid} port {b.port} attempt {b.attempt} CUDA_VISIBLE_DEVICES={b.cuda_visible_devices}"
        case EngineExited():
            how = f"signal {b.signal}" if b.signal is not None else f"exit {b.exit_code}"
            return (
                f"pid {b.pid} {how}"
                + (" (expected)" if b.expected else "")
                + (f" during {b.during}" if b.during else "")
            )
        case EngineAdopted():
            return f"pid {b.pid} port {b.port}"
        case BackoffScheduled():
            return f"attempt {b.attempt} in {b.delay_s:.2f}s: {b.reason}"
        case RestartLimitReached():
            return f"{b.restarts} restarts in {b.window_s:g}s: {b.reason}"
        case LeaseGranted():
            return f"{b.lease_id} active {b.active}" + (f" holder {b.holder}" if b.holder else "")
        case LeaseReleased() | LeaseExpired():
            return f"{b.lease_id} active {b.active}"
        case DrainForced():
            return f"{b.leases_left} lease(s) left at the {b.deadline_s:g}s deadline"
        case ReloadRolledBack():
            return b.reason
        case HealthChanged():
            text = f"live={str(b.live).lower()} ready={str(b.ready).lower()}"
            return text + (f" failures={b.consecutive_failures}" if b.consecutive_failures else "")
        case LogCorruptAcknowledged():
            return f"acknowledged foreign stream sequences {b.sequences}"
        case PoolFenced():
            return b.reason
        case PoolClaimed():
            was = f" from {b.previous_node} (epoch {b.previous_epoch}, {b.previous_state})" if b.previous_node else ""
            return f"{b.node} holds epoch {b.epoch}{was}"
        case PoolReleased():
            return f"{b.node} released epoch {b.epoch}"
        case OrphanReaped():
            return f"pid {b.pid} pgid {b.pgid}" + (f" pool {b.pool}" if b.pool else "")
        case DaemonStarted():
            return f"version {b.version} pools {','.join(b.pools) or '-'}" + (" simulated" if b.simulated else "")
        case DaemonStopping():
            return b.reason
        case GpuVerified():
            held = ", ".join(f"{short_uuid(u)} {format_bytes(n)}" for u, n in b.held.items()) or "nothing held"
            verdict = "ok" if b.ok else str(b.reason)
            return f"{verdict}: pid {b.pid} {held} after {b.elapsed_s:.2f}s" + ("" if b.ok else f" ({b.message})")
        case GpuFault():
            acted = f"; {b.action} {', '.join(b.pools)}" if b.pools else ""
            return (
                f"{short_uuid(b.uuid)} {b.description} ({b.fault_class}{', unhealthy' if b.unhealthy else ''}){acted}"
            )
        case GpuCleared():
            return f"{short_uuid(b.uuid)} cleared" + (f" (was: {b.fault})" if b.fault else "")
        case NodeHeartbeat():
            pools = ", ".join(f"{n} {state}" for state, n in sorted(b.states.items()))
            return f"{b.gpus} GPU(s), {format_bytes(b.memory_free)} free of {format_bytes(b.memory_total)}" + (
                f"; pools: {pools}" if pools else ""
            )
    raw = msgspec.to_builtins(b)
    return " ".join(f"{k}={v}" for k, v in raw.items() if k != "type")


def format_event(event: Event) -> str:
    """One readable line: time, pool (or node), event type, what happened."""
    who = event.pool or f"node:{event.node}"
    return f"{format_clock(event.ts)}  {who}  {event.type}  {event_detail(event)}"


def table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Left-aligned columns (``right`` ones right-aligned), two spaces apart, no trailing blanks."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


def silence(stream: TextIO) -> None:
    """The reader went away (``| head``): send the rest of ``stream`` to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


def _gpus(snap: PoolSnapshot) -> str:
    uuids = snap.placement.uuids if snap.placement is not None else snap.device_mask
    if not uuids:
        return "-"
    text = ",".join(short_uuid(u) for u in uuids)
    mask = snap.placement.mask if snap.placement is not None else []
    if mask and mask != uuids:
        text = f"{','.join(mask)}={text}"
    return text + ("*" if snap.simulated or (snap.placement is not None and snap.placement.simulated) else "")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _last_event(snap: PoolSnapshot, event: Event | None, now: float) -> tuple[str, str]:
    if event is not None and event.seq >= snap.seq:
        return _clip(f"{event.type} {event_detail(event)}", _LAST_EVENT_WIDTH), format_age(now - event.ts)
    if snap.last_event:
        return snap.last_event, format_age(now - snap.updated_at) if snap.updated_at else "-"
    return "-", "-"


def _node_cell(node: str | None, node_status: Mapping[str, str] | None) -> str:
    if not node:
        return "-"
    status = (node_status or {}).get(node)
    return node if status is None or status == "live" else f"{node} ({status})"


def render_table(
    snapshots: Mapping[str, PoolSnapshot],
    last_events: Mapping[str, Event],
    now: float,
    *,
    title: str = "pool-managerd",
    node_status: Mapping[str, str] | None = None,
    ignored: Collection[str] = (),
) -> str:
    """The pools as a text table, one row per pool sorted by id. Pure: ``now`` gives the ages.
    ``ignored`` pools (KV snapshots the event stream does not back) are named under the table.

    ``node_status`` (node → liveness, see ``pool_managerd.cli.fleet``) marks the node column of
    pools whose node is not ``live``: ``node-b (stale)``.

    ``last_events`` (pool → newest event seen) fills "last event"; a snapshot that knows a newer
    event than the one given shows the snapshot's event name and age instead. GPUs are shown as
    shortened UUIDs (``GPU-4090c0de``), prefixed by the mask when it differs, with ``*`` when the
    inventory is simulated.
    """
    lines = [f"{title}: {len(snapshots)} pool(s) at {format_clock(now)}"]
    note = []
    if ignored:
        names = ", ".join(sorted(ignored)[:10]) + (" ..." if len(ignored) > 10 else "")
        note = [f"ignored {len(ignored)} KV snapshot(s) that no event backs (forged?): {names}"]
    if not snapshots:
        return "\n".join([*lines, "(no pools)", *note])
    rows = [HEADERS]
    simulated = False
    for pool in sorted(snapshots):
        snap = snapshots[pool]
        engine = snap.engine
        last, age = _last_event(snap, last_events.get(pool), now)
        gpus = _gpus(snap)
        simulated = simulated or gpus.endswith("*")
        restarts = str(snap.restarts) + (f" ({snap.crashes} crash)" if snap.crashes == 1 else "")
        if snap.crashes > 1:
            restarts = f"{snap.restarts} ({snap.crashes} crashes)"
        rows.append(
            [
                snap.pool,
                _node_cell(snap.node, node_status),
                snap.state,
                str(engine.pid) if engine else "-",
                str(engine.port) if engine else "-",
                gpus,
                f"{snap.active_leases}/{snap.slots_total}",
                restarts,
                last,
                age,
            ]
        )
    lines += table(rows, right=frozenset({3, 4, 9}))
    if simulated:
        lines.append("* simulated GPUs")
    return "\n".join(lines + note)
