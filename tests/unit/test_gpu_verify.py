"""The post-launch GPU check: the pure verdict, and the machine that waits for it before ready.

Plain values only: the placement, the sample (what the engine's processes held per GPU, how long
after the first healthy probe) and the policy. The daemon-level paths with real fake-engine
processes and the simulated driver are in test_gpu_e2e.py.
"""

from __future__ import annotations

import msgspec
import pytest

from pool_managerd.adapters.nvml import read_nvml_snapshot
from pool_managerd.contract.messages import (
    EngineInfo,
    EngineSpec,
    GpuVerified,
    HealthReport,
    Placement,
    PreloadCmd,
    StateChanged,
)
from pool_managerd.core.definitions import Context, PlanRequest, PoolDefinition
from pool_managerd.core.effects import SpawnEngine, VerifyGpus
from pool_managerd.core.fold import fold
from pool_managerd.core.gpu_verify import GpuCheckPolicy, GpuSample, engine_held, judge
from pool_managerd.core.inputs import GpuChecked, HealthInput
from pool_managerd.core.machine import PoolMachine
from pool_managerd.runtime.gpu_check import sample_of
from support.gpu import FakePynvml, load_json

A, B, C = "GPU-aaaa", "GPU-bbbb", "GPU-cccc"
GiB = 1024**3
TWO = Placement(mask=["0", "1"], uuids=[A, B], cuda_visible_devices=f"{A},{B}", budgets=[4 * GiB, 8 * GiB])
POLICY = GpuCheckPolicy(deadline_s=10.0, min_fraction=0.5)


def sample(held: dict[str, int], elapsed: float = 0.0) -> GpuSample:
    return GpuSample(held=held, pids=(100,), elapsed_s=elapsed)


def test_an_engine_holding_its_budget_on_every_gpu_is_verified() -> None:
    verdict = judge(TWO, sample({A: 5 * GiB, B: 9 * GiB}), POLICY)
    assert verdict.status == "ok" and verdict.reason is None
    assert dict(verdict.held) == {A: 5 * GiB, B: 9 * GiB}


@pytest.mark.parametrize(
    ("held", "reason"),
    [
        ({}, "cpu_fallback"),
        ({A: 5 * GiB}, "wrong_devices"),
        ({A: 5 * GiB, B: 1 * GiB}, "under_budget"),
    ],
)
def test_an_incomplete_sample_waits_for_the_deadline_then_fails_typed(held: dict[str, int], reason: str) -> None:
    assert judge(TWO, sample(held, elapsed=9.9), POLICY).status == "pending"
    verdict = judge(TWO, sample(held, elapsed=10.0), POLICY)
    assert (verdict.status, verdict.reason) == ("failed", reason)
    assert verdict.message


def test_memory_on_a_gpu_outside_the_placement_fails_at_once() -> None:
    verdict = judge(TWO, sample({A: 5 * GiB, B: 9 * GiB, C: 1}, elapsed=0.0), POLICY)
    assert (verdict.status, verdict.reason) == ("failed", "wrong_devices")
    assert C in verdict.message


def test_without_budgets_any_memory_on_every_gpu_counts() -> None:
    bare = msgspec.structs.replace(TWO, budgets=[])
    assert judge(bare, sample({A: 1, B: 1}), POLICY).status == "ok"


def test_engine_held_sums_the_engine_processes_only() -> None:
    procs = {A: [(100, 10), (101, 5), (999, 1000)], B: [(999, 7)]}
    assert engine_held(procs, [100, 101]) == {A: 15}


def test_the_recorded_h200_allocation_is_what_the_check_reads() -> None:
    """The NVML adapter's reading of the recording (a child holding a 4 GiB tensor, then killed)
    feeds the check: 4.84 GB held by that pid verifies a 4 GiB budget; after the kill the
    process is gone from NVML's list and the same engine would be a CPU fallback."""
    nvml = load_json("nvml.json")
    pid = nvml["alloc_child"]["pid"]
    with_child = read_nvml_snapshot(FakePynvml(scenario="alloc_child"))
    gpu = with_child.gpus[0]
    placement = Placement(mask=["0"], uuids=[gpu.uuid], cuda_visible_devices=gpu.uuid, budgets=[4 * GiB])
    held = sample_of(with_child, pid, pid, 0.5, (gpu.uuid,))
    assert dict(held.held) == {gpu.uuid: 4838129664}
    assert judge(placement, held, POLICY).status == "ok"
    assert nvml["after_kill"]["procs"] == []
    after = read_nvml_snapshot(FakePynvml())  # no compute process listed, as after the kill
    gone = sample_of(after, pid, pid, 10.0, (gpu.uuid,))
    assert dict(gone.held) == {}
    assert judge(placement, gone, POLICY).reason == "cpu_fallback"


# --- the machine waits for the verdict ---------------------------------------------------------

SPEC = EngineSpec(argv=["engine", "--port", "{port}"], model="m", load_timeout_s=60.0)


def _planner(request: PlanRequest) -> Placement:
    return TWO


def _lifecycle(check: GpuCheckPolicy | None = POLICY) -> PoolMachine:
    lc = PoolMachine("node-1", _planner)
    lc.register(PoolDefinition("chat", SPEC, gpu_check=check))
    return lc


def _to_healthy(lc: PoolMachine) -> tuple[list[object], list[object]]:
    events: list[object] = []
    effects: list[object] = []
    for inp, now in (
        (None, 1.0),
        ("spawned", 2.0),
        ("healthy", 3.0),
    ):
        ctx = Context(now=now)
        if inp is None:
            out = lc.command("chat", PreloadCmd(command_id="c1"), ctx)
        elif inp == "spawned":
            spawn = next(e for e in effects if isinstance(e, SpawnEngine))
            assert spawn.placement == TWO
            out = lc.engine_spawned("chat", EngineInfo(pid=100, pgid=100, port=9000, started_at=2.0), "x", ctx)
        else:
            report = HealthReport(pool="chat", ts=now, ok=True, engine_pid=100)
            out = lc.step("chat", HealthInput(report), ctx)
        events += out.events
        effects += out.effects
    return events, effects


def test_a_healthy_probe_asks_for_the_gpu_check_and_the_pool_is_not_ready_yet() -> None:
    lc = _lifecycle()
    _events, effects = _to_healthy(lc)
    assert lc.state("chat") == "preloading"
    check = [e for e in effects if isinstance(e, VerifyGpus)]
    assert len(check) == 1 and check[0].pid == 100 and check[0].placement == TWO
    # A second healthy probe while the check runs asks for nothing more.
    again = lc.step("chat", HealthInput(HealthReport(pool="chat", ts=3.5, ok=True, engine_pid=100)), Context(4.0))
    assert not any(isinstance(e, VerifyGpus) for e in again.effects)


def test_a_verified_engine_makes_the_pool_ready_holding_what_it_holds() -> None:
    lc = _lifecycle()
    events, _ = _to_healthy(lc)
    out = lc.step("chat", GpuChecked(100, sample({A: 5 * GiB, B: 9 * GiB}, 0.2), "sim:t"), Context(now=4.0))
    assert lc.state("chat") == "ready"
    verified = [e.body for e in out.events if isinstance(e.body, GpuVerified)]
    assert verified and verified[0].ok and verified[0].held == {A: 5 * GiB, B: 9 * GiB}
    assert verified[0].deadline_s == POLICY.deadline_s and verified[0].source == "sim:t"
    assert dict(lc.pool("chat").value.vram_held) == {A: 5 * GiB, B: 9 * GiB}
    assert lc.registry.snapshot("chat").vram_held == {A: 5 * GiB, B: 9 * GiB}
    # Replay rebuilds the same value from the events alone (no GPU).
    replayed = fold([*events, *out.events])
    assert not replayed.violations
    assert dict(replayed.views["chat"].vram_held) == {A: 5 * GiB, B: 9 * GiB}


def test_a_cpu_fallback_fails_the_preload_typed_and_supervision_restarts_it() -> None:
    lc = _lifecycle()
    _to_healthy(lc)
    out = lc.step("chat", GpuChecked(100, sample({}, 10.0)), Context(now=14.0))
    verified = next(e.body for e in out.events if isinstance(e.body, GpuVerified))
    assert not verified.ok and verified.reason == "cpu_fallback"
    change = next(e.body for e in out.events if isinstance(e.body, StateChanged))
    assert (change.trigger, change.src, change.dst) == ("preload_failed", "preloading", "restarting")
    assert change.reason.startswith("cpu_fallback:")
    assert lc.state("chat") == "restarting"
    assert dict(lc.pool("chat").value.vram_held) == {}


def test_a_check_about_an_engine_the_pool_moved_past_changes_nothing() -> None:
    lc = _lifecycle()
    _to_healthy(lc)
    out = lc.step("chat", GpuChecked(999, sample({A: GiB, B: GiB})), Context(now=4.0))
    assert out.events == [] and lc.state("chat") == "preloading"


def test_without_a_check_the_first_healthy_probe_is_ready() -> None:
    lc = _lifecycle(check=None)
    _events, effects = _to_healthy(lc)
    assert lc.state("chat") == "ready"
    assert not any(isinstance(e, VerifyGpus) for e in effects)
