"""Supervision: backoff with jitter, stable-period reset, consecutive-failure and intensity limits.

Pure functions, so time and randomness are plain arguments: ``rand`` comes from a seeded
``random.Random`` (never the global RNG) and ``now`` is a float the test picks.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.lifecycle import supervision
from pool_managerd.lifecycle.supervision import (
    Decision,
    RestartPolicy,
    SupervisionState,
    backoff_delay,
    on_failure,
    on_ready,
)

NO_JITTER = 0.5
"""``rand`` that makes the jitter factor exactly 1.0."""


def seeded(seed: int) -> float:
    return random.Random(seed).random()


def fail_n(policy: RestartPolicy, n: int, *, start: float = 0.0, step: float = 0.1) -> list[Decision]:
    """``n`` consecutive failures, ``step`` seconds apart, never ready in between."""
    state = SupervisionState()
    decisions = []
    for i in range(n):
        decision = on_failure(policy, state, start + i * step, NO_JITTER, f"crash {i + 1}")
        decisions.append(decision)
        state = decision.state
    return decisions


# --- backoff_delay ------------------------------------------------------------------------------


def test_first_delay_is_the_initial_delay() -> None:
    policy = RestartPolicy(initial_s=1.0)
    assert backoff_delay(policy, 1, NO_JITTER) == pytest.approx(1.0)
    assert backoff_delay(RestartPolicy(initial_s=2.5, max_s=10.0), 1, NO_JITTER) == pytest.approx(2.5)


def test_delay_doubles_then_caps() -> None:
    policy = RestartPolicy(initial_s=1.0, factor=2.0, max_s=60.0)
    delays = [backoff_delay(policy, attempt, NO_JITTER) for attempt in range(1, 10)]
    assert delays == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])


def test_delay_for_a_huge_attempt_count_is_the_cap() -> None:
    policy = RestartPolicy()
    assert backoff_delay(policy, 10_000, NO_JITTER) == pytest.approx(policy.max_s)


def test_seeded_rng_gives_reproducible_jittered_delays() -> None:
    policy = RestartPolicy()
    first = [backoff_delay(policy, a, seeded(a)) for a in range(1, 8)]
    again = [backoff_delay(policy, a, seeded(a)) for a in range(1, 8)]
    assert first == again
    # The jitter really moves the delay off the base for a typical draw.
    assert any(d != pytest.approx(min(60.0, 2.0 ** (a - 1))) for a, d in enumerate(first, start=1))


def test_jitter_extremes() -> None:
    policy = RestartPolicy(initial_s=10.0, max_s=20.0, jitter=0.1)
    assert backoff_delay(policy, 1, 0.0) == pytest.approx(9.0)
    assert backoff_delay(policy, 1, math.nextafter(1.0, 0.0)) == pytest.approx(11.0)
    # Jitter never takes a delay past the cap.
    capped = RestartPolicy(initial_s=10.0, max_s=10.0, jitter=0.1)
    assert backoff_delay(capped, 1, math.nextafter(1.0, 0.0)) == pytest.approx(10.0)
    assert backoff_delay(capped, 1, 0.0) == pytest.approx(9.0)
    assert backoff_delay(RestartPolicy(jitter=0.0), 1, 0.999) == pytest.approx(1.0)


@settings(max_examples=200)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    attempt=st.integers(min_value=1, max_value=200),
    initial=st.floats(min_value=0.0, max_value=30.0, allow_nan=False),
    extra=st.floats(min_value=0.0, max_value=600.0, allow_nan=False),
    factor=st.floats(min_value=1.0, max_value=10.0, allow_nan=False),
)
def test_jitter_keeps_delay_within_ten_percent_of_the_base(
    seed: int, attempt: int, initial: float, extra: float, factor: float
) -> None:
    policy = RestartPolicy(initial_s=initial, factor=factor, max_s=initial + extra, jitter=0.1)
    rand = random.Random(seed).random()
    base = min(policy.max_s, initial * factor ** (attempt - 1))
    delay = backoff_delay(policy, attempt, rand)
    tolerance = 1e-9 * max(1.0, base)
    assert base * 0.9 - tolerance <= delay <= min(policy.max_s, base * 1.1) + tolerance
    assert delay >= 0.0


@settings(max_examples=200)
@given(attempt=st.integers(min_value=1, max_value=100), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_delay_is_monotonic_in_the_attempt_without_jitter(attempt: int, seed: int) -> None:
    policy = RestartPolicy(jitter=0.0)
    rand = seeded(seed)
    assert backoff_delay(policy, attempt, rand) <= backoff_delay(policy, attempt + 1, rand)
    assert backoff_delay(policy, attempt, rand) <= policy.max_s


@pytest.mark.parametrize(("attempt", "rand"), [(0, 0.5), (-1, 0.5), (1, 1.0), (1, -0.01), (1, 1.5)])
def test_backoff_delay_rejects_bad_arguments(attempt: int, rand: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(RestartPolicy(), attempt, rand)


def test_backoff_delay_with_a_large_factor_caps_instead_of_overflowing() -> None:
    # RestartConfig accepts any factor >= 1, so this policy is reachable from a config file.
    policy = RestartPolicy(initial_s=1.0, factor=1e6, max_s=60.0)
    assert backoff_delay(policy, 60, NO_JITTER) == pytest.approx(60.0)


# --- on_failure ---------------------------------------------------------------------------------


def test_first_failure_restarts_after_the_initial_delay() -> None:
    policy = RestartPolicy()
    rand = seeded(7)
    decision = on_failure(policy, SupervisionState(), 100.0, rand, "engine exited")
    assert decision.restart is True
    assert decision.attempt == 1
    assert decision.delay_s == pytest.approx(backoff_delay(policy, 1, rand))
    assert decision.state == SupervisionState(consecutive_failures=1, restart_times=(100.0,), ready_since=None)
    assert decision.reason.startswith("engine exited; restart 1 in ")


def test_consecutive_failures_double_the_delay() -> None:
    decisions = fail_n(RestartPolicy(initial_s=1.0, max_s=60.0), 4)
    assert [d.attempt for d in decisions] == [1, 2, 3, 4]
    assert [d.delay_s for d in decisions] == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert all(d.restart for d in decisions)


def test_consecutive_failure_limit_parks_the_pool() -> None:
    policy = RestartPolicy(max_consecutive_failures=5)
    decisions = fail_n(policy, 5)
    assert [d.restart for d in decisions] == [True, True, True, True, False]
    last = decisions[-1]
    assert last.delay_s == 0.0
    assert last.attempt == 5
    assert "5 consecutive failures reached the limit of 5" in last.reason
    # Giving up does not record a restart.
    assert len(last.state.restart_times) == 4


def test_a_failure_after_the_stable_period_starts_over() -> None:
    policy = RestartPolicy(stable_s=60.0)
    state = fail_n(policy, 3)[-1].state
    assert state.consecutive_failures == 3
    state = on_ready(state, 10.0)
    assert state.ready_since == 10.0
    fresh = on_failure(policy, state, 70.0, NO_JITTER, "crash")
    assert fresh.attempt == 1
    assert fresh.delay_s == pytest.approx(policy.initial_s)
    assert fresh.state.ready_since is None


def test_a_failure_before_the_stable_period_keeps_counting() -> None:
    policy = RestartPolicy(stable_s=60.0)
    state = on_ready(fail_n(policy, 3)[-1].state, 10.0)
    decision = on_failure(policy, state, 69.999, NO_JITTER, "crash")
    assert decision.attempt == 4
    assert decision.delay_s == pytest.approx(8.0)


def test_restart_intensity_limit_within_the_window() -> None:
    # stable_s below the window, so a quick ready resets the failure count but not the window.
    policy = RestartPolicy(stable_s=1.0, max_restarts=3, window_s=60.0, max_consecutive_failures=100)
    state = SupervisionState()
    now = 0.0
    restarts = []
    for _ in range(4):
        decision = on_failure(policy, state, now, NO_JITTER, "crash")
        restarts.append(decision.restart)
        state = on_ready(decision.state, now + 1.0)
        now += 5.0  # ready for 4 s each time: past stable_s, so each failure is "attempt 1"
        assert decision.attempt == 1
    assert restarts == [True, True, True, False]
    assert "3 restarts in the last 60 s reached the limit of 3" in decision.reason


def test_restarts_outside_the_window_are_forgotten() -> None:
    policy = RestartPolicy(stable_s=1.0, max_restarts=2, window_s=10.0, max_consecutive_failures=100)
    state = SupervisionState()
    for now in (0.0, 5.0):
        state = on_ready(on_failure(policy, state, now, NO_JITTER, "crash").state, now + 2.0)
    # At t=10.0 the restart at t=0.0 has left the window (now - t < window_s is what counts).
    decision = on_failure(policy, state, 10.0, NO_JITTER, "crash")
    assert decision.restart is True
    assert decision.state.restart_times == (5.0, 10.0)


@settings(max_examples=200)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=200.0, allow_nan=False), min_size=1, max_size=40),
    ready_for=st.lists(st.one_of(st.none(), st.floats(min_value=0.0, max_value=200.0)), min_size=40, max_size=40),
)
def test_never_more_than_the_limits(gaps: list[float], ready_for: list[float | None]) -> None:
    """Whatever the timing, a restart decision respects both limits, and attempts count from 1."""
    policy = RestartPolicy(stable_s=30.0, max_consecutive_failures=4, max_restarts=3, window_s=60.0)
    state = SupervisionState()
    now = 0.0
    for gap, ready in zip(gaps, ready_for, strict=False):
        now += gap
        if ready is not None:
            state = on_ready(state, now)
            now += ready
        decision = on_failure(policy, state, now, NO_JITTER, "crash")
        assert decision.attempt >= 1
        if decision.restart:
            assert decision.attempt < policy.max_consecutive_failures
            assert len(decision.state.restart_times) <= policy.max_restarts
            assert decision.state.restart_times[-1] == now
            assert decision.delay_s == pytest.approx(backoff_delay(policy, decision.attempt, NO_JITTER))
        else:
            assert decision.delay_s == 0.0
            # After giving up the caller parks the pool; stop feeding failures.
            break
        state = decision.state


def test_reset_forgets_everything() -> None:
    state = fail_n(RestartPolicy(), 4)[-1].state
    assert state != SupervisionState()
    assert supervision.reset(state) == SupervisionState()


# --- RestartPolicy ------------------------------------------------------------------------------


def test_default_policy_matches_the_original_daemon() -> None:
    policy = RestartPolicy()
    assert (policy.initial_s, policy.factor, policy.max_s, policy.jitter) == (1.0, 2.0, 60.0, 0.1)
    assert (policy.max_consecutive_failures, policy.max_restarts, policy.window_s) == (5, 10, 60.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_s": -1.0}, "0 <= initial_s <= max_s"),
        ({"initial_s": 10.0, "max_s": 5.0}, "0 <= initial_s <= max_s"),
        ({"factor": 0.5}, "factor must be >= 1"),
        ({"jitter": -0.1}, "jitter must be in"),
        ({"jitter": 1.0}, "jitter must be in"),
        ({"max_consecutive_failures": 0}, "limits must be positive"),
        ({"max_restarts": 0}, "limits must be positive"),
        ({"window_s": 0.0}, "limits must be positive"),
        ({"window_s": -5.0}, "limits must be positive"),
    ],
)
def test_restart_policy_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["initial_s", "max_s", "factor", "window_s"])
def test_restart_policy_rejects_nan(field: str) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**{field: math.nan})  # type: ignore[arg-type]
