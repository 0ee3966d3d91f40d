"""Typed errors of the pure layer. Each carries a stable ``code`` (see ``messages.RejectCode``)."""

from __future__ import annotations

from collections.abc import Sequence


class PoolManagerError(Exception):
    """Base of every typed error; ``code`` is stable and safe to put on the wire."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidId(PoolManagerError):
    """A pool or node id does not match ``^[a-z0-9][a-z0-9_-]{0,62}$``."""

    code = "invalid_id"

    def __init__(self, what: str, value: object) -> None:
        shown = value if isinstance(value, str) else type(value).__name__
        super().__init__(f"invalid {what} id {shown!r}: must match ^[a-z0-9][a-z0-9_-]{{0,62}}$")
        self.what = what
        self.value = value


class InvalidSubject(PoolManagerError):
    """A subject does not have the shape the contract defines."""

    code = "bad_request"


class MalformedMessage(PoolManagerError):
    """Bytes that do not decode to the expected wire message."""

    code = "bad_request"


class PayloadTooLarge(PoolManagerError):
    code = "payload_too_large"


class UnknownVerb(PoolManagerError):
    code = "unknown_verb"


class UnknownPool(PoolManagerError):
    """An operation named a pool that was never registered."""

    code = "unknown_pool"

    def __init__(self, pool: str) -> None:
        super().__init__(f"unknown pool {pool!r}")
        self.pool = pool


class DuplicatePool(PoolManagerError):
    code = "bad_request"

    def __init__(self, pool: str) -> None:
        super().__init__(f"pool {pool!r} is already registered")
        self.pool = pool


class IllegalTransition(PoolManagerError):
    """A trigger that the lifecycle table does not allow from the current state."""

    code = "illegal_transition"

    def __init__(self, pool: str, trigger: str, state: str, allowed: Sequence[str]) -> None:
        allowed_s = ", ".join(allowed) or "none"
        super().__init__(f"pool {pool!r}: {trigger!r} is not allowed in state {state!r} (allowed: {allowed_s})")
        self.pool = pool
        self.trigger = trigger
        self.state = state
        self.allowed = list(allowed)


class LeaseRefused(PoolManagerError):
    """A lease could not be granted; ``code`` is ``draining``, ``not_ready`` or ``no_slots``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownLease(PoolManagerError):
    code = "unknown_lease"
