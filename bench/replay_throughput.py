"""Replay throughput: decode alone (the floor) vs full replay (decode + fold through the lifecycle
table + invariant checks), over a synthetic log of >= 1,000,000 events across 1,000 pools.

    .venv/bin/python bench/replay_throughput.py [--events N] [--pools P]

The log is generated with realistic shapes (state changes with placements, spawns, health
flips, leases, crashes and restarts) by cycling each pool through a legal history. Both
measurements read the same bytes in the same run; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    BackoffScheduled,
    EngineExited,
    EngineSpawned,
    Event,
    EventBody,
    HealthChanged,
    LeaseGranted,
    LeaseReleased,
    Placement,
    StateChanged,
    encode,
)
from pool_managerd.core.fold import Fold
from pool_managerd.core.upcast import decode_event

GPU = "GPU-a6000ce1-0000-4000-8000-000000000048"
PLACEMENT = Placement(mask=[GPU], uuids=[GPU], cuda_visible_devices=GPU, budgets=[8 << 30], ratios=[1.0],
                      policy="free", explanation=["mask auto: most free memory"], simulated=True)  # fmt: skip


def cycle(pid: int) -> list[EventBody]:
    """One legal pass of a pool's life: preload, ready, lease, crash, restart, ready, stop."""
    return [
        StateChanged(trigger="preload", src="unready", dst="preloading", placement=PLACEMENT, deadline_at=1.0),
        EngineSpawned(
            pid=pid, pgid=pid, port=30000, argv=["llama-server", "--port", "30000"], cuda_visible_devices=GPU
        ),
        HealthChanged(live=True, ready=False),
        HealthChanged(live=True, ready=True),
        StateChanged(trigger="engine_ready", src="preloading", dst="ready", reason="first healthy probe"),
        LeaseGranted(lease_id=f"l{pid}", expires_at=2.0, active=1),
        LeaseReleased(lease_id=f"l{pid}", active=0),
        EngineExited(pid=pid, exit_code=139, during="ready"),
        StateChanged(
            trigger="engine_exited",
            src="ready",
            dst="restarting",
            reason="engine exited (exit code 139)",
            delay_s=1.02,
            exit_code=139,
            attempt=1,
        ),
        BackoffScheduled(delay_s=1.02, attempt=1, reason="engine exited (exit code 139)"),
        StateChanged(trigger="backoff_elapsed", src="restarting", dst="preloading", placement=PLACEMENT),
        EngineSpawned(pid=pid + 1, pgid=pid + 1, port=30001, argv=["llama-server"], cuda_visible_devices=GPU),
        StateChanged(trigger="engine_ready", src="preloading", dst="ready", reason="first healthy probe"),
        StateChanged(trigger="stop", src="ready", dst="unready", reason="stop command"),
        EngineExited(pid=pid + 1, exit_code=0, expected=True, during="unready"),
    ]


def generate(n_events: int, n_pools: int) -> list[bytes]:
    """Encoded events, interleaved across pools as a live stream would be."""
    seqs = [0] * n_pools
    lines: list[bytes] = []
    pid = 1000
    ts = 1_790_000_000.0
    per_cycle = len(cycle(0))
    while len(lines) < n_events:
        bodies = [cycle(pid + 2 * p) for p in range(n_pools)]
        pid += 2 * n_pools
        for i in range(per_cycle):
            for p in range(n_pools):
                seqs[p] += 1
                ts += 0.001
                ev = Event(v=SCHEMA_VERSION, seq=seqs[p], ts=ts, node="node-1", pool=f"pool-{p:04d}",
                           command_id=None, body=bodies[p][i])  # fmt: skip
                lines.append(encode(ev))
        if len(lines) >= n_events:
            break
    return lines


def decode_only(lines: list[bytes]) -> float:
    t0 = time.perf_counter()
    for line in lines:
        decode_event(line)
    return time.perf_counter() - t0


def full_replay(lines: list[bytes]) -> tuple[float, Fold]:
    t0 = time.perf_counter()
    fold = Fold(expect_start=True)
    apply = fold.apply
    for line in lines:
        apply(decode_event(line))
    return time.perf_counter() - t0, fold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    lines = generate(args.events, args.pools)
    gen_s = time.perf_counter() - t0
    n = len(lines)
    size_mb = sum(len(x) for x in lines) / 1e6
    print(f"synthetic log: {n:,} events over {args.pools:,} pools, {size_mb:.1f} MB JSON (generated in {gen_s:.1f} s)")

    gc.collect()
    # Interleave the two measurements and keep each one's best, so drift hits both alike.
    decode_times, replay_times = [], []
    fold: Fold | None = None
    for _ in range(args.repeats):
        decode_times.append(decode_only(lines))
        elapsed, fold = full_replay(lines)
        replay_times.append(elapsed)
    assert fold is not None
    if fold.violations:
        raise SystemExit(f"synthetic log broke an invariant: {fold.violations[0]}")
    states = {}
    for view in fold.views.values():
        states[view.state] = states.get(view.state, 0) + 1

    d, r = min(decode_times), min(replay_times)
    decode_eps, replay_eps = n / d, n / r
    ratio = decode_eps / replay_eps
    print()
    print(f"{'measurement':<38}{'best s':>10}{'events/s':>14}")
    print(f"{'decode only (msgspec, the floor)':<38}{d:>10.3f}{decode_eps:>14,.0f}")
    print(f"{'full replay (decode + fold + checks)':<38}{r:>10.3f}{replay_eps:>14,.0f}")
    print(f"{'ratio decode/replay':<38}{ratio:>24.2f}")
    print(f"final states: {states}; violations: {len(fold.violations)}")
    print("targets: replay >= 200,000 events/s, ratio <= 5")
    print(json.dumps({
        "events": n,
        "pools": args.pools,
        "decode_events_per_s": round(decode_eps),
        "replay_events_per_s": round(replay_eps),
        "ratio": round(ratio, 3),
        "repeats": args.repeats,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
