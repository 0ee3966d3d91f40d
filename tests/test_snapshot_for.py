"""The GPU snapshot a placement decides against: other pools' budgets are taken off a simulated
inventory; a pool's own running engine is given back on a real one (reloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.config import PoolConfig
from pool_managerd.contract.messages import EngineInfo, GpuProcess, Placement
from pool_managerd.core.definitions import Context
from pool_managerd.runtime.pools import PoolRuntime, RuntimeOptions
from pool_managerd.testing.memory_sink import MemoryEventSink

GIB = 1 << 30


def runtime(tmp_path: Path, snapshot_simulated: bool) -> tuple[PoolRuntime, str, str]:
    base = load_gpu_source("sim:hetero-24g-48g")
    gpu0, gpu1 = base.gpus[0].uuid, base.gpus[1].uuid
    me = GpuProcess(pid=os.getpid(), used_memory=10 * GIB)
    gpus = [msgspec.structs.replace(base.gpus[0], processes=[me]), base.gpus[1]]
    snapshot = msgspec.structs.replace(base, simulated=snapshot_simulated, gpus=gpus)
    rt = PoolRuntime(MemoryEventSink(), lambda: snapshot, RuntimeOptions(run_dir=tmp_path))
    for pool in ("a", "b"):
        rt.lifecycle.register(PoolConfig(id=pool, engine="fake").definition(), simulated=snapshot_simulated)
    return rt, gpu0, gpu1


def put(rt: PoolRuntime, pool: str, **fields: Any) -> None:
    """Give ``pool`` a state as if its log had said so (the way recovery restores one)."""
    value = msgspec.structs.replace(rt.lifecycle.pool(pool).value, **fields)
    rt.lifecycle.restore(pool, value, Context(now=0.0))


def test_simulated_inventory_takes_other_pools_budgets_off(tmp_path: Path) -> None:
    rt, gpu0, gpu1 = runtime(tmp_path, snapshot_simulated=True)
    placement = Placement(
        mask=[gpu0, gpu1], uuids=[gpu0, gpu1], cuda_visible_devices=f"{gpu0},{gpu1}", budgets=[4 * GIB, 6 * GIB]
    )
    put(rt, "a", placement=placement)
    base = rt.gpu_source()
    for_b, problem = rt.snapshot_for("b")
    assert problem is None and for_b is not None
    assert for_b.gpus[0].memory_free == base.gpus[0].memory_free - 4 * GIB
    assert for_b.gpus[1].memory_free == base.gpus[1].memory_free - 6 * GIB
    for_a, _ = rt.snapshot_for("a")  # a pool never competes with itself
    assert for_a is not None and for_a.gpus[0].memory_free == base.gpus[0].memory_free


def test_real_inventory_gives_a_pools_own_engine_memory_back(tmp_path: Path) -> None:
    rt, _, _ = runtime(tmp_path, snapshot_simulated=False)
    # This test process plays pool a's running engine: NVML lists it with 10 GiB on GPU0.
    put(rt, "a", engine=EngineInfo(pid=os.getpid(), pgid=os.getpgrp(), port=1, started_at=0.0))
    base = rt.gpu_source()
    for_a, _ = rt.snapshot_for("a")
    assert for_a is not None
    expected = min(base.gpus[0].memory_total, base.gpus[0].memory_free + 10 * GIB)
    assert for_a.gpus[0].memory_free == expected
    assert for_a.gpus[1].memory_free == base.gpus[1].memory_free
    for_b, _ = rt.snapshot_for("b")  # another pool sees the memory as used
    assert for_b is not None and for_b.gpus[0].memory_free == base.gpus[0].memory_free


def test_simulated_inventory_counts_what_a_verified_pool_holds_not_its_plan(tmp_path: Path) -> None:
    rt, _, gpu1 = runtime(tmp_path, snapshot_simulated=True)
    placement = Placement(mask=[gpu1], uuids=[gpu1], cuda_visible_devices=gpu1, budgets=[4 * GIB])
    engine = EngineInfo(pid=999_999_999, pgid=999_999_999, port=1, started_at=0.0)  # not in the driver's list
    put(rt, "a", placement=placement, engine=engine, vram_held={gpu1: 7 * GIB})
    base = rt.gpu_source()
    for_b, _ = rt.snapshot_for("b")
    assert for_b is not None and for_b.gpus[1].memory_free == base.gpus[1].memory_free - 7 * GIB


def test_simulated_inventory_does_not_count_twice_what_its_driver_lists(tmp_path: Path) -> None:
    rt, gpu0, _ = runtime(tmp_path, snapshot_simulated=True)
    # This process is listed on GPU0 with 10 GiB (the snapshot already took it off free memory).
    placement = Placement(mask=[gpu0], uuids=[gpu0], cuda_visible_devices=gpu0, budgets=[4 * GIB])
    engine = EngineInfo(pid=os.getpid(), pgid=os.getpgrp(), port=1, started_at=0.0)
    put(rt, "a", placement=placement, engine=engine, vram_held={gpu0: 10 * GIB})
    base = rt.gpu_source()
    for_b, _ = rt.snapshot_for("b")
    assert for_b is not None and for_b.gpus[0].memory_free == base.gpus[0].memory_free
