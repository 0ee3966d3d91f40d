"""The event log's typed errors."""

from __future__ import annotations

import nats.js.errors

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import Event, LogCorrupt

__all__ = ["BacklogFull", "EventLogError", "EventRejected", "PoolFenced", "PoolQuarantined", "PublisherClosed"]


class EventLogError(PoolManagerError):
    """Base of the event log's typed errors."""

    code = "unavailable"


class BacklogFull(EventLogError):
    """The publisher's bounded backlog is full: the event was *not* queued."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"event backlog full ({limit} events waiting for JetStream)")
        self.limit = limit


class PoolFenced(EventLogError):
    """Another writer appended to this pool's events; this publisher no longer writes it."""

    code = "fenced"

    def __init__(self, pool: str, reason: str) -> None:
        super().__init__(f"pool {pool!r} is fenced: {reason}")
        self.pool = pool
        self.reason = reason


class PoolQuarantined(EventLogError):
    """The append was refused because foreign messages (not events of this pool) were stored on
    the pool's subjects: the pool is quarantined (``log_corrupt``), not fenced."""

    code = "log_corrupt"

    def __init__(self, pool: str, corrupt: LogCorrupt) -> None:
        super().__init__(f"pool {pool!r} is quarantined: {corrupt.reason}")
        self.pool = pool
        self.corrupt = corrupt


class PublisherClosed(EventLogError):
    """The publisher was closed (or its connection closed for good) before the event was stored."""


class EventRejected(EventLogError):
    """JetStream refused the event for a reason retrying cannot fix (e.g. payload too large)."""

    code = "internal"

    def __init__(self, event: Event, error: nats.js.errors.APIError) -> None:
        super().__init__(
            f"event {event.type} seq {event.seq} of {event.pool or event.node!r} refused: "
            f"err_code={error.err_code} {error.description}"
        )
        self.err_code = error.err_code
        self.description = error.description
