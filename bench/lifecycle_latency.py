"""Lifecycle latency: how fast the runtime notices that an engine became ready, and that it died.

Run: ``.venv/bin/python bench/lifecycle_latency.py [--runs N]`` (default 50 runs).

Each run preloads one pool on the real runtime (``PoolRuntime`` over an in-memory event sink, a
simulated GPU inventory, the daemon's probe options) with a real fake-engine process, then:

* **ready lag**: from the engine's first healthy instant (the fake engine writes ``time.time()`` at
  that instant to its ``--ready-file``) to the append of the pool's ``state_changed ... dst=ready``
  event (stamped with ``time.time()`` when the sink receives it). The load time is drawn per run so
  the flip falls at a random phase of the probe schedule.
* **exit lag**: the bench SIGKILLs the engine's leader at a recorded ``time.time()`` (a random
  0-200 ms after ready) and measures to the append of the ``engine_exited`` event.

Baseline, on the same engines in the same run: the original daemon's approach, simulated. A loop
started when the engine is spawned probes ``/health`` every 500 ms (start to start, same probe
function as the runtime) and records its first 200; another loop started at spawn checks every
200 ms whether the pid is still alive (zombies count as dead) and records when it sees it gone.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.http_probe import probe
from pool_managerd.adapters.process import pid_alive
from pool_managerd.config import PoolConfig, RestartConfig
from pool_managerd.contract.messages import EngineExited, EngineSpawned, Event, PreloadCmd, StateChanged, StopCmd
from pool_managerd.runtime.pools import PROBE_OPTIONS, PoolRuntime, RuntimeOptions
from pool_managerd.testing.memory_sink import MemoryEventSink

DAEMON_PROBE_OPTIONS = dict(PROBE_OPTIONS)  # exactly what the daemon uses
"""Exactly what runtime/daemon.py passes to the runtime."""

BASELINE_HEALTH_PERIOD_S = 0.5
BASELINE_EXIT_PERIOD_S = 0.2
WAIT_S = 30.0

TARGETS = {"ready_lag_p50_ms": 50.0, "ready_lag_p99_ms": 150.0, "exit_lag_p50_ms": 20.0}


class StampingSink(MemoryEventSink):
    """The in-memory sink, stamping each event with ``time.time()`` when it is appended."""

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[tuple[str | None, int], float] = {}
        self.listeners: list[Callable[[Event, float], None]] = []

    async def append(self, pool: str, events: Sequence[Event]) -> None:
        now = time.time()
        for e in events:
            self.received[(e.pool, e.seq)] = now
            for listener in self.listeners:
                listener(e, now)
        await super().append(pool, events)

    def stamp(self, event: Event) -> float:
        return self.received[(event.pool, event.seq)]


async def baseline_health(host: str, port: int, period_s: float) -> float:
    """The original daemon's readiness check: probe every ``period_s``; time of the first 200."""
    loop = asyncio.get_running_loop()
    tick = loop.time()
    while True:
        result = await probe(host, port, "/health")
        if result.ok:
            return time.time()
        tick += period_s
        await asyncio.sleep(max(0.0, tick - loop.time()))  # the baseline's poll period


async def baseline_exit(pid: int, period_s: float) -> float:
    """The original daemon's exit check: look at the pid every ``period_s``; time it is seen gone."""
    loop = asyncio.get_running_loop()
    tick = loop.time()
    while pid_alive(pid):
        tick += period_s
        await asyncio.sleep(max(0.0, tick - loop.time()))  # the baseline's poll period
    return time.time()


@dataclass
class Samples:
    ready_ours: list[float] = field(default_factory=list)
    ready_base: list[float] = field(default_factory=list)
    exit_ours: list[float] = field(default_factory=list)
    exit_base: list[float] = field(default_factory=list)


async def one_run(i: int, rt: PoolRuntime, sink: StampingSink, tmp: Path, rng: random.Random, s: Samples) -> None:
    pool = f"r{i}"
    ready_file = tmp / f"{pool}.ready"
    load_time = rng.uniform(0.15, 0.6)
    config = PoolConfig(
        id=pool,
        engine="fake",
        extra_args=["--load-time", f"{load_time:.4f}", "--ready-file", str(ready_file)],
        model_bytes=1 << 30,
        load_timeout_s=WAIT_S,
        stop_grace_s=2.0,
        restart=RestartConfig(initial_s=60.0, max_s=60.0),  # no restart after the kill
    )
    rt.add_pool(config.definition(), simulated=True)

    # Both baselines start when the engine is spawned, exactly like the runtime's own prober.
    baselines: dict[str, asyncio.Task[float]] = {}

    def on_event(e: Event, _now: float) -> None:
        if e.pool == pool and isinstance(e.body, EngineSpawned) and not baselines:
            b = e.body
            baselines["health"] = asyncio.ensure_future(baseline_health("127.0.0.1", b.port, BASELINE_HEALTH_PERIOD_S))
            baselines["exit"] = asyncio.ensure_future(baseline_exit(b.pid, BASELINE_EXIT_PERIOD_S))

    sink.listeners.append(on_event)
    try:
        mark = len(sink.events)
        await rt.command(pool, PreloadCmd(command_id=f"{pool}-preload"))
        spawned_ev = await sink.wait_for(lambda e: e.pool == pool and isinstance(e.body, EngineSpawned), WAIT_S, mark)
        assert isinstance(spawned_ev.body, EngineSpawned)
        pid = spawned_ev.body.pid
        ready_ev = await sink.wait_for(
            lambda e: e.pool == pool and isinstance(e.body, StateChanged) and e.body.dst == "ready", WAIT_S, mark
        )
        healthy_at = float(ready_file.read_text())
        s.ready_ours.append(sink.stamp(ready_ev) - healthy_at)
        s.ready_base.append(await asyncio.wait_for(baselines["health"], WAIT_S) - healthy_at)

        # A random phase against the baseline's 200 ms exit poll.
        await asyncio.sleep(rng.uniform(0.0, BASELINE_EXIT_PERIOD_S))  # ok: sets the kill's phase
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        exited_ev = await sink.wait_for(
            lambda e: e.pool == pool and isinstance(e.body, EngineExited) and e.body.pid == pid, WAIT_S, mark
        )
        s.exit_ours.append(sink.stamp(exited_ev) - killed_at)
        s.exit_base.append(await asyncio.wait_for(baselines["exit"], WAIT_S) - killed_at)

        await rt.command(pool, StopCmd(command_id=f"{pool}-stop"))
    finally:
        sink.listeners.remove(on_event)
        for task in baselines.values():
            task.cancel()


class Breakdown:
    """Optional instrumentation (``--breakdown``): how long two synchronous calls that sit on the
    exit path block the event loop. Wraps module attributes; changes no behaviour."""

    def __init__(self) -> None:
        self.record_write: list[float] = []
        self.group_scan: list[float] = []

    def install(self) -> None:
        from pool_managerd.adapters import process

        write, scan = process.SpawnRecord._write, process.group_members

        def timed_write(record: process.SpawnRecord) -> None:
            t = time.perf_counter()
            try:
                write(record)
            finally:
                self.record_write.append(time.perf_counter() - t)

        def timed_scan(pgid: int) -> list[int]:
            t = time.perf_counter()
            try:
                return scan(pgid)
            finally:
                self.group_scan.append(time.perf_counter() - t)

        process.SpawnRecord._write = timed_write  # type: ignore[method-assign]
        process.group_members = timed_scan

    def report(self) -> str:
        lines = ["\nblocking calls on the event loop (ms):"]
        for name, values in (
            ("spawn record rewrite + fsync (SpawnRecord._write)", self.record_write),
            ("/proc scan for group members (group_members)", self.group_scan),
        ):
            if values:
                m = summary(values)
                lines.append(f"  {name}: n={len(values)} p50 {m['p50']:.2f} p90 {m['p90']:.2f} max {m['max']:.2f}")
        return "\n".join(lines)


def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation between closest ranks (q in [0, 100])."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": max(ms), "min": min(ms)}


def table(s: Samples) -> tuple[str, dict[str, dict[str, float]]]:
    rows = {
        "ready lag, ours": summary(s.ready_ours),
        f"ready lag, baseline (poll {BASELINE_HEALTH_PERIOD_S * 1000:.0f} ms)": summary(s.ready_base),
        "exit lag, ours": summary(s.exit_ours),
        f"exit lag, baseline (poll {BASELINE_EXIT_PERIOD_S * 1000:.0f} ms)": summary(s.exit_base),
    }
    names = list(rows)
    width = max(len(n) for n in names) + 2
    cols = ("min", "p50", "p90", "p99", "max")
    lines = [f"{'(ms)':<{width}}" + "".join(f"{c:>9}" for c in cols)]
    for n in names:
        lines.append(f"{n:<{width}}" + "".join(f"{rows[n][c]:>9.2f}" for c in cols))
    for what, ours, base in (("ready", names[0], names[1]), ("exit", names[2], names[3])):
        ratio = "".join(f"{(rows[base][c] / rows[ours][c] if rows[ours][c] > 0 else math.inf):>8.1f}x" for c in cols)
        lines.append(f"{f'{what}: baseline / ours':<{width}}" + ratio)
    return "\n".join(lines), rows


async def main_async(runs: int, seed: int, breakdown: Breakdown | None = None) -> int:
    snapshot = load_gpu_source("sim:hetero-24g-48g")
    rng = random.Random(seed)
    samples = Samples()
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-") as d:
        tmp = Path(d)
        sink = StampingSink()
        options = RuntimeOptions(node="bench", run_dir=tmp / "run", probe_options=dict(DAEMON_PROBE_OPTIONS))
        rt = PoolRuntime(sink, lambda: snapshot, options)
        t0 = time.monotonic()
        try:
            for i in range(runs):
                await one_run(i, rt, sink, tmp, rng, samples)
                if (i + 1) % 10 == 0:
                    print(f"  {i + 1}/{runs} runs ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        finally:
            await rt.close()

    text, rows = table(samples)
    ready, ready_b, exit_, exit_b = rows.values()  # in table order
    result = {
        "runs": runs,
        "ready_lag_p50_ms": round(ready["p50"], 2),
        "ready_lag_p90_ms": round(ready["p90"], 2),
        "ready_lag_p99_ms": round(ready["p99"], 2),
        "ready_lag_max_ms": round(ready["max"], 2),
        "exit_lag_p50_ms": round(exit_["p50"], 2),
        "exit_lag_p90_ms": round(exit_["p90"], 2),
        "exit_lag_p99_ms": round(exit_["p99"], 2),
        "exit_lag_max_ms": round(exit_["max"], 2),
        "baseline_ready_lag_p50_ms": round(ready_b["p50"], 2),
        "baseline_ready_lag_p99_ms": round(ready_b["p99"], 2),
        "baseline_exit_lag_p50_ms": round(exit_b["p50"], 2),
        "baseline_exit_lag_p99_ms": round(exit_b["p99"], 2),
        "probe_options": DAEMON_PROBE_OPTIONS,
        "baseline_health_period_ms": BASELINE_HEALTH_PERIOD_S * 1000,
        "baseline_exit_period_ms": BASELINE_EXIT_PERIOD_S * 1000,
    }
    missed = [k for k, limit in TARGETS.items() if result[k] > limit]
    result["targets_met"] = not missed

    print(f"\nlifecycle latency over {runs} runs (fake engine, probe options {DAEMON_PROBE_OPTIONS})\n")
    print(text)
    print("\ntargets: " + ", ".join(f"{k} <= {v:g}" for k, v in TARGETS.items()))
    print("all targets met" if not missed else f"MISSED: {', '.join(missed)}")
    if breakdown is not None:
        print(breakdown.report())
    print(json.dumps(result, separators=(",", ":")))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs (engines) to measure (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the load times and kill phases")
    parser.add_argument("--breakdown", action="store_true", help="also time the blocking calls on the engine exit path")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    breakdown = None
    if args.breakdown:
        breakdown = Breakdown()
        breakdown.install()
    return asyncio.run(main_async(args.runs, args.seed, breakdown))


if __name__ == "__main__":
    sys.exit(main())
