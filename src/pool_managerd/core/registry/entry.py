"""One pool's registry entry: a read-only view of its state value and of what its probes saw."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pool_managerd.contract.messages import EngineInfo, Placement, PoolState
from pool_managerd.core.health import HealthState
from pool_managerd.core.state import Lease, PoolValue


@dataclass(frozen=True, slots=True)
class Entry:
    """A pool as the registry shows it. Every field of the state comes from ``value`` (changed
    only by :func:`~pool_managerd.core.state.evolve`); nothing is stored twice."""

    value: PoolValue
    node: str = ""
    health: HealthState = field(default_factory=HealthState)
    last_heartbeat: float | None = None
    perf_hints: Mapping[str, float] = field(default_factory=dict)
    simulated: bool = False

    @property
    def pool(self) -> str:
        return self.value.pool

    @property
    def state(self) -> PoolState:
        return self.value.state

    @property
    def seq(self) -> int:
        return self.value.seq

    @property
    def last_error(self) -> str | None:
        return self.value.last_error

    @property
    def version(self) -> str | None:
        return self.value.version

    @property
    def engine_version(self) -> str | None:
        return self.value.engine_version

    @property
    def engine_digest(self) -> str | None:
        return self.value.engine_digest

    @property
    def model(self) -> str | None:
        return self.value.model

    @property
    def slots_total(self) -> int:
        return self.value.slots_total

    @property
    def leases(self) -> Mapping[str, Lease]:
        return self.value.leases

    @property
    def placement(self) -> Placement | None:
        return self.value.placement

    @property
    def engine(self) -> EngineInfo | None:
        return self.value.engine

    @property
    def restarts(self) -> int:
        return self.value.restarts

    @property
    def crashes(self) -> int:
        return self.value.crashes

    @property
    def updated_at(self) -> float:
        return self.value.last_ts

    @property
    def last_event(self) -> str | None:
        return self.value.last_event

    @property
    def vram_held(self) -> Mapping[str, int]:
        return self.value.vram_held

    @property
    def draining(self) -> bool:
        """Derived from ``state``: never stored twice."""
        return self.value.state == "draining"

    @property
    def device_mask(self) -> list[str]:
        """The GPUs of the current placement, in mask order (derived, never stored twice)."""
        return list(self.value.placement.mask) if self.value.placement is not None else []

    @property
    def active_leases(self) -> int:
        """Leases held now; derived from the lease table, so it can never go below zero."""
        return self.value.active_leases

    @property
    def slots_free(self) -> int:
        return self.value.slots_free
