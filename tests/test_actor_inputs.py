"""A pool's input queue stays bounded under a flood of health reports (anyone may publish them)."""

from __future__ import annotations

from pathlib import Path

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.config import PoolConfig
from pool_managerd.messages import HealthReport
from pool_managerd.runtime.actor import MAX_QUEUED_HEALTH
from pool_managerd.runtime.pools import MemoryEventSink, PoolRuntime, RuntimeOptions


async def test_a_flood_of_health_reports_is_bounded(tmp_path: Path) -> None:
    snapshot = load_gpu_source("sim:hetero-24g-48g")
    rt = PoolRuntime(MemoryEventSink(), lambda: snapshot, RuntimeOptions(run_dir=tmp_path))
    actor = rt.add_pool(PoolConfig(id="p", engine="fake").definition(), simulated=True)
    try:
        # Queued synchronously, before the actor's loop gets a turn: the worst case.
        accepted = [rt.health_report(HealthReport(pool="p", ts=float(i), ok=False)) for i in range(200)]
        assert accepted.count(True) == MAX_QUEUED_HEALTH
        assert actor.stats.health_dropped == 200 - MAX_QUEUED_HEALTH
        assert rt.health_report(HealthReport(pool="other", ts=1.0, ok=True)) is False  # not ours
    finally:
        await rt.close()
    # Once processed, the budget is free again.
    assert actor._health_queued == 0
