"""Supervision: restart backoff with jitter, stable-period reset and a restart-intensity breaker.

Pure: the clock (``now``) and the random draw (``rand`` in [0, 1)) are arguments, so every
decision can be recomputed in a test and recorded in an event for replay.

Defaults and their anchors:

============================  =========  ==========================================
setting                       default    anchor
============================  =========  ==========================================
initial delay                 1 s        original daemon 1 s; Kubernetes 10 s
factor                        2          both double
cap                           60 s       original 60 s; Kubernetes 300 s
jitter                        ±10 %      original ±10 %
stable period (reset)         60 s       Kubernetes resets after 10 min running
consecutive failures → failed 5          original breaker: 5 failures
restarts per window → failed  10 / 60 s  original: 10 restarts per 60 s
============================  =========  ==========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a pool is restarted after a crash, a failed load or lost health."""

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    jitter: float = 0.1
    stable_s: float = 60.0
    max_consecutive_failures: int = 5
    max_restarts: int = 10
    window_s: float = 60.0

    def __post_init__(self) -> None:
        numbers = (self.initial_s, self.factor, self.max_s, self.jitter, self.stable_s, self.window_s)
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError("restart policy values must be finite numbers")
        if self.initial_s < 0 or self.max_s < self.initial_s:
            raise ValueError("restart policy needs 0 <= initial_s <= max_s")
        if self.factor < 1:
            raise ValueError("restart policy factor must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("restart policy jitter must be in [0, 1)")
        if self.max_consecutive_failures < 1 or self.max_restarts < 1 or self.window_s <= 0:
            raise ValueError("restart policy limits must be positive")


@dataclass(frozen=True, slots=True)
class SupervisionState:
    """What supervision remembers about one pool."""

    consecutive_failures: int = 0
    restart_times: tuple[float, ...] = field(default_factory=tuple)
    ready_since: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one failure: restart after ``delay_s`` or give up (park in ``failed``)."""

    restart: bool
    delay_s: float
    attempt: int
    reason: str
    state: SupervisionState


def backoff_delay(policy: RestartPolicy, attempt: int, rand: float) -> float:
    """Delay before restart number ``attempt`` (1-based): initial * factor^(attempt-1), capped,
    then jittered by ±``policy.jitter`` using ``rand`` in [0, 1)."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    if not 0.0 <= rand < 1.0:
        raise ValueError("rand must be in [0, 1)")
    if policy.initial_s == 0:
        base = 0.0
    elif (attempt - 1) * math.log(policy.factor) >= math.log(policy.max_s / policy.initial_s):
        # Compared in log space: factor ** (attempt - 1) itself can overflow long past the cap.
        base = policy.max_s
    else:
        base = policy.initial_s * policy.factor ** (attempt - 1)
    # The cap is a promise to the operator: jitter never takes a delay past it.
    return min(policy.max_s, base * (1.0 + policy.jitter * (2.0 * rand - 1.0)))


def on_ready(state: SupervisionState, now: float) -> SupervisionState:
    """The engine became ready: remember since when, for the stable-period reset."""
    return replace(state, ready_since=now)


def on_failure(policy: RestartPolicy, state: SupervisionState, now: float, rand: float, cause: str) -> Decision:
    """Decide what happens after a failure (crash, failed load, lost health) at ``now``."""
    failures = state.consecutive_failures
    stable = state.ready_since is not None and now - state.ready_since >= policy.stable_s
    if stable:
        # A pool that ran long enough earns a fresh start: a crash once a day is not a crash loop.
        failures = 0
    failures += 1
    recent = tuple(t for t in state.restart_times if now - t < policy.window_s)
    if failures >= policy.max_consecutive_failures:
        new_state = SupervisionState(failures, recent, None)
        reason = f"{cause}; {failures} consecutive failures reached the limit of {policy.max_consecutive_failures}"
        return Decision(False, 0.0, failures, reason, new_state)
    if len(recent) >= policy.max_restarts:
        new_state = SupervisionState(failures, recent, None)
        reason = (
            f"{cause}; {len(recent)} restarts in the last {policy.window_s:g} s reached the limit of "
            f"{policy.max_restarts}"
        )
        return Decision(False, 0.0, failures, reason, new_state)
    delay = backoff_delay(policy, failures, rand)
    new_state = SupervisionState(failures, (*recent, now), None)
    reason = f"{cause}; restart {failures} in {delay:.3f} s"
    return Decision(True, delay, failures, reason, new_state)


def reset(state: SupervisionState) -> SupervisionState:
    """Operator ``reset``: forget the crash loop."""
    return SupervisionState()
