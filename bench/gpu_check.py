"""What the post-launch GPU check costs: ready lag with the check against ready lag without it.

Run: ``.venv/bin/python bench/gpu_check.py [--runs N]`` (default 20 runs of each).

Each run preloads one pool on the real runtime (``PoolRuntime`` over an in-memory event sink,
the simulated driver of ``sim:hetero-24g-48g`` as the GPU reader, the daemon's probe options)
with a real fake-engine process that records its allocation in the simulated driver, and
measures from the engine's first healthy instant (its ``--ready-file``) to the append of the
pool's ``state_changed ... dst=ready``. Baseline, interleaved in the same run: the same pool with
``gpu_check = "off"`` (the first healthy probe makes it ready, as before the check existed).
The difference is what the check adds: one read of the simulated driver and one more step.

Also timed: one sample (the simulated driver's read of its process files plus finding the
engine's processes) and one verdict (the pure ``judge``), over 2,000 calls each.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.sim_gpus import SIM_GPU_BUDGETS_ENV, SIM_GPU_DIR_ENV, SimGpuState, proc_path
from pool_managerd.config import PoolConfig, RestartConfig
from pool_managerd.contract.messages import GpuVerified, Placement, PreloadCmd, StateChanged, StopCmd
from pool_managerd.core.gpu_verify import GpuCheckPolicy, judge
from pool_managerd.runtime.gpu_check import sample_of
from pool_managerd.runtime.pools import PoolRuntime, RuntimeOptions
from pool_managerd.testing.memory_sink import MemoryEventSink

WAIT_S = 30.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(rt: PoolRuntime, sink: MemoryEventSink, tmp: Path, name: str, check: bool) -> float:
    ready_file = tmp / f"{name}.ready"
    config = PoolConfig(
        id=name,
        engine="fake",
        extra_args=["--load-time", "0.15", "--ready-file", str(ready_file)],
        model_bytes=1 << 30,
        load_timeout_s=WAIT_S,
        stop_grace_s=2.0,
        restart=RestartConfig(initial_s=60.0, max_s=60.0),
        gpu_check="enforce" if check else "off",
    )
    rt.add_pool(config.definition(), simulated=True)
    mark = len(sink.events)
    await rt.command(name, PreloadCmd(command_id=f"{name}-preload"))
    await sink.wait_for(lambda e: e.pool == name and isinstance(e.body, StateChanged) and e.body.dst == "ready",
                        WAIT_S, mark)  # fmt: skip
    ready_at = time.time()
    lag = ready_at - float(ready_file.read_text())
    if check:
        verified = [e for e in sink.of(name) if isinstance(e.body, GpuVerified)]
        assert verified and verified[-1].body.ok, verified  # type: ignore[union-attr]
    await rt.command(name, StopCmd(command_id=f"{name}-stop"))
    return lag


def micro(sim: SimGpuState) -> tuple[float, float]:
    """(µs per sample, µs per verdict) with one engine's process file in the simulated driver."""
    uuid = sim.base.gpus[1].uuid
    me = os.getpid()
    proc_path(sim.root, me).write_text(json.dumps({"pid": me, "alloc": {uuid: 1 << 30}}))
    placement = Placement(mask=["1"], uuids=[uuid], cuda_visible_devices=uuid, budgets=[1 << 30])
    policy = GpuCheckPolicy()
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        sample = sample_of(sim.snapshot(), me, me, 0.1, (uuid,))
    per_sample = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        judge(placement, sample, policy)
    per_verdict = (time.perf_counter() - t) / n * 1e6
    return per_sample, per_verdict


async def main(runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sim = SimGpuState(load_gpu_source("sim:hetero-24g-48g"), tmp / "sim-gpu")

        def env(placement: Placement) -> dict[str, str]:
            budgets = dict(zip(placement.uuids, placement.budgets, strict=False))
            return {SIM_GPU_DIR_ENV: str(sim.root), SIM_GPU_BUDGETS_ENV: json.dumps(budgets)}

        sink = MemoryEventSink()
        rt = PoolRuntime(sink, sim.snapshot, RuntimeOptions(run_dir=tmp / "run"), gpu_reader=sim.snapshot,
                         engine_env=env)  # fmt: skip
        on: list[float] = []
        off: list[float] = []
        try:
            for i in range(runs):
                off.append(await one(rt, sink, tmp, f"off{i}", check=False))
                on.append(await one(rt, sink, tmp, f"on{i}", check=True))
        finally:
            await rt.close()
        per_sample, per_verdict = micro(sim)
    ms = 1000.0
    figures = {
        "runs": float(runs),
        "ready_lag_check_p50_ms": statistics.median(on) * ms,
        "ready_lag_check_p90_ms": pct(on, 0.9) * ms,
        "ready_lag_nocheck_p50_ms": statistics.median(off) * ms,
        "ready_lag_nocheck_p90_ms": pct(off, 0.9) * ms,
        "check_adds_p50_ms": (statistics.median(on) - statistics.median(off)) * ms,
        "sample_us": per_sample,
        "verdict_us": per_verdict,
    }
    print(f"post-launch GPU check, {runs} runs each (fake engine, simulated driver)\n")
    print(f"{'':32}{'p50 ms':>10}{'p90 ms':>10}")
    print(f"{'ready lag, check off (baseline)':32}{figures['ready_lag_nocheck_p50_ms']:>10.1f}"
          f"{figures['ready_lag_nocheck_p90_ms']:>10.1f}")  # fmt: skip
    on50, on90 = figures["ready_lag_check_p50_ms"], figures["ready_lag_check_p90_ms"]
    print(f"{'ready lag, check on':32}{on50:>10.1f}{on90:>10.1f}")
    print(f"\nthe check adds {figures['check_adds_p50_ms']:.1f} ms at p50; one sample {per_sample:.1f} µs, "
          f"one verdict {per_verdict:.2f} µs")  # fmt: skip
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(main(args.runs))
    print(json.dumps({k: round(v, 3) for k, v in result.items()}))
    sys.exit(0)
