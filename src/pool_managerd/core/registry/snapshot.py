"""Registry entries as wire snapshots (the ``status`` reply and the KV value)."""

from __future__ import annotations

from pool_managerd.contract.messages import LeaseInfo, PoolSnapshot
from pool_managerd.core.registry.entry import Entry


def to_snapshot(entry: Entry) -> PoolSnapshot:
    """The wire view of one entry."""
    return PoolSnapshot(
        pool=entry.pool,
        node=entry.node,
        state=entry.state,
        seq=entry.seq,
        health_live=entry.health.live,
        health_ready=entry.health.ready,
        draining=entry.draining,
        last_error=entry.last_error,
        last_heartbeat=entry.last_heartbeat,
        version=entry.version,
        engine_version=entry.engine_version,
        engine_digest=entry.engine_digest,
        model=entry.model,
        device_mask=list(entry.device_mask),
        slots_total=entry.slots_total,
        slots_free=entry.slots_free,
        active_leases=entry.active_leases,
        leases=[
            LeaseInfo(lease_id=lease.lease_id, expires_at=lease.expires_at, holder=lease.holder)
            for lease in sorted(entry.leases.values(), key=lambda item: item.lease_id)
        ],
        perf_hints=dict(entry.perf_hints),
        placement=entry.placement,
        engine=entry.engine,
        restarts=entry.restarts,
        crashes=entry.crashes,
        simulated=entry.simulated,
        updated_at=entry.updated_at,
        last_event=entry.last_event,
        vram_held=dict(entry.vram_held),
    )
