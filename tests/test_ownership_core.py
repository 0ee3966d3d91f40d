"""The pure ownership decisions and the fold's lease rule (no I/O)."""

from __future__ import annotations

import pytest

from pool_managerd.contract.messages import SCHEMA_VERSION, Event, EventBody, HealthChanged, OwnerRecord, PoolClaimed
from pool_managerd.core.fold import fold
from pool_managerd.core.ownership import LeaseTiming, may_claim, may_take_over, serving

T = LeaseTiming(ttl_s=2.0, margin_s=0.5)  # exact in binary: the bounds compare exactly


def record(node: str, epoch: int, *, released: bool = False) -> OwnerRecord:
    return OwnerRecord(node=node, epoch=epoch, ttl_s=T.ttl_s, released=released)


def test_the_owner_stops_serving_before_anyone_may_claim() -> None:
    sent = 64.0
    assert serving(sent, sent + T.serve_for_s - 0.01, T)
    assert not serving(sent, sent + T.serve_for_s, T)
    assert not serving(None, sent, T)
    # The claimant saw the renewal no earlier than it was sent; its earliest claim comes 2 margins later.
    seen = sent
    assert may_claim("node-b", record("node-a", 3), 7, seen, seen + T.claim_after_s - 0.01, T) is None
    claim = may_claim("node-b", record("node-a", 3), 7, seen, seen + T.claim_after_s, T)
    assert claim is not None and (claim.epoch, claim.previous_node, claim.expect_revision) == (4, "node-a", 7)
    assert T.claim_after_s - T.serve_for_s == pytest.approx(2 * T.margin_s)


def test_free_and_own_leases_are_claimed_at_once_and_epochs_never_repeat() -> None:
    fresh = may_claim("node-a", None, 0, None, 0.0, T)
    assert fresh is not None and (fresh.epoch, fresh.previous_node, fresh.expect_revision) == (1, None, 0)
    released = may_claim("node-b", record("node-a", 5, released=True), 9, None, 0.0, T)
    assert released is not None and released.epoch == 6
    own = may_claim("node-a", record("node-a", 5), 9, None, 0.0, T)
    assert own is not None and own.previous_node == "node-a"
    # A record lost (bucket recreated) never makes an epoch the log has seen come back.
    assert (may_claim("node-a", None, 0, None, 0.0, T, known_epoch=8) or fresh).epoch == 9
    # Never watched: another node's record is not known to be stale.
    assert may_claim("node-b", record("node-a", 5), 9, None, 1e9, T) is None


def test_standby_lists_limit_live_takeovers_and_timing_is_checked() -> None:
    assert may_take_over("node-b", ())
    assert may_take_over("node-b", ("node-b",)) and not may_take_over("node-c", ("node-b",))
    with pytest.raises(ValueError):
        LeaseTiming(ttl_s=1.0, margin_s=0.5)


def ev(pool: str, seq: int, node: str, epoch: int | None, body: EventBody) -> Event:
    return Event(v=SCHEMA_VERSION, seq=seq, ts=float(seq), node=node, pool=pool, epoch=epoch, body=body)


def probe() -> HealthChanged:
    return HealthChanged(live=True, ready=True)


def claim(node: str, epoch: int, previous: str | None = None) -> PoolClaimed:
    return PoolClaimed(node=node, epoch=epoch, previous_node=previous, previous_epoch=max(0, epoch - 1))


def test_hand_overs_a_to_b_to_a_replay_clean() -> None:
    events = [
        ev("p", 1, "a", 1, claim("a", 1)),
        ev("p", 2, "a", 1, probe()),
        ev("p", 3, "b", 2, claim("b", 2, "a")),
        ev("p", 4, "b", 2, probe()),
        ev("p", 5, "a", 3, claim("a", 3, "b")),
        ev("p", 6, "a", 3, probe()),
    ]
    f = fold(events, expect_start=True)
    assert f.violations == []
    assert f.views["p"].owner == "a" and f.views["p"].epoch == 3 and f.claims["p"] == ("a", 3)


def test_a_write_without_the_lease_is_two_writers() -> None:
    base = [ev("p", 1, "a", 1, claim("a", 1)), ev("p", 2, "b", 2, claim("b", 2, "a"))]
    stale = fold([*base, ev("p", 3, "a", 1, probe())])
    assert [v.code for v in stale.violations] == ["two_writers"] and "'b' holds epoch 2" in stale.violations[0].message
    forged = fold([*base, ev("p", 3, "evil", 2, probe())])
    assert [v.code for v in forged.violations] == ["two_writers"]
    reused = fold([*base, ev("p", 3, "a", 2, claim("a", 2, "b"))])
    assert [v.code for v in reused.violations] == ["two_writers"]
    unleased = fold([*base, ev("p", 3, "a", None, probe())])
    assert [v.code for v in unleased.violations] == ["two_writers"]


def test_old_logs_without_epochs_keep_the_one_move_rule() -> None:
    moved = [ev("p", 1, "a", None, probe()), ev("p", 2, "b", None, probe())]
    assert fold(moved).violations == []
    back = fold([*moved, ev("p", 3, "a", None, probe())])
    assert [v.code for v in back.violations] == ["two_writers"]
    # An old log continued by a leasing daemon: the claim opens the epochs.
    upgraded = fold([*moved, ev("p", 3, "a", 1, claim("a", 1, "b")), ev("p", 4, "a", 1, probe())])
    assert upgraded.violations == []
