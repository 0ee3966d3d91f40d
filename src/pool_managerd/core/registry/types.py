"""Small value types of the registry."""

from __future__ import annotations

from typing import Literal

from pool_managerd.core.state import Lease

__all__ = ["Lease", "LeaseRefusalCode"]

LeaseRefusalCode = Literal["draining", "not_ready", "no_slots"]
