"""Health: fold probe results into liveness/readiness and decide when health is lost. Pure.

``live`` means the engine answers HTTP at all (200 or llama.cpp's 503 "Loading model");
``ready`` means it answered 200. ``threshold`` consecutive failed probes (no answer, or an
answer other than 200/503) mean health is lost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthState:
    """What is known of one engine's health."""

    live: bool = False
    ready: bool = False
    consecutive_failures: int = 0
    last_report_at: float | None = None
    last_ok_at: float | None = None


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    """The consequence of one report: the new state and what changed."""

    state: HealthState
    changed: bool
    """``live`` or ``ready`` flipped: worth an event."""
    first_ok: bool
    """This report is the first 200 since the engine started or health was lost."""
    lost: bool
    """Exactly this report crossed the consecutive-failure threshold."""


def assess(state: HealthState, *, ok: bool, loading: bool, ts: float, threshold: int) -> HealthVerdict:
    """Fold one probe result (``ok``: HTTP 200; ``loading``: HTTP 503 while loading)."""
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    if ok:
        new = HealthState(True, True, 0, ts, ts)
        return HealthVerdict(new, (state.live, state.ready) != (True, True), not state.ready, False)
    if loading:
        # Loading is not a failure: llama.cpp answers 503 for as long as the model loads.
        new = HealthState(True, False, 0, ts, state.last_ok_at)
        return HealthVerdict(new, (state.live, state.ready) != (True, False), False, False)
    failures = state.consecutive_failures + 1
    lost = failures == threshold
    live, ready = (False, False) if failures >= threshold else (state.live, state.ready)
    new = HealthState(live, ready, failures, ts, state.last_ok_at)
    return HealthVerdict(new, (state.live, state.ready) != (live, ready), False, lost)


def fresh() -> HealthState:
    """Health of an engine that was just spawned: nothing known yet."""
    return HealthState()
