"""The registry: every pool's entry, keyed by pool id.

Operations on a pool that was never registered raise :class:`UnknownPool`; only
:meth:`Registry.register` creates entries.
"""

from __future__ import annotations

from collections.abc import Iterator

from pool_managerd.core.errors import DuplicatePool, UnknownPool
from pool_managerd.core.registry.entry import Entry
from pool_managerd.core.registry.snapshot import to_snapshot
from pool_managerd.core.registry.types import Lease, LeaseRefusalCode
from pool_managerd.messages import PoolSnapshot
from pool_managerd.subjects import validate_id

__all__ = ["Entry", "Lease", "LeaseRefusalCode", "Registry", "to_snapshot"]


class Registry:
    """All pool entries of one node."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._entries: dict[str, Entry] = {}

    def register(self, pool: str, *, slots: int = 1, simulated: bool = False) -> Entry:
        """Create the entry of a new pool (the only way a pool comes to exist)."""
        validate_id(pool, "pool")
        if pool in self._entries:
            raise DuplicatePool(pool)
        entry = Entry(pool=pool, node=self.node, slots_total=slots, simulated=simulated)
        self._entries[pool] = entry
        return entry

    def get(self, pool: str) -> Entry:
        """The entry of ``pool``; :class:`UnknownPool` if it was never registered."""
        try:
            return self._entries[pool]
        except KeyError:
            raise UnknownPool(pool) from None

    def remove(self, pool: str) -> Entry:
        try:
            return self._entries.pop(pool)
        except KeyError:
            raise UnknownPool(pool) from None

    def __contains__(self, pool: object) -> bool:
        return pool in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter([self._entries[k] for k in sorted(self._entries)])

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self, pool: str) -> PoolSnapshot:
        return to_snapshot(self.get(pool))

    def snapshots(self) -> list[PoolSnapshot]:
        """Every pool's snapshot, sorted by pool id."""
        return [to_snapshot(entry) for entry in self]
