"""The engine lifecycle end to end: PoolRuntime (no NATS) driving REAL fake-engine processes.

Every test builds a runtime over a simulated GPU inventory, sends commands straight to
``PoolRuntime.command`` and waits on the in-memory event log with deadlines (no blind sleeps).
After every test no child process of the test runner, and no recorded grandchild, may survive.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pool_managerd.adapters.engines.ports import allocate_port
from pool_managerd.adapters.engines.procs import pid_alive, wait_pid_exit
from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.http_probe import http_get
from pool_managerd.config import PoolConfig, RestartConfig
from pool_managerd.contract.messages import (
    Accepted,
    BackoffScheduled,
    DrainCmd,
    DrainForced,
    EngineExited,
    EngineSpawned,
    Event,
    GpuSnapshot,
    HealthChanged,
    LeaseCmd,
    LeaseExpired,
    PoolCommand,
    PreloadCmd,
    Rejected,
    ReloadCmd,
    ReloadRolledBack,
    ResetCmd,
    RestartLimitReached,
    StateChanged,
    StatusCmd,
    StatusReply,
    StopCmd,
)
from pool_managerd.lifecycle.supervision import backoff_delay
from pool_managerd.runtime.pools import PROBE_OPTIONS, PoolRuntime, RuntimeOptions
from pool_managerd.testing.memory_sink import MemoryEventSink
from support.deadlines import POOL_S
from support.procs import track_pid

"""Upper bound for any single wait on an event (2 loaded cores start a Python engine in ~0.3 s)."""

DAEMON_PROBE_OPTIONS: dict[str, Any] = dict(PROBE_OPTIONS)
"""What the daemon passes (runtime/daemon.py)."""

SNAPSHOT: GpuSnapshot = load_gpu_source("sim:hetero-24g-48g")
GPU_24G, GPU_48G = (g.uuid for g in SNAPSHOT.gpus)

# A restart policy that never restarts within a test: the pool stays in ``restarting``.
NO_RESTART = RestartConfig(initial_s=60.0, max_s=60.0)

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Harness
# ----------------------------------------------------------------------------------------------


class RecordingRandom(random.Random):
    """A seeded RNG that remembers every ``random()`` draw (the runtime draws one per step)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[float] = []

    def random(self) -> float:
        x = super().random()
        self.draws.append(x)
        return x


class StampedSink(MemoryEventSink):
    """Remembers, per event, the wall-clock time of its append and the RNG draw of its step."""

    def __init__(self, rng: RecordingRandom) -> None:
        super().__init__()
        self.rng = rng
        self.received: dict[tuple[str | None, int], float] = {}
        self.draw: dict[tuple[str | None, int], float | None] = {}

    async def append(self, pool: str, events: Sequence[Event]) -> None:
        now = time.time()
        draw = self.rng.draws[-1] if self.rng.draws else None
        for e in events:
            self.received[(e.pool, e.seq)] = now
            self.draw[(e.pool, e.seq)] = draw
        await super().append(pool, events)


@dataclass
class Harness:
    rt: PoolRuntime
    sink: StampedSink
    rng: RecordingRandom
    tmp: Path
    configs: dict[str, PoolConfig] = field(default_factory=dict)
    after_ready: int = 0

    def add(self, pool: str = "p", *, knobs: Sequence[str] = (), **cfg: Any) -> PoolConfig:
        cfg.setdefault("load_timeout_s", POOL_S)
        config = PoolConfig(id=pool, engine="fake", extra_args=list(knobs), model_bytes=1 << 30, **cfg)
        self.rt.add_pool(config.definition(), simulated=True)
        self.configs[pool] = config
        return config

    def mark(self) -> int:
        """Index of the next event: pass as ``start`` to wait only for what comes after now."""
        return len(self.sink.events)

    async def send(self, cmd: PoolCommand, pool: str = "p") -> Accepted:
        reply = await self.rt.command(pool, cmd)
        assert isinstance(reply, Accepted), reply
        return reply

    async def status(self, pool: str = "p") -> StatusReply:
        reply = await self.rt.command(pool, StatusCmd(command_id=f"status-{time.monotonic_ns()}"))
        assert isinstance(reply, StatusReply)
        return reply

    async def wait(self, predicate: Callable[[Event], bool], start: int = 0, timeout: float = POOL_S) -> Event:
        try:
            return await self.sink.wait_for(predicate, timeout, start)
        except TimeoutError:
            seen = "\n  ".join(_describe(e) for e in self.sink.events[start:])
            pytest.fail(f"no matching event within {timeout} s; events since {start}:\n  {seen}\n{self.logs()}")

    async def state(self, dst: str, start: int = 0, *, trigger: str | None = None, pool: str = "p") -> StateChanged:
        def match(e: Event) -> bool:
            b = e.body
            return (
                e.pool == pool
                and isinstance(b, StateChanged)
                and b.dst == dst
                and (trigger is None or b.trigger == trigger)
            )

        event = await self.wait(match, start)
        assert isinstance(event.body, StateChanged)
        return event.body

    async def body(self, kind: type[T], start: int = 0, where: Callable[[T], bool] = lambda _b: True) -> T:
        event = await self.wait(lambda e: isinstance(e.body, kind) and where(e.body), start)
        body = event.body
        assert isinstance(body, kind)
        return body

    async def event(self, kind: type[Any], start: int = 0, where: Callable[[Any], bool] = lambda _b: True) -> Event:
        return await self.wait(lambda e: isinstance(e.body, kind) and where(e.body), start)

    def stamp(self, event: Event) -> float:
        return self.sink.received[(event.pool, event.seq)]

    def bodies(self, kind: type[T], start: int = 0) -> list[T]:
        return [e.body for e in self.sink.events[start:] if isinstance(e.body, kind)]

    def logs(self) -> str:
        path = self.rt.log_path("p")
        return f"engine log:\n{path.read_text(errors='replace')}" if path.exists() else "(no engine log)"

    async def ready(self, pool: str = "p", **preload: Any) -> EngineSpawned:
        """Preload ``pool`` and wait until it is ready; returns the engine it runs. Afterwards
        ``after_ready`` is the index of the event that follows the ready transition (what an
        engine does right after it became ready may already be logged when this returns)."""
        mark = self.mark()
        await self.send(PreloadCmd(command_id=f"preload-{mark}", **preload), pool)
        spawned = await self.body(EngineSpawned, mark)
        ready = await self.wait(
            lambda e: e.pool == pool and isinstance(e.body, StateChanged) and e.body.dst == "ready", mark
        )
        self.after_ready = next(i for i, e in enumerate(self.sink.events) if e is ready) + 1
        return spawned


def _describe(e: Event) -> str:
    fields = {k: getattr(e.body, k) for k in e.body.__struct_fields__ if k not in ("placement", "spec")}
    return f"#{e.seq} {e.type} {fields}"


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Harness]]:
    """``make(tmp, **probe_options)`` builds a runtime; every one is closed at teardown."""
    made: list[Harness] = []

    def build(tmp: Path, seed: int = 1234, **probe_options: Any) -> Harness:
        rng = RecordingRandom(seed)
        sink = StampedSink(rng)
        options = RuntimeOptions(
            node="n1", run_dir=tmp / "run", probe_options={**DAEMON_PROBE_OPTIONS, **probe_options}, rng=rng
        )
        h = Harness(PoolRuntime(sink, lambda: SNAPSHOT, options), sink, rng, tmp)
        made.append(h)
        return h

    try:
        yield build
    finally:
        for h in made:
            await h.rt.close()


@pytest.fixture
def h(make: Callable[..., Harness], tmp_path: Path) -> Harness:
    return make(tmp_path)


async def _wait_dead(pid: int, within_s: float = POOL_S) -> None:
    assert await wait_pid_exit(pid, within_s), f"pid {pid} still alive after {within_s} s"


def _stopped_at_once(exited: EngineExited) -> bool:
    """A stop with grace 0 sends SIGTERM then SIGKILL back to back: either may end the engine
    (SIGTERM kills it outright before its handler is installed, or its handler exits 0)."""
    return exited.signal in (signal.SIGTERM, signal.SIGKILL) or exited.exit_code == 0


async def _props(spawned: EngineSpawned) -> dict[str, Any]:
    resp = await http_get("127.0.0.1", spawned.port, "/props")
    assert resp.status == 200
    props: dict[str, Any] = json.loads(resp.body)
    return props


# ----------------------------------------------------------------------------------------------
# Preload
# ----------------------------------------------------------------------------------------------


async def test_preload_becomes_ready(h: Harness) -> None:
    h.add(knobs=["--load-time", "0.1"])
    spawned = await h.ready()

    changes = h.bodies(StateChanged)
    assert [(c.trigger, c.src, c.dst) for c in changes] == [
        ("preload", "unready", "preloading"),
        ("engine_ready", "preloading", "ready"),
    ]
    assert pid_alive(spawned.pid)
    assert spawned.pgid == spawned.pid  # own process group
    snap = (await h.status()).pool
    assert snap.state == "ready" and snap.health_ready
    assert snap.engine is not None and snap.engine.pid == spawned.pid
    props = await _props(spawned)
    assert props["pid"] == spawned.pid
    # The engine answered 503 while loading: the pool was live before it was ready.
    health = h.bodies(HealthChanged)
    assert health[-1].ready and health[-1].live


async def test_load_timeout_restarts(h: Harness) -> None:
    h.add(knobs=["--load-time", "30"], load_timeout_s=0.3, restart=NO_RESTART)
    mark = h.mark()
    await h.send(PreloadCmd(command_id="c1"))
    preloading = await h.event(StateChanged, mark, lambda b: b.dst == "preloading")
    spawned = await h.body(EngineSpawned, mark)
    restarting = await h.event(StateChanged, mark, lambda b: b.dst == "restarting")

    assert isinstance(restarting.body, StateChanged)
    assert restarting.body.trigger == "preload_failed"
    assert "load timeout" in restarting.body.reason
    assert restarting.ts - preloading.ts >= 0.3 - 0.005
    backoff = await h.body(BackoffScheduled, mark)
    assert backoff.attempt == 1 and "load timeout" in backoff.reason
    # The engine that did not load in time is stopped at once (grace 0): an expected exit.
    exited = await h.body(EngineExited, mark, lambda b: b.pid == spawned.pid)
    assert exited.expected and _stopped_at_once(exited)
    assert (await h.status()).pool.state == "restarting"


async def test_crash_during_load_restarts(h: Harness) -> None:
    h.add(knobs=["--load-time", "30", "--crash-after", "0.05", "--exit-code", "3"], restart=NO_RESTART)
    mark = h.mark()
    await h.send(PreloadCmd(command_id="c1"))
    spawned = await h.body(EngineSpawned, mark)
    exited = await h.body(EngineExited, mark)
    restarting = await h.state("restarting", mark)

    assert exited.pid == spawned.pid and exited.exit_code == 3
    assert not exited.expected and exited.during == "preloading"
    assert restarting.trigger == "preload_failed" and restarting.exit_code == 3
    assert "exited during load" in restarting.reason
    snap = (await h.status()).pool
    assert snap.state == "restarting" and snap.crashes == 1 and snap.engine is None


# ----------------------------------------------------------------------------------------------
# Supervision
# ----------------------------------------------------------------------------------------------


async def test_crash_in_ready_restarts_after_computed_backoff(h: Harness) -> None:
    restart = RestartConfig(initial_s=0.2, max_s=1.0, jitter=0.1)
    config = h.add(knobs=["--load-time", "0.05", "--crash-after-ready", "0.1", "--exit-code", "7"], restart=restart)
    first = await h.ready()
    mark = h.after_ready
    exited = await h.body(EngineExited, mark)
    assert exited.pid == first.pid and exited.exit_code == 7 and not exited.expected and exited.during == "ready"
    restarting = await h.state("restarting", mark, trigger="engine_exited")
    backoff_event = await h.event(BackoffScheduled, mark)
    backoff = backoff_event.body
    assert isinstance(backoff, BackoffScheduled)

    # The delay is exactly what supervision computes for the draw the runtime made for this step.
    draw = h.sink.draw[(backoff_event.pool, backoff_event.seq)]
    assert draw is not None
    policy = config.restart.policy()
    assert backoff.attempt == 1
    assert backoff.delay_s == pytest.approx(backoff_delay(policy, 1, draw), abs=1e-12)
    assert restarting.delay_s == backoff.delay_s
    assert 0.2 * 0.9 <= backoff.delay_s <= 0.2 * 1.1

    # The restart comes no earlier than the delay, and a new engine (new pid) becomes ready.
    elapsed = await h.event(StateChanged, mark, lambda b: b.trigger == "backoff_elapsed")
    assert elapsed.ts - backoff_event.ts >= backoff.delay_s - 0.005
    second = await h.body(EngineSpawned, mark)
    await h.state("ready", mark)
    assert second.pid != first.pid and second.attempt == 2
    await _wait_dead(first.pid)


async def test_crash_loop_parks_in_failed_then_reset(h: Harness) -> None:
    restart = RestartConfig(initial_s=0.01, max_s=0.05, max_consecutive_failures=3)
    h.add(knobs=["--load-time", "30", "--crash-after", "0.05", "--exit-code", "5"], restart=restart)
    mark = h.mark()
    await h.send(PreloadCmd(command_id="c1"))
    failed = await h.state("failed", mark)

    assert failed.trigger == "preload_failed"
    assert "3 consecutive failures" in failed.reason
    spawned = h.bodies(EngineSpawned, mark)
    assert len(spawned) == 3 and len({s.pid for s in spawned}) == 3
    assert [b.attempt for b in h.bodies(BackoffScheduled, mark)] == [1, 2]
    limit = h.bodies(RestartLimitReached, mark)
    assert len(limit) == 1 and limit[0].restarts == 2
    for s in spawned:
        await _wait_dead(s.pid)
    # A failed pool takes no preload until the operator resets it.
    refused = await h.rt.command("p", PreloadCmd(command_id="c2"))
    assert isinstance(refused, Rejected) and refused.code == "illegal_transition"

    mark = h.mark()
    await h.send(ResetCmd(command_id="c3"))
    reset = await h.state("unready", mark)
    assert reset.trigger == "reset" and reset.src == "failed"
    snap = (await h.status()).pool
    assert snap.state == "unready" and snap.last_error is None


async def test_hang_loses_health_after_threshold_probes(make: Callable[..., Harness], tmp_path: Path) -> None:
    # A hung engine accepts connections and never answers: each probe ends by its read timeout.
    h = make(tmp_path, connect_timeout_s=0.2, read_timeout_s=0.2)
    h.add(
        knobs=["--load-time", "0.05", "--hang-after-ready", "0.1"],
        probe_interval_s=0.05,
        probe_failure_threshold=2,
        restart=NO_RESTART,
    )
    spawned = await h.ready()
    mark = h.after_ready
    lost = await h.state("restarting", mark, trigger="health_lost")

    assert lost.src == "ready"
    assert "2 consecutive failed health probes" in lost.reason
    health = h.bodies(HealthChanged, mark)
    assert health and not health[-1].live and not health[-1].ready and health[-1].consecutive_failures == 2
    # Health lost: the wedged engine is killed at once (grace 0), an expected exit.
    exited = await h.body(EngineExited, mark, lambda b: b.pid == spawned.pid)
    assert exited.expected and _stopped_at_once(exited)


# ----------------------------------------------------------------------------------------------
# Drain, leases
# ----------------------------------------------------------------------------------------------


async def test_drain_without_leases_completes_at_once(h: Harness) -> None:
    h.add(knobs=["--load-time", "0.05"])
    spawned = await h.ready()
    mark = h.mark()
    t0 = time.monotonic()
    reply = await h.send(DrainCmd(command_id="d1", deadline_s=30.0))
    done = await h.state("unready", mark, trigger="drained")
    assert time.monotonic() - t0 < 1.0

    assert reply.state == "unready"  # completed within the command's own step
    changes = [(c.trigger, c.src, c.dst) for c in h.bodies(StateChanged, mark)]
    assert changes == [("drain", "ready", "draining"), ("drained", "draining", "unready")]
    assert done.reason == "no leases held"
    assert not h.bodies(DrainForced, mark)
    exited = await h.body(EngineExited, mark, lambda b: b.pid == spawned.pid)
    assert exited.expected and exited.exit_code == 0


async def test_drain_with_held_lease_is_forced_at_deadline(h: Harness) -> None:
    h.add(knobs=["--load-time", "0.05"], slots=2)
    spawned = await h.ready()
    await h.send(LeaseCmd(command_id="l1", ttl_s=60.0))
    mark = h.mark()
    await h.send(DrainCmd(command_id="d1", deadline_s=0.5))
    draining = await h.event(StateChanged, mark, lambda b: b.dst == "draining")

    # New leases are refused while draining.
    refused = await h.rt.command("p", LeaseCmd(command_id="l2", ttl_s=60.0))
    assert isinstance(refused, Rejected) and refused.state == "draining"

    forced_event = await h.event(DrainForced, mark)
    forced = forced_event.body
    assert isinstance(forced, DrainForced)
    assert forced.leases_left == 1 and forced.deadline_s == 0.5
    assert 0.5 - 0.005 <= forced_event.ts - draining.ts < 0.5 + 1.0
    done = await h.state("unready", mark, trigger="drain_deadline")
    assert done.leases_left == 1 and "1 lease(s) held" in done.reason
    exited = await h.body(EngineExited, mark, lambda b: b.pid == spawned.pid)
    assert exited.expected
    assert (await h.status()).pool.active_leases == 0


async def test_lease_ttl_expiry_releases_and_is_recorded(h: Harness) -> None:
    h.add(knobs=["--load-time", "0.05"], slots=2)
    await h.ready()
    mark = h.mark()
    granted = await h.send(LeaseCmd(command_id="l1", ttl_s=0.2))
    long = await h.send(LeaseCmd(command_id="l2", ttl_s=60.0))
    # The runtime draws each id: not the command id, and not the same twice.
    assert granted.lease_id and long.lease_id and len({granted.lease_id, long.lease_id, "l1", "l2"}) == 4
    assert (await h.status()).pool.active_leases == 2

    expired_event = await h.event(LeaseExpired, mark)
    expired = expired_event.body
    assert isinstance(expired, LeaseExpired)
    assert expired.lease_id == granted.lease_id and expired.active == 1
    assert granted.expires_at is not None and expired_event.ts >= granted.expires_at - 0.005
    snap = (await h.status()).pool
    assert snap.active_leases == 1 and [lease.lease_id for lease in snap.leases] == [long.lease_id]
    assert snap.state == "ready"


# ----------------------------------------------------------------------------------------------
# Reload
# ----------------------------------------------------------------------------------------------


async def test_reload_success_runs_the_new_model(h: Harness) -> None:
    h.add(knobs=["--load-time", "0.05"], model="model-a")
    first = await h.ready()
    assert first.argv[first.argv.index("--model") + 1] == "model-a"

    mark = h.mark()
    await h.send(ReloadCmd(command_id="r1", model="model-b"))
    second = await h.body(EngineSpawned, mark)
    await h.state("ready", mark)

    assert second.pid != first.pid
    assert second.argv[second.argv.index("--model") + 1] == "model-b"
    changes = [(c.trigger, c.src, c.dst) for c in h.bodies(StateChanged, mark)]
    assert changes == [
        ("reload", "ready", "draining"),
        ("drained", "draining", "preloading"),
        ("engine_ready", "preloading", "ready"),
    ]
    old = await h.body(EngineExited, mark, lambda b: b.pid == first.pid)
    assert old.expected
    assert (await _props(second))["model_path"] == "model-b"
    assert (await h.status()).pool.model == "model-b"


async def test_reload_preflight_checks_the_model_that_will_really_run(h: Harness, tmp_path: Path) -> None:
    # The host facts are gathered for the reloaded spec, not the running one: a present new
    # model is found (no false "not found"), a missing one is named.
    old, new = tmp_path / "a.gguf", tmp_path / "b.gguf"
    old.write_bytes(b"a")
    new.write_bytes(b"b")
    h.add(knobs=["--load-time", "0.05"], model=str(old))
    await h.ready()
    mark = h.mark()
    await h.send(ReloadCmd(command_id="r1", model=str(new)))
    await h.state("ready", mark)
    assert (await h.status()).pool.model == str(new)
    missing = str(tmp_path / "gone.gguf")
    refused = await h.rt.command("p", ReloadCmd(command_id="r2", model=missing))
    assert isinstance(refused, Rejected) and refused.code == "preflight_failed", refused
    assert missing in refused.message + " ".join(p.message for p in refused.problems)
    assert (await h.status()).pool.state == "ready"


async def test_reload_of_a_pool_on_a_fixed_port_reuses_its_own_port(h: Harness) -> None:
    # Preflight runs while the old engine still holds the port: it is the pool's own, not "in use".
    port = allocate_port()
    h.add(knobs=["--load-time", "0.05"], model="model-a", port=port)
    first = await h.ready()
    mark = h.mark()
    await h.send(ReloadCmd(command_id="r1", model="model-b"))
    second = await h.body(EngineSpawned, mark)
    await h.state("ready", mark)
    assert second.pid != first.pid and second.port == first.port == port


async def test_an_allocated_port_is_held_while_its_engine_lives_and_given_back_when_it_exits(h: Harness) -> None:
    # Until the engine binds it, the kernel would offer the same port to the next spawn.
    h.add(knobs=["--load-time", "0.05"])
    spawned = await h.ready()
    assert h.rt.ports.held == 1
    mark = h.mark()
    await h.send(StopCmd(command_id="s1"))
    await h.body(EngineExited, mark, lambda b: b.pid == spawned.pid)
    assert h.rt.ports.held == 0


FAKE_OVERRIDES: dict[str, Any] = {
    "load_time": {"type": "float", "min": 0, "max": 60, "flag": "--load-time"},
    "crash_after": {"type": "float", "min": 0, "max": 60, "flag": "--crash-after"},
    "exit_code": {"type": "int", "min": 0, "max": 255, "flag": "--exit-code"},
}
"""Fake-engine knobs a reload may set, declared the way an operator declares ``--ctx-size``."""


async def test_reload_failure_rolls_back_to_the_old_spec(h: Harness) -> None:
    config = h.add(knobs=["--load-time", "0.05"], overrides=FAKE_OVERRIDES)
    template = config.definition().spec.argv
    first = await h.ready()

    mark = h.mark()
    await h.send(ReloadCmd(command_id="r1", overrides={"load_time": 30, "crash_after": 0.1, "exit_code": 3}))
    rolled = await h.body(ReloadRolledBack, mark)
    assert "reload failed" in rolled.reason
    restarted = await h.state("preloading", mark, trigger="backoff_elapsed")
    await h.state("ready", mark)

    spawned = h.bodies(EngineSpawned, mark)
    assert len(spawned) == 2
    broken, restored = spawned
    assert "--crash-after" in broken.argv
    assert "--crash-after" not in restored.argv
    assert restored.pid not in (first.pid, broken.pid)
    assert restarted.spec is not None and restarted.spec.argv == template
    # The rendered argv is the original one; only the (freshly allocated) port differs.
    port_at = first.argv.index("--port") + 1
    assert restored.argv[:port_at] + restored.argv[port_at + 1 :] == first.argv[:port_at] + first.argv[port_at + 1 :]
    crash = await h.body(EngineExited, mark, lambda b: b.pid == broken.pid)
    assert crash.exit_code == 3 and not crash.expected
    # A failed reload is not a crash loop of the pool: no backoff was scheduled.
    assert not h.bodies(BackoffScheduled, mark)
    assert (await h.status()).pool.state == "ready"


# ----------------------------------------------------------------------------------------------
# Stopping, process groups, environment
# ----------------------------------------------------------------------------------------------


async def test_stop_of_engine_ignoring_sigterm_ends_within_grace(h: Harness) -> None:
    grace = 0.5
    h.add(knobs=["--load-time", "0.05", "--ignore-sigterm"], stop_grace_s=grace)
    spawned = await h.ready()
    mark = h.mark()
    t0 = time.time()
    await h.send(StopCmd(command_id="s1"))
    exited_event = await h.event(EngineExited, mark, lambda b: b.pid == spawned.pid)
    took = h.stamp(exited_event) - t0

    exited = exited_event.body
    assert isinstance(exited, EngineExited)
    assert exited.expected and exited.signal == signal.SIGKILL  # SIGTERM was ignored
    assert grace - 0.01 <= took <= grace + 1.0
    assert "ignoring SIGTERM" in h.rt.log_path("p").read_text()
    assert not pid_alive(spawned.pid)


@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_grandchild_dies_with_the_group(h: Harness, tmp_path: Path, how: str) -> None:
    pid_file = tmp_path / "grandchild.pid"
    knobs = ["--load-time", "0.05", "--spawn-grandchild", "--grandchild-pid-file", str(pid_file)]
    h.add(knobs=knobs, restart=NO_RESTART)
    spawned = await h.ready()
    # The engine writes the file before it listens, so it exists once the pool is ready.
    grandchild = int(pid_file.read_text())
    track_pid(grandchild)
    assert pid_alive(grandchild) and os.getpgid(grandchild) == spawned.pgid

    mark = h.mark()
    if how == "stop":
        await h.send(StopCmd(command_id="s1"))
    else:
        os.kill(spawned.pid, signal.SIGKILL)  # the leader dies alone; its group must follow
    exited = await h.body(EngineExited, mark, lambda b: b.pid == spawned.pid)
    assert exited.expected == (how == "stop")
    await _wait_dead(grandchild, 5.0)


async def test_cuda_visible_devices_is_the_placements_full_uuids(h: Harness) -> None:
    # Unique UUID prefixes in the mask; the engine must see full UUIDs in mask order.
    h.add(knobs=["--load-time", "0.05"], device_mask=[GPU_48G[:12], GPU_24G[:12]])
    mark = h.mark()
    spawned = await h.ready()
    preloading = await h.state("preloading", mark)

    assert preloading.placement is not None
    assert preloading.placement.uuids == [GPU_48G, GPU_24G]
    expected = f"{GPU_48G},{GPU_24G}"
    assert preloading.placement.cuda_visible_devices == expected
    assert spawned.cuda_visible_devices == expected
    assert (await _props(spawned))["cuda_visible_devices"] == expected


async def test_close_stops_engines_with_their_spec_grace(h: Harness) -> None:
    grace = 0.3
    h.add(knobs=["--load-time", "0.05", "--ignore-sigterm"], stop_grace_s=grace)
    spawned = await h.ready()
    t0 = time.monotonic()
    await h.rt.close()
    took = time.monotonic() - t0
    assert not pid_alive(spawned.pid)
    assert took <= grace + 1.0, f"close took {took:.2f} s for an engine whose stop grace is {grace} s"


# ----------------------------------------------------------------------------------------------
# A step that raises
# ----------------------------------------------------------------------------------------------


async def test_a_step_that_raises_leaves_no_gap_records_internal_error_and_fails_the_pool(h: Harness) -> None:
    # A bug inside a step: the planner hands back something that is not a Placement, so the
    # preload row's after-callback raises once the machine has already moved to "preloading".
    from pool_managerd.contract.messages import InternalError
    from pool_managerd.lifecycle.preload import plan_preload

    broken = object()
    h.rt.lifecycle.planner = lambda _request: broken  # type: ignore[assignment,return-value]
    h.add(knobs=["--load-time", "0.1"])
    reply = await h.rt.command("p", PreloadCmd(command_id="boom"))
    assert isinstance(reply, Rejected) and reply.code == "internal", reply
    assert "Traceback" not in reply.message and "object at 0x" not in reply.message
    events = h.sink.of("p")
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "a sequence gap"
    error = next(e.body for e in events if isinstance(e.body, InternalError))
    assert error.code == "step_raised"
    assert [(c.trigger, c.src, c.dst) for c in h.bodies(StateChanged)] == [("internal_error", "unready", "failed")]
    snap = (await h.status()).pool
    assert snap.state == "failed" and snap.engine is None and snap.placement is None
    assert h.rt.lifecycle.registry.get("p").seq == events[-1].seq
    assert h.bodies(EngineSpawned) == [], "the broken step's effects ran"

    # The pool is consistent: an operator resets it, and a sound planner preloads it.
    h.rt.lifecycle.pool("p").planner = plan_preload
    await h.send(ResetCmd(command_id="reset"))
    await h.ready()
    events = h.sink.of("p")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


class RefusingSink(StampedSink):
    """Refuses, once, the append of a step that holds an event of type ``refuse`` (a log that
    cannot take a step: the fault is deterministic, the rest is the real runtime)."""

    def __init__(self, rng: RecordingRandom, refuse: str) -> None:
        super().__init__(rng)
        self.refuse: str | None = refuse
        self.refused: list[Event] = []

    async def append(self, pool: str, events: Sequence[Event]) -> None:
        if self.refuse is not None and any(e.type == self.refuse for e in events):
            self.refuse = None
            self.refused = list(events)
            raise OSError("the event log refused the append")
        await super().append(pool, events)


async def test_a_step_whose_events_are_not_appended_is_undone_and_its_effects_never_run(tmp_path: Path) -> None:
    rng = RecordingRandom(7)
    sink = RefusingSink(rng, refuse="state_changed")
    options = RuntimeOptions(node="n1", run_dir=tmp_path / "run", probe_options=dict(DAEMON_PROBE_OPTIONS), rng=rng)
    h = Harness(PoolRuntime(sink, lambda: SNAPSHOT, options), sink, rng, tmp_path)
    try:
        h.add(knobs=["--load-time", "0.1"])
        reply = await h.rt.command("p", PreloadCmd(command_id="first"))
        assert isinstance(reply, Rejected) and reply.code == "unavailable", reply
        assert [e.seq for e in sink.refused] == [1]
        snap = (await h.status()).pool
        assert snap.state == "unready" and snap.placement is None and snap.seq == 0
        assert h.rt.actor("p").stats.spawns == 0 and h.rt.actor("p").engines == {}, "the undone step's effects ran"
        # The log and the pool agree: the next preload is event 1, and it runs.
        await h.ready()
        events = sink.of("p")
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[0].command_id != "first"
    finally:
        await h.rt.close()
