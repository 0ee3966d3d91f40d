"""The registry: every pool's entry, keyed by pool id.

An entry is a view: the registry holds, per pool, where to read it (the live pool), never a
second copy of its state. Operations on a pool that was never registered raise
:class:`UnknownPool`; only :meth:`Registry.register` creates entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pool_managerd.contract.errors import DuplicatePool, UnknownPool
from pool_managerd.contract.messages import PoolSnapshot
from pool_managerd.contract.subjects import validate_id
from pool_managerd.core.registry.entry import Entry
from pool_managerd.core.registry.snapshot import to_snapshot
from pool_managerd.core.registry.types import Lease, LeaseRefusalCode

__all__ = ["Entry", "Lease", "LeaseRefusalCode", "Registry", "to_snapshot"]


class Registry:
    """All pool entries of one node."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._entries: dict[str, Callable[[], Entry]] = {}

    def register(self, pool: str, source: Callable[[], Entry]) -> None:
        """Add a new pool whose entry ``source`` reads (the only way a pool comes to exist)."""
        validate_id(pool, "pool")
        if pool in self._entries:
            raise DuplicatePool(pool)
        self._entries[pool] = source

    def get(self, pool: str) -> Entry:
        """The entry of ``pool`` as it is now; :class:`UnknownPool` if it was never registered."""
        try:
            source = self._entries[pool]
        except KeyError:
            raise UnknownPool(pool) from None
        return source()

    def remove(self, pool: str) -> Entry:
        """Forget ``pool``; returns its last entry."""
        try:
            return self._entries.pop(pool)()
        except KeyError:
            raise UnknownPool(pool) from None

    def __contains__(self, pool: object) -> bool:
        return pool in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter([self._entries[k]() for k in sorted(self._entries)])

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self, pool: str) -> PoolSnapshot:
        return to_snapshot(self.get(pool))

    def snapshots(self) -> list[PoolSnapshot]:
        """Every pool's snapshot, sorted by pool id."""
        return [to_snapshot(entry) for entry in self]
