"""A daemon rebuilt from the log decides like the one that wrote it: restore(fold(events)) is the
very value the live pool holds (state, spec, mask, policy, reload staging, rollback, all of it)."""

from __future__ import annotations

from pool_managerd.contract.messages import (
    EngineSpec,
    Event,
    Placement,
    PreloadCmd,
    ReloadCmd,
    ReloadRolledBack,
)
from pool_managerd.core.definitions import Context, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import SpawnEngine
from pool_managerd.core.fold import Fold, fold
from pool_managerd.core.state import initial
from support.lifecycle_harness import LifecycleHarness

SPEC = EngineSpec(argv=["llama-server", "--model", "{model}"], model="m1")


def planner(req: PlanRequest) -> Placement | PlanRejected:
    mask = req.mask if isinstance(req.mask, str) else "auto"
    return Placement(mask=[mask], uuids=[f"GPU-{mask}"], cuda_visible_devices=f"GPU-{mask}", policy=req.policy or "")


def node(now: float = 100.0, pid: int = 10) -> LifecycleHarness:
    """Node ``n1`` with pool ``p`` on mask "1", every input one second after the last."""
    definition = PoolDefinition(pool="p", spec=SPEC, device_mask="1", split_policy="free")
    return LifecycleHarness("n1", [definition], planner=planner, now=now, tick=1.0, pid=pid, gpu="GPU")


def restored_from(events: list[Event]) -> LifecycleHarness:
    folded = Fold(start=lambda pool: initial(pool, SPEC, "1", "free"))
    for event in events:
        folded.apply(event)
    other = node(now=events[-1].ts, pid=100)
    other.lc.restore("p", folded.views["p"], Context(now=events[-1].ts))
    return other


def test_restore_mid_reload_keeps_mask_policy_and_the_rollback() -> None:
    live = node()
    live.cmd(PreloadCmd(command_id="c1", device_mask="0", policy="equal"))
    live.to_ready()
    live.cmd(ReloadCmd(command_id="c2", model="m2", device_mask="2", policy="total"))
    # The reload drained at once and the new spec is loading: the daemon dies here.
    assert live.model().state == "preloading" and live.model().rollback is not None
    rebuilt = restored_from(live.events)
    assert rebuilt.model().value == live.model().value

    # Both fail the new spec the same way: both roll back to m1 on mask "0" with policy "equal".
    for each in (live, rebuilt):
        out = each.exited(each.spawned_pid())
        assert any(isinstance(e.body, ReloadRolledBack) for e in out.events)
        assert (each.model().spec.model, each.model().mask, each.model().split_policy) == ("m1", "0", "equal")


def test_restore_keeps_the_mask_asked_for_at_preload_for_later_restarts() -> None:
    live = node()
    live.cmd(PreloadCmd(command_id="c1", device_mask="0"))
    pid = live.to_ready().pid
    rebuilt = restored_from(live.events)
    assert rebuilt.model().mask == "0"  # not the configured "1"
    assert rebuilt.model().value == live.model().value
    rebuilt.exited(pid)
    out = rebuilt.fire("backoff")
    spawn = next(e for e in out.effects if isinstance(e, SpawnEngine))
    assert rebuilt.requests[-1].mask == "0" and spawn.placement.mask == ["0"]


def test_a_kill_by_signal_counts_as_a_crash_live_and_in_the_fold() -> None:
    live = node()
    live.cmd(PreloadCmd(command_id="c1"))
    pid = live.to_ready().pid
    live.exited(pid, None, 9)  # SIGKILL: no exit code
    assert live.model().state == "restarting"
    assert live.model().entry.crashes == 1
    assert fold(live.events).views["p"].crashes == 1
