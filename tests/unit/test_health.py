"""Health: a 503 while loading is not a failure; N failures cross the threshold exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.core.health import HealthState, HealthVerdict, assess, fresh


def fold(outcomes: list[str], threshold: int = 3) -> list[HealthVerdict]:
    """Feed ``ok``/``loading``/``fail`` probe results one second apart."""
    state = fresh()
    verdicts = []
    for ts, outcome in enumerate(outcomes):
        verdict = assess(state, ok=outcome == "ok", loading=outcome == "loading", ts=float(ts), threshold=threshold)
        verdicts.append(verdict)
        state = verdict.state
    return verdicts


def test_fresh_knows_nothing() -> None:
    assert fresh() == HealthState(False, False, 0, None, None)


def test_first_ok_makes_it_live_and_ready() -> None:
    (verdict,) = fold(["ok"])
    assert verdict.state == HealthState(True, True, 0, 0.0, 0.0)
    assert verdict.changed
    assert verdict.first_ok
    assert not verdict.lost


def test_second_ok_changes_nothing() -> None:
    _, second = fold(["ok", "ok"])
    assert not second.changed
    assert not second.first_ok
    assert second.state.last_ok_at == 1.0


def test_loading_is_live_not_ready_and_not_a_failure() -> None:
    verdicts = fold(["loading"] * 10, threshold=1)
    assert all(v.state.live and not v.state.ready for v in verdicts)
    assert all(v.state.consecutive_failures == 0 for v in verdicts)
    assert not any(v.lost for v in verdicts)
    assert [v.changed for v in verdicts] == [True] + [False] * 9


def test_loading_after_failures_resets_the_count() -> None:
    verdicts = fold(["fail", "fail", "loading", "fail", "fail"], threshold=3)
    assert [v.state.consecutive_failures for v in verdicts] == [1, 2, 0, 1, 2]
    assert not any(v.lost for v in verdicts)


def test_threshold_is_crossed_exactly_once() -> None:
    verdicts = fold(["ok", "fail", "fail", "fail", "fail", "fail"], threshold=3)
    assert [v.lost for v in verdicts] == [False, False, False, True, False, False]
    assert [v.state.consecutive_failures for v in verdicts] == [0, 1, 2, 3, 4, 5]
    # Still ready below the threshold, not at or above it.
    assert [v.state.ready for v in verdicts] == [True, True, True, False, False, False]
    assert [v.state.live for v in verdicts] == [True, True, True, False, False, False]
    assert [v.changed for v in verdicts] == [True, False, False, True, False, False]
    # A failure keeps the time of the last success.
    assert verdicts[-1].state.last_ok_at == 0.0
    assert verdicts[-1].state.last_report_at == 5.0


def test_threshold_of_one_is_lost_on_the_first_failure() -> None:
    (verdict,) = fold(["fail"], threshold=1)
    assert verdict.lost
    assert verdict.state.consecutive_failures == 1


def test_recovery_after_loss() -> None:
    verdicts = fold(["ok", "fail", "fail", "ok", "fail", "fail", "fail"], threshold=2)
    assert [v.lost for v in verdicts] == [False, False, True, False, False, True, False]
    recovered = verdicts[3]
    assert recovered.state == HealthState(True, True, 0, 3.0, 3.0)
    assert recovered.changed
    assert recovered.first_ok  # the first 200 since health was lost


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_must_be_positive(threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        assess(fresh(), ok=True, loading=False, ts=0.0, threshold=threshold)


@settings(max_examples=200)
@given(
    outcomes=st.lists(st.sampled_from(["ok", "loading", "fail"]), max_size=60),
    threshold=st.integers(min_value=1, max_value=6),
)
def test_health_fold_matches_a_reference_model(outcomes: list[str], threshold: int) -> None:
    """``lost`` fires once per run of failures, exactly at the threshold; flags follow a simple model."""
    verdicts = fold(outcomes, threshold)
    run, live, ready = 0, False, False
    for outcome, verdict in zip(outcomes, verdicts, strict=True):
        before = (live, ready)
        if outcome == "ok":
            run, live, ready = 0, True, True
        elif outcome == "loading":
            run, live, ready = 0, True, False
        else:
            run += 1
            if run >= threshold:
                live, ready = False, False
        assert verdict.state.consecutive_failures == run
        assert verdict.lost == (outcome == "fail" and run == threshold)
        assert (verdict.state.live, verdict.state.ready) == (live, ready)
        assert verdict.changed == ((live, ready) != before)
        assert verdict.first_ok == (outcome == "ok" and not before[1])
