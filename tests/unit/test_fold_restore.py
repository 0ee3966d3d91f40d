"""A daemon rebuilt from the log decides like the one that wrote it: restore(fold(events)) is the
very value the live pool holds (state, spec, mask, policy, reload staging, rollback, all of it)."""

from __future__ import annotations

from pool_managerd.contract.messages import (
    EngineInfo,
    EngineSpec,
    Event,
    HealthReport,
    Placement,
    PreloadCmd,
    ReloadCmd,
    ReloadRolledBack,
)
from pool_managerd.core.definitions import Context, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.effects import SpawnEngine
from pool_managerd.core.fold import Fold, fold
from pool_managerd.core.machine import PoolMachine
from pool_managerd.core.pool_model import PoolModel
from pool_managerd.core.state import initial

SPEC = EngineSpec(argv=["llama-server", "--model", "{model}"], model="m1")
asked: list[PlanRequest] = []


def planner(req: PlanRequest) -> Placement | PlanRejected:
    asked.append(req)
    mask = req.mask if isinstance(req.mask, str) else "auto"
    return Placement(mask=[mask], uuids=[f"GPU-{mask}"], cuda_visible_devices=f"GPU-{mask}", policy=req.policy or "")


class Node:
    def __init__(self) -> None:
        self.lc = PoolMachine("n1", planner)
        self.lc.register(PoolDefinition(pool="p", spec=SPEC, device_mask="1", split_policy="free"))
        self.events: list[Event] = []
        self.now = 100.0
        self.pid = 10

    def ctx(self) -> Context:
        self.now += 1.0
        return Context(now=self.now, rand=0.5)

    def take(self, out: object) -> object:
        self.events += out.events  # type: ignore[attr-defined]
        return out

    def model(self) -> PoolModel:
        return self.lc.pool("p")

    def spawned(self) -> int:
        self.pid += 1
        info = EngineInfo(pid=self.pid, pgid=self.pid, port=9000, started_at=self.now)
        self.take(self.lc.engine_spawned("p", info, "GPU", self.ctx()))
        return self.pid

    def ready(self) -> int:
        pid = self.spawned()
        ctx = self.ctx()
        self.take(self.lc.health("p", HealthReport(pool="p", ts=ctx.now, ok=True, engine_pid=pid), ctx))
        return pid


def restored_from(events: list[Event]) -> Node:
    other = Node()
    folded = Fold(start=lambda pool: initial(pool, SPEC, "1", "free"))
    for event in events:
        folded.apply(event)
    other.lc.restore("p", folded.views["p"], Context(now=events[-1].ts))
    other.now = events[-1].ts
    other.pid = 100
    return other


def test_restore_mid_reload_keeps_mask_policy_and_the_rollback() -> None:
    live = Node()
    live.take(live.lc.command("p", PreloadCmd(command_id="c1", device_mask="0", policy="equal"), live.ctx()))
    live.ready()
    live.take(live.lc.command("p", ReloadCmd(command_id="c2", model="m2", device_mask="2", policy="total"), live.ctx()))
    # The reload drained at once and the new spec is loading: the daemon dies here.
    assert live.model().state == "preloading" and live.model().rollback is not None
    rebuilt = restored_from(live.events)
    assert rebuilt.model().value == live.model().value

    # Both fail the new spec the same way: both roll back to m1 on mask "0" with policy "equal".
    for node in (live, rebuilt):
        pid = node.spawned()
        out = node.take(node.lc.engine_exited("p", pid, 1, None, node.ctx()))
        assert any(isinstance(e.body, ReloadRolledBack) for e in out.events)  # type: ignore[attr-defined]
        assert (node.model().spec.model, node.model().mask, node.model().split_policy) == ("m1", "0", "equal")


def test_restore_keeps_the_mask_asked_for_at_preload_for_later_restarts() -> None:
    live = Node()
    live.take(live.lc.command("p", PreloadCmd(command_id="c1", device_mask="0"), live.ctx()))
    pid = live.ready()
    rebuilt = restored_from(live.events)
    assert rebuilt.model().mask == "0"  # not the configured "1"
    assert rebuilt.model().value == live.model().value
    asked.clear()
    out = rebuilt.lc.engine_exited("p", pid, 1, None, rebuilt.ctx())
    token = next(e.token for e in out.effects if getattr(e, "name", "") == "backoff")  # type: ignore[attr-defined]
    out = rebuilt.lc.timer_fired("p", "backoff", token, rebuilt.ctx())
    spawn = next(e for e in out.effects if isinstance(e, SpawnEngine))
    assert asked[-1].mask == "0" and spawn.placement.mask == ["0"]


def test_a_kill_by_signal_counts_as_a_crash_live_and_in_the_fold() -> None:
    live = Node()
    live.take(live.lc.command("p", PreloadCmd(command_id="c1"), live.ctx()))
    pid = live.ready()
    live.take(live.lc.engine_exited("p", pid, None, 9, live.ctx()))  # SIGKILL: no exit code
    assert live.model().state == "restarting"
    assert live.model().entry.crashes == 1
    assert fold(live.events).views["p"].crashes == 1
