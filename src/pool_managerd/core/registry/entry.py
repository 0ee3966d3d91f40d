"""One pool's registry entry: the fields the original daemon tracked plus lifecycle facts."""

from __future__ import annotations

from dataclasses import dataclass, field

from pool_managerd.core.errors import LeaseRefused, UnknownLease
from pool_managerd.core.health import HealthState
from pool_managerd.core.registry.types import Lease
from pool_managerd.messages import EngineInfo, Placement, PoolState


@dataclass(slots=True)
class Entry:
    """Mutable per-pool record. Only the lifecycle machine writes ``state``; what follows from
    other fields (``draining``, ``device_mask``) is derived from them, not stored."""

    pool: str
    node: str = ""
    state: PoolState = "unready"
    seq: int = 0
    health: HealthState = field(default_factory=HealthState)
    last_error: str | None = None
    last_heartbeat: float | None = None
    version: str | None = None
    engine_version: str | None = None
    engine_digest: str | None = None
    model: str | None = None
    slots_total: int = 1
    leases: dict[str, Lease] = field(default_factory=dict)
    perf_hints: dict[str, float] = field(default_factory=dict)
    placement: Placement | None = None
    engine: EngineInfo | None = None
    restarts: int = 0
    crashes: int = 0
    simulated: bool = False
    updated_at: float = 0.0
    last_event: str | None = None

    @property
    def draining(self) -> bool:
        """Derived from ``state``: never stored twice."""
        return self.state == "draining"

    @property
    def device_mask(self) -> list[str]:
        """The GPUs of the current placement, in mask order (derived, never stored twice)."""
        return list(self.placement.mask) if self.placement is not None else []

    @property
    def active_leases(self) -> int:
        """Leases held now; derived from the lease table, so it can never go below zero."""
        return len(self.leases)

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_total - self.active_leases)

    def acquire(self, lease_id: str, ttl_s: float, now: float, holder: str | None = None) -> Lease:
        """Take (or renew) a slot. Refusals say why: draining, not ready, or no free slot."""
        if self.state == "draining":
            raise LeaseRefused("draining", f"pool {self.pool!r} is draining; no new leases")
        if self.state != "ready":
            raise LeaseRefused("not_ready", f"pool {self.pool!r} is {self.state}, not ready")
        if lease_id not in self.leases and self.slots_free == 0:
            raise LeaseRefused(
                "no_slots",
                f"pool {self.pool!r} has no free slot ({self.active_leases}/{self.slots_total} leased)",
            )
        # Re-acquiring a held lease renews it: a retried lease command must not take two slots.
        lease = Lease(lease_id, now + ttl_s, holder)
        self.leases[lease_id] = lease
        return lease

    def release(self, lease_id: str) -> None:
        """Give a slot back; an unknown lease id is an error, not a silent no-op."""
        if self.leases.pop(lease_id, None) is None:
            raise UnknownLease(f"pool {self.pool!r} holds no lease {lease_id!r}")

    def expire(self, now: float) -> list[str]:
        """Drop leases whose TTL ran out; returns their ids in expiry order."""
        gone = sorted((lease.expires_at, lid) for lid, lease in self.leases.items() if lease.expires_at <= now)
        for _, lid in gone:
            del self.leases[lid]
        return [lid for _, lid in gone]

    def next_expiry(self) -> float | None:
        """When the next lease runs out, if any is held."""
        return min((lease.expires_at for lease in self.leases.values()), default=None)

    def drop_leases(self) -> int:
        """Forget every lease (engine stopped); returns how many were held."""
        n = len(self.leases)
        self.leases.clear()
        return n
