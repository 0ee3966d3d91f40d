"""Writes the golden event logs: scripted pool histories through the pure lifecycle that cover
every trigger of the table and every rejection. Run once per schema version; the committed
files are then frozen and CI replays them (``tests/unit/test_golden.py``).

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from pool_managerd.contract.messages import (
    SCHEMA_VERSION,
    DrainCmd,
    EngineInfo,
    EngineSpec,
    Event,
    HealthReport,
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
from pool_managerd.core.definitions import Context, PlanRejected, PlanRequest, PoolDefinition
from pool_managerd.core.fold import fold
from pool_managerd.core.machine import PoolMachine
from pool_managerd.lifecycle.supervision import RestartPolicy

HERE = Path(__file__).resolve().parent
GPU = "GPU-a6000ce1-0000-4000-8000-000000000048"


class Script:
    """Drives one node's lifecycle with a fake clock, pids and a switchable planner."""

    def __init__(self) -> None:
        self.now = 1_790_000_000.0
        self.refuse = False
        self.preflight_fails = False
        self.lc = PoolMachine("node-golden", self.plan)
        self.events: list[Event] = []
        self.pid = 4000
        self.timers: dict[tuple[str, str], int] = {}
        self.cid = 0

    def plan(self, req: PlanRequest) -> Placement | PlanRejected:
        if self.preflight_fails:
            problem = Problem(code="engine_missing", message="engine binary 'llama-server' not found")
            return PlanRejected("preflight_failed", problem.message, (problem,))
        if self.refuse:
            problem = Problem(code="insufficient_vram", message="GPU 0 has 1 GiB free, needs 8 GiB", device=GPU)
            return PlanRejected("placement_failed", problem.message, (problem,))
        return Placement(mask=[GPU], uuids=[GPU], cuda_visible_devices=GPU, budgets=[8 << 30], ratios=[1.0],
                         policy="free", explanation=["one device"], simulated=True)  # fmt: skip

    def ctx(self, new_lease_id: str | None = None) -> Context:
        self.now += 0.25
        return Context(now=self.now, rand=0.5, new_lease_id=new_lease_id)

    def take(self, pool: str, outcome: object) -> None:
        from pool_managerd.core.effects import ArmTimer
        from pool_managerd.core.pool_model import Outcome

        assert isinstance(outcome, Outcome)
        self.events += outcome.events
        for eff in outcome.effects:
            if isinstance(eff, ArmTimer):
                self.timers[(pool, eff.name)] = eff.token

    def add(self, pool: str, slots: int = 1, model: str = "m") -> None:
        spec = EngineSpec(argv=["llama-server", "--model", "{model}", "--port", "{port}"], model=model, slots=slots,
                          load_timeout_s=30.0, probe_failure_threshold=3)  # fmt: skip
        policy = RestartPolicy(initial_s=1.0, max_consecutive_failures=3, max_restarts=10, window_s=60.0)
        self.lc.register(PoolDefinition(pool=pool, spec=spec, restart=policy), simulated=True)

    def cmd(self, pool: str, cmd: object, new_lease_id: str | None = None) -> object:
        """Apply ``cmd``; a lease the daemon grants gets the id the shell drew (``new_lease_id``)."""
        out = self.lc.command(pool, cmd, self.ctx(new_lease_id))  # type: ignore[arg-type]
        self.take(pool, out)
        return out.reply

    def next_id(self) -> str:
        self.cid += 1
        return f"cmd-{self.cid}"

    def preload(self, pool: str, **kw: object) -> object:
        return self.cmd(pool, PreloadCmd(command_id=self.next_id(), **kw))  # type: ignore[arg-type]

    def spawned(self, pool: str) -> int:
        self.pid += 1
        info = EngineInfo(pid=self.pid, pgid=self.pid, port=20000 + self.pid % 1000, started_at=self.now,
                          argv=["llama-server"])  # fmt: skip
        self.take(pool, self.lc.engine_spawned(pool, info, GPU, self.ctx()))
        return self.pid

    def health(self, pool: str, *, ok: bool, loading: bool = False) -> None:
        ctx = self.ctx()
        report = HealthReport(pool=pool, ts=ctx.now, ok=ok, loading=loading, status=200 if ok else None)
        self.take(pool, self.lc.health(pool, report, ctx))

    def ready(self, pool: str) -> int:
        pid = self.spawned(pool)
        self.health(pool, ok=False, loading=True)
        self.health(pool, ok=True)
        return pid

    def exited(self, pool: str, pid: int, code: int | None = 1) -> None:
        self.take(pool, self.lc.engine_exited(pool, pid, code, None, self.ctx()))

    def timer(self, pool: str, name: str) -> None:
        token = self.timers[(pool, name)]
        self.take(pool, self.lc.timer_fired(pool, name, token, self.ctx()))  # type: ignore[arg-type]


def scenario() -> Script:
    s = Script()
    for pool in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
        s.add(pool)
    # alpha: rejections, leases, a forced drain.
    s.refuse = True
    s.preload("alpha")  # preload_rejected: placement_failed
    s.refuse = False
    s.preflight_fails = True
    s.preload("alpha")  # preload_rejected: preflight_failed
    s.preflight_fails = False
    s.cmd("alpha", DrainCmd(command_id=s.next_id()))  # illegal in unready
    s.preload("alpha")
    s.ready("alpha")
    s.cmd("alpha", LeaseCmd(command_id=s.next_id(), ttl_s=600), new_lease_id="l1")
    s.cmd("alpha", LeaseCmd(command_id=s.next_id(), ttl_s=600), new_lease_id="l2")  # no_slots
    s.cmd("alpha", ReleaseCmd(command_id=s.next_id(), lease_id="nope"))  # unknown_lease
    s.cmd("alpha", DrainCmd(command_id=s.next_id(), deadline_s=5))
    s.cmd("alpha", LeaseCmd(command_id=s.next_id()), new_lease_id="l3")  # draining
    s.timer("alpha", "drain_deadline")  # drain_deadline -> unready, drain_forced
    s.cmd("alpha", LeaseCmd(command_id=s.next_id()), new_lease_id="l4")  # not_ready
    # beta: load timeout, crash during load, re-placement failure into failed, reset, crash in
    # ready, a re-placement failure that retries.
    s.preload("beta")
    s.spawned("beta")
    s.timer("beta", "load_timeout")  # preload_failed -> restarting (1)
    s.timer("beta", "backoff")  # backoff_elapsed -> preloading
    pid = s.spawned("beta")
    s.exited("beta", pid, 3)  # preload_failed (exit during load) -> restarting (2)
    s.refuse = True
    s.timer("beta", "backoff")  # re-placement fails: the third failure -> failed
    s.refuse = False
    s.cmd("beta", PreloadCmd(command_id=s.next_id()))  # illegal in failed
    s.cmd("beta", ResetCmd(command_id=s.next_id()))
    s.preload("beta")
    pid = s.ready("beta")
    s.exited("beta", pid, 139)  # engine_exited -> restarting
    s.refuse = True
    s.timer("beta", "backoff")  # backoff_elapsed -> restarting (another try)
    s.refuse = False
    s.timer("beta", "backoff")
    s.ready("beta")
    s.cmd("beta", StopCmd(command_id=s.next_id()))
    # epsilon: crash loop ending in lost health -> failed, then stop from failed.
    s.preload("epsilon")
    for _ in range(2):
        pid = s.ready("epsilon")
        s.exited("epsilon", pid, 1)
        s.timer("epsilon", "backoff")
    s.ready("epsilon")
    for _ in range(3):
        s.health("epsilon", ok=False)  # the third failure of the pool -> failed
    s.cmd("epsilon", StopCmd(command_id=s.next_id()))
    # zeta: a crash loop of a ready engine -> failed.
    s.preload("zeta")
    for _ in range(3):
        pid = s.ready("zeta")
        s.exited("zeta", pid, 1)
        if s.lc.state("zeta") == "restarting":
            s.timer("zeta", "backoff")
    # gamma: health lost, stop while restarting, reload success, reload rollback, reload abort.
    s.preload("gamma")
    s.ready("gamma")
    for _ in range(3):
        s.health("gamma", ok=False)  # health_lost on the third
    s.cmd("gamma", StopCmd(command_id=s.next_id()))  # stop from restarting
    s.preload("gamma")
    s.ready("gamma")
    s.cmd("gamma", ReloadCmd(command_id=s.next_id()))  # same spec: no-op
    s.cmd("gamma", ReloadCmd(command_id=s.next_id(), model="m2"))  # drain at once -> preloading
    pid = s.spawned("gamma")
    s.exited("gamma", pid, 2)  # reload failed -> rolled back
    s.timer("gamma", "backoff")
    s.ready("gamma")
    s.cmd("gamma", LeaseCmd(command_id=s.next_id(), ttl_s=1), new_lease_id="g1")
    s.cmd("gamma", ReloadCmd(command_id=s.next_id(), model="m3", deadline_s=30))
    s.timer("gamma", "drain_deadline")  # reload aborted -> ready
    s.now += 5.0
    s.timer("gamma", "lease_expiry")
    s.cmd("gamma", ReloadCmd(command_id=s.next_id(), model="m4"))
    s.ready("gamma")
    # delta: drain while preloading, stop while preloading / draining / failed, drained by release.
    s.preload("delta")
    s.cmd("delta", DrainCmd(command_id=s.next_id()))
    s.preload("delta")
    s.spawned("delta")
    s.cmd("delta", StopCmd(command_id=s.next_id()))
    s.preload("delta")
    s.ready("delta")
    s.cmd("delta", LeaseCmd(command_id=s.next_id()), new_lease_id="d1")
    s.cmd("delta", DrainCmd(command_id=s.next_id(), deadline_s=60))
    s.cmd("delta", ReleaseCmd(command_id=s.next_id(), lease_id="d1"))  # drained by release
    s.preload("delta")
    s.ready("delta")
    s.cmd("delta", LeaseCmd(command_id=s.next_id()), new_lease_id="d2")
    s.cmd("delta", DrainCmd(command_id=s.next_id(), deadline_s=60))
    s.cmd("delta", StopCmd(command_id=s.next_id()))  # stop from draining
    s.preload("delta")
    pid = s.spawned("delta")
    for code in (1, 1, 1):
        s.exited("delta", pid, code)
        if s.lc.state("delta") == "restarting":
            s.timer("delta", "backoff")
            pid = s.spawned("delta")
    s.cmd("delta", StopCmd(command_id=s.next_id()))  # stop from failed
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
