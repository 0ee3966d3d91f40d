"""Drain policy: when a draining pool is done, and what a deadline means. Pure.

A drain refuses new leases at once, then completes as soon as leases reach zero (it is
event-driven: the release or expiry of the last lease completes it) or, at the deadline,
stops the engine anyway and records how many leases were still held. A drain that is part of a
reload is aborted at the deadline instead: the old engine keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """What the deadline means for a draining pool."""

    abort_reload: bool
    leases_left: int
    reason: str


def complete_now(active_leases: int) -> bool:
    """A drain completes as soon as no lease is held."""
    return active_leases == 0


def at_deadline(*, reload: bool, active_leases: int, deadline_s: float) -> DrainOutcome:
    """The deadline passed with ``active_leases`` still held."""
    if reload:
        return DrainOutcome(
            True,
            active_leases,
            f"reload aborted: drain deadline of {deadline_s:g} s passed with {active_leases} lease(s) held; "
            "the old engine keeps serving",
        )
    return DrainOutcome(
        False,
        active_leases,
        f"drain deadline of {deadline_s:g} s passed with {active_leases} lease(s) held; engine stopped",
    )
