"""Small value types of the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LeaseRefusalCode = Literal["draining", "not_ready", "no_slots"]


@dataclass(frozen=True, slots=True)
class Lease:
    """One slot held by a client until ``expires_at`` (unless released or renewed)."""

    lease_id: str
    expires_at: float
    holder: str | None = None
