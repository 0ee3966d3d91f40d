"""Writes the golden event logs: scripted pool histories through the pure lifecycle that cover
every trigger of the table and every rejection. Run once per schema version; the committed
files are then frozen and CI replays them (``tests/unit/test_golden.py``).

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    DrainCmd,
    EngineInfo,
    EngineSpec,
    LeaseCmd,
    Placement,
    PreloadCmd,
    Problem,
    ReleaseCmd,
    ReloadCmd,
    ResetCmd,
    StopCmd,
    encode,
)
from pool_managerd.core.definitions import PlanRejected, PoolDefinition
from pool_managerd.core.fold import fold
from pool_managerd.lifecycle.supervision import RestartPolicy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a file: the tests' support package is beside it
from support.lifecycle_harness import LifecycleHarness  # noqa: E402

GPU = "GPU-a6000ce1-0000-4000-8000-000000000048"
PLACED = Placement(mask=[GPU], uuids=[GPU], cuda_visible_devices=GPU, budgets=[8 << 30], ratios=[1.0],
                   policy="free", explanation=["one device"], simulated=True)  # fmt: skip
_MISSING = Problem(code="engine_missing", message="engine binary 'llama-server' not found")
PREFLIGHT_FAILS = PlanRejected("preflight_failed", _MISSING.message, (_MISSING,))
_FULL = Problem(code="insufficient_vram", message="GPU 0 has 1 GiB free, needs 8 GiB", device=GPU)
REFUSED = PlanRejected("placement_failed", _FULL.message, (_FULL,))


def golden_engine(pid: int, now: float) -> EngineInfo:
    return EngineInfo(pid=pid, pgid=pid, port=20000 + pid % 1000, started_at=now, argv=["llama-server"])


class Script(LifecycleHarness):
    """One node's lifecycle with a fake clock (a quarter second per input), pids from 4001 and a
    plan the scenario switches; command ids are counted."""

    def __init__(self) -> None:
        super().__init__("node-golden", plan=PLACED, now=1_790_000_000.0, tick=0.25, pid=4000, gpu=GPU,
                         engine=golden_engine)  # fmt: skip
        self.cid = 0

    def add(self, pool: str) -> None:
        spec = EngineSpec(argv=["llama-server", "--model", "{model}", "--port", "{port}"], model="m", slots=1,
                          load_timeout_s=30.0, probe_failure_threshold=3)  # fmt: skip
        policy = RestartPolicy(initial_s=1.0, max_consecutive_failures=3, max_restarts=10, window_s=60.0)
        self.register(PoolDefinition(pool=pool, spec=spec, restart=policy), simulated=True)

    def next_id(self) -> str:
        self.cid += 1
        return f"cmd-{self.cid}"

    def preload(self, pool: str) -> None:
        self.cmd(PreloadCmd(command_id=self.next_id()), pool)

    def health(self, pool: str, *, ok: bool, loading: bool = False) -> None:
        """A probe's report as the daemon's prober makes it: HTTP 200 when healthy, no pid."""
        self.probe(None, ok=ok, loading=loading, status=200 if ok else None, pool=pool)

    def ready(self, pool: str) -> int:
        pid = self.spawned_pid(pool)
        self.health(pool, ok=False, loading=True)
        self.health(pool, ok=True)
        return pid


def scenario() -> Script:
    s = Script()
    for pool in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
        s.add(pool)
    # alpha: rejections, leases, a forced drain.
    s.plan = REFUSED
    s.preload("alpha")  # preload_rejected: placement_failed
    s.plan = PREFLIGHT_FAILS
    s.preload("alpha")  # preload_rejected: preflight_failed
    s.plan = PLACED
    s.cmd(DrainCmd(command_id=s.next_id()), "alpha")  # illegal in unready
    s.preload("alpha")
    s.ready("alpha")
    s.cmd(LeaseCmd(command_id=s.next_id(), ttl_s=600), "alpha", new_lease_id="l1")
    s.cmd(LeaseCmd(command_id=s.next_id(), ttl_s=600), "alpha", new_lease_id="l2")  # no_slots
    s.cmd(ReleaseCmd(command_id=s.next_id(), lease_id="nope"), "alpha")  # unknown_lease
    s.cmd(DrainCmd(command_id=s.next_id(), deadline_s=5), "alpha")
    s.cmd(LeaseCmd(command_id=s.next_id()), "alpha", new_lease_id="l3")  # draining
    s.fire("drain_deadline", "alpha")  # drain_deadline -> unready, drain_forced
    s.cmd(LeaseCmd(command_id=s.next_id()), "alpha", new_lease_id="l4")  # not_ready
    # beta: load timeout, crash during load, re-placement failure into failed, reset, crash in
    # ready, a re-placement failure that retries.
    s.preload("beta")
    s.spawned_pid("beta")
    s.fire("load_timeout", "beta")  # preload_failed -> restarting (1)
    s.fire("backoff", "beta")  # backoff_elapsed -> preloading
    pid = s.spawned_pid("beta")
    s.exited(pid, 3, pool="beta")  # preload_failed (exit during load) -> restarting (2)
    s.plan = REFUSED
    s.fire("backoff", "beta")  # re-placement fails: the third failure -> failed
    s.plan = PLACED
    s.cmd(PreloadCmd(command_id=s.next_id()), "beta")  # illegal in failed
    s.cmd(ResetCmd(command_id=s.next_id()), "beta")
    s.preload("beta")
    pid = s.ready("beta")
    s.exited(pid, 139, pool="beta")  # engine_exited -> restarting
    s.plan = REFUSED
    s.fire("backoff", "beta")  # backoff_elapsed -> restarting (another try)
    s.plan = PLACED
    s.fire("backoff", "beta")
    s.ready("beta")
    s.cmd(StopCmd(command_id=s.next_id()), "beta")
    # epsilon: crash loop ending in lost health -> failed, then stop from failed.
    s.preload("epsilon")
    for _ in range(2):
        pid = s.ready("epsilon")
        s.exited(pid, 1, pool="epsilon")
        s.fire("backoff", "epsilon")
    s.ready("epsilon")
    for _ in range(3):
        s.health("epsilon", ok=False)  # the third failure of the pool -> failed
    s.cmd(StopCmd(command_id=s.next_id()), "epsilon")
    # zeta: a crash loop of a ready engine -> failed.
    s.preload("zeta")
    for _ in range(3):
        pid = s.ready("zeta")
        s.exited(pid, 1, pool="zeta")
        if s.state("zeta") == "restarting":
            s.fire("backoff", "zeta")
    # gamma: health lost, stop while restarting, reload success, reload rollback, reload abort.
    s.preload("gamma")
    s.ready("gamma")
    for _ in range(3):
        s.health("gamma", ok=False)  # health_lost on the third
    s.cmd(StopCmd(command_id=s.next_id()), "gamma")  # stop from restarting
    s.preload("gamma")
    s.ready("gamma")
    s.cmd(ReloadCmd(command_id=s.next_id()), "gamma")  # same spec: no-op
    s.cmd(ReloadCmd(command_id=s.next_id(), model="m2"), "gamma")  # drain at once -> preloading
    pid = s.spawned_pid("gamma")
    s.exited(pid, 2, pool="gamma")  # reload failed -> rolled back
    s.fire("backoff", "gamma")
    s.ready("gamma")
    s.cmd(LeaseCmd(command_id=s.next_id(), ttl_s=1), "gamma", new_lease_id="g1")
    s.cmd(ReloadCmd(command_id=s.next_id(), model="m3", deadline_s=30), "gamma")
    s.fire("drain_deadline", "gamma")  # reload aborted -> ready
    s.now += 5.0
    s.fire("lease_expiry", "gamma")
    s.cmd(ReloadCmd(command_id=s.next_id(), model="m4"), "gamma")
    s.ready("gamma")
    # delta: drain while preloading, stop while preloading / draining / failed, drained by release.
    s.preload("delta")
    s.cmd(DrainCmd(command_id=s.next_id()), "delta")
    s.preload("delta")
    s.spawned_pid("delta")
    s.cmd(StopCmd(command_id=s.next_id()), "delta")
    s.preload("delta")
    s.ready("delta")
    s.cmd(LeaseCmd(command_id=s.next_id()), "delta", new_lease_id="d1")
    s.cmd(DrainCmd(command_id=s.next_id(), deadline_s=60), "delta")
    s.cmd(ReleaseCmd(command_id=s.next_id(), lease_id="d1"), "delta")  # drained by release
    s.preload("delta")
    s.ready("delta")
    s.cmd(LeaseCmd(command_id=s.next_id()), "delta", new_lease_id="d2")
    s.cmd(DrainCmd(command_id=s.next_id(), deadline_s=60), "delta")
    s.cmd(StopCmd(command_id=s.next_id()), "delta")  # stop from draining
    s.preload("delta")
    pid = s.spawned_pid("delta")
    for code in (1, 1, 1):
        s.exited(pid, code, pool="delta")
        if s.state("delta") == "restarting":
            s.fire("backoff", "delta")
            pid = s.spawned_pid("delta")
    s.cmd(StopCmd(command_id=s.next_id()), "delta")  # stop from failed
    return s


def main() -> None:
    s = scenario()
    log = HERE / f"v{SCHEMA_VERSION}_all_triggers.jsonl"
    log.write_text("".join(encode(e).decode() + "\n" for e in s.events))
    result = fold(s.events, expect_start=True)
    assert not result.violations, result.violations
    expected = {
        pool: {"state": v.state, "seq": v.seq, "restarts": v.restarts, "crashes": v.crashes,
               "engine_pid": v.engine.pid if v.engine else None}
        for pool, v in sorted(result.views.items())
    }  # fmt: skip
    for entry in s.lc.registry:
        live = {"state": entry.state, "seq": entry.seq, "restarts": entry.restarts, "crashes": entry.crashes,
                "engine_pid": entry.engine.pid if entry.engine else None}  # fmt: skip
        assert expected[entry.pool] == live, (entry.pool, expected[entry.pool], live)
    (HERE / f"v{SCHEMA_VERSION}_all_triggers.expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {len(s.events)} events; {msgspec.json.encode(expected).decode()}")


if __name__ == "__main__":
    main()
