"""The fault suite: a real nats-server, the daemon as a real process, real fake-engine processes.

``make faults`` (not part of ``make test``; ``tests/e2e/test_faults.py`` runs a shortened version) plays
three operators' bad days and checks what must hold through each:

1. **NATS killed and restarted** (SIGKILL, same port and store) under a load of lease/release
   commands that clients retry with the same ``command_id`` until answered: per-pool sequence
   gaps, duplicated sequences, commands applied twice, events a reply named that are not in the
   stream, and the recovery time after each restart (first status answered).
2. **The daemon SIGKILLed** at chosen points (right after a spawn's fork, after its record, after
   its release, while loading, while ready), then started again: orphans (an engine of the pool
   that is not its current one), pools with two engines, stuck pools (not ready again within the
   deadline), the restart time, and after the final graceful stop engines left running and
   ``pool-managerd replay --check-live``.
3. **An engine crash storm** (every engine crashes right after it is ready): engine_exited events
   per crash, backoff delays within the policy, the breaker parking the pool in ``failed``, and
   zombies left under the daemon.

Prints a table and one JSON line (``{"bench": "faults", ...}``); exits 1 when an invariant broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.eventlog.reading import read_events
from pool_managerd.contract.messages import (
    Accepted,
    BackoffScheduled,
    DaemonStarted,
    EngineExited,
    EngineSpawned,
    Event,
    Rejected,
    RestartLimitReached,
    StatusReply,
)
from pool_managerd.contract.subjects import Subjects
from pool_managerd.testing.event_wire import EventWire
from pool_managerd.testing.recovery_checks import log_checks, only_processes, processes_with, zombies_of
from pool_managerd.testing.retrying_client import request_until_answered
from pool_managerd.testing.toml_config import toml_value

NODE = "faults"
START_S = 30.0
READY_S = 30.0
KILL_POINTS = ("spawn:after_fork", "spawn:after_record", "spawn:after_release", "loading", "ready")


# --- the daemon as a process -------------------------------------------------------------------


class Rig:
    """One nats-server, one client, one daemon process (killed and started again at will)."""

    def __init__(self, root: Path, pools: list[dict[str, Any]]) -> None:
        self.root = root
        self.server = NatsServer(store_dir=root / "nats-store")
        self.run_dir = root / "run"
        self.config = root / "poold.toml"
        self.log = root / "daemon.log"
        self.pools = pools
        self.proc: asyncio.subprocess.Process | None = None
        self.nc: NATS | None = None
        self.wire = EventWire()

    async def __aenter__(self) -> Rig:
        await self.server.astart()
        lines = [f'node = "{NODE}"', f"run_dir = {toml_value(str(self.run_dir))}", 'gpus = "sim:hetero-24g-48g"',
                 "heartbeat_s = 30.0", "", "[nats]", f"urls = {toml_value([self.server.url])}"]  # fmt: skip
        for pool in self.pools:
            lines += ["", "[[pools]]", *(f"{k} = {toml_value(v)}" for k, v in pool.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.nc = await nats.connect(self.server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.05,
                                     allow_reconnect=True, error_cb=_quiet)  # fmt: skip
        await self.nc.subscribe("poold.evt.>", cb=self.wire.on_msg)
        await self.nc.subscribe("poold.node.*.evt.>", cb=self.wire.on_msg)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.server.close()

    async def start(self, env: dict[str, str] | None = None) -> float:
        """Start the daemon; returns seconds until it published ``daemon_started``."""
        mark = len(self.wire.items)
        t0 = time.monotonic()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pool_managerd", "run", "--config", str(self.config), "--log-format", "text",
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        finally:
            os.close(fd)
        await self.wire.wait(lambda e: isinstance(e.body, DaemonStarted), START_S, mark)
        return time.monotonic() - t0

    async def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def request(self, pool: str, verb: str, payload: dict[str, Any], *, within_s: float = 30.0,
                      attempt_s: float = 1.0) -> Accepted | Rejected | StatusReply:  # fmt: skip
        """Send until answered, the same bytes every time (a client retrying with its command id)."""
        assert self.nc is not None
        return await request_until_answered(self.nc, pool, verb, payload, within_s=within_s, attempt_s=attempt_s)

    async def state(self, pool: str) -> StatusReply:
        reply = await self.request(pool, "status", {"command_id": "status"})
        assert isinstance(reply, StatusReply), reply
        return reply

    async def until_state(self, pool: str, states: set[str], within_s: float) -> str | None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            state = (await self.state(pool)).pool.state
            if state in states:
                return state
            await asyncio.sleep(0.05)  # ok: polling a status with a deadline
        return None

    async def stream(self) -> list[Event]:
        assert self.nc is not None
        return [event async for _, event in read_events(self.nc, Subjects())]

    async def check_live(self) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pool_managerd", "replay", "--url", self.server.url, "--check-live",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0


async def _quiet(exc: Exception) -> None:
    pass


# --- 1. NATS killed and restarted under load --------------------------------------------------------


async def nats_restarts(root: Path, restarts: int, clients: int = 4) -> dict[str, Any]:
    pools = [{"id": f"load{i}", "engine": "fake", "extra_args": ["--load-time", "0.05"], "slots": 4,
              "model_bytes": 1_000_000_000, "stop_grace_s": 2.0} for i in range(2)]  # fmt: skip
    async with Rig(root, pools) as rig:
        await rig.start()
        for pool in pools:
            await rig.request(pool["id"], "preload", {"command_id": f"pre-{pool['id']}"})
        for pool in pools:
            assert await rig.until_state(pool["id"], {"ready"}, READY_S) == "ready", f"{pool['id']} not ready"
        stop = asyncio.Event()
        replies: list[Accepted] = []
        sent = 0

        async def client(n: int) -> None:
            nonlocal sent
            pool = pools[n % len(pools)]["id"]
            while not stop.is_set():
                cid = uuid.uuid4().hex
                sent += 1
                lease = await rig.request(pool, "lease", {"command_id": cid, "ttl_s": 60.0}, within_s=60)
                if isinstance(lease, Accepted):
                    replies.append(lease)
                    sent += 1
                    rel = await rig.request(pool, "release", {"command_id": f"r-{cid}", "lease_id": lease.lease_id},
                                            within_s=60)  # fmt: skip
                    if isinstance(rel, Accepted):
                        replies.append(rel)

        tasks = [asyncio.ensure_future(client(n)) for n in range(clients)]
        recovery: list[float] = []
        for _ in range(restarts):
            await asyncio.sleep(0.5)  # ok: load runs between faults
            rig.server.kill()
            await asyncio.sleep(0.2)  # ok: the outage
            t0 = time.monotonic()
            await rig.server.arestart()
            await rig.state(pools[0]["id"])
            recovery.append(time.monotonic() - t0)
        await asyncio.sleep(0.5)  # ok: load after the last fault
        stop.set()
        await asyncio.gather(*tasks)
        events = await rig.stream()
        stored = {(e.pool, e.seq) for e in events}
        lost = sum(1 for r in replies for s in range(r.seq, max(r.seq, r.last_seq) + 1) if (r.pool, s) not in stored)
        checks = log_checks(events)
        rc = await rig.terminate()
    return {"restarts": restarts, "commands": sent, "accepted": len(replies), "events": len(events), **checks,
            "lost_events": lost, "exit_status": rc, "recovery_s": recovery}  # fmt: skip


# --- 2. the daemon SIGKILLed at chosen points ---------------------------------------------------------


async def daemon_kills(root: Path, kills: int) -> dict[str, Any]:
    marker = f"faults-{uuid.uuid4().hex[:10]}"
    pool = "chat"
    # Each kill during a spawn costs the pool a failed preload: a breaker that never trips here
    # keeps the rounds independent (the crash storm checks the breaker).
    restart = {"initial_s": 0.2, "max_s": 1.0, "max_consecutive_failures": 1000, "max_restarts": 1000}
    pools = [{"id": pool, "engine": "fake", "extra_args": ["--load-time", "0.3", "--alias", marker],
              "model_bytes": 1_000_000_000, "stop_grace_s": 2.0, "restart": restart}]  # fmt: skip
    orphans = two = 0
    stuck: list[str] = []
    restart_s: list[float] = []
    ready_s: list[float] = []
    points: list[str] = []
    async with Rig(root, pools) as rig:
        await rig.start()
        for i in range(kills):
            point = KILL_POINTS[i % len(KILL_POINTS)]
            points.append(point)
            if point.startswith("spawn:"):
                # Armed for this start only: the daemon dies at the point during the preload.
                await rig.kill()
                await rig.start(env={"POOL_MANAGERD_FAULTS": point})
                await rig.request(pool, "preload", {"command_id": f"pre-{i}"})
                assert rig.proc is not None
                await asyncio.wait_for(rig.proc.wait(), READY_S)
            else:
                mark = len(rig.wire.items)
                await rig.request(pool, "preload", {"command_id": f"pre-{i}"})
                if point == "loading":
                    await rig.wire.wait(lambda e: isinstance(e.body, EngineSpawned), READY_S, mark)
                else:
                    await rig.until_state(pool, {"ready"}, READY_S)
                await rig.kill()
            t0 = time.monotonic()
            restart_s.append(await rig.start())
            state = await rig.until_state(pool, {"ready"}, READY_S)
            if state is None:
                stuck.append(f"{point}: {(await rig.state(pool)).pool.state}")
            else:
                ready_s.append(time.monotonic() - t0)
            current = (await rig.state(pool)).pool.engine
            allowed = {current.pid} if current is not None else set()
            # Gates left by a killed daemon exit on their own within milliseconds.
            live = await only_processes(marker, allowed, within_s=5.0)
            orphans += len([p for p in live if p not in allowed])
            two += 1 if len(live) > 1 else 0
            # Back to unready for the next round.
            await rig.request(pool, "stop", {"command_id": f"stop-{i}"})
        rc = await rig.terminate()
        left = processes_with(marker)
        check = await rig.check_live()
        events = await rig.stream()
    return {"kills": kills, "points": sorted(set(points)), "orphans": orphans, "two_engines": two,
            "stuck": stuck, "left_after_stop": len(left), "check_live_rc": check, "exit_status": rc,
            **log_checks(events), "restart_s": restart_s, "ready_s": ready_s}  # fmt: skip


# --- 3. an engine crash storm -------------------------------------------------------------------


async def crash_storm(root: Path, limit: int = 6) -> dict[str, Any]:
    policy = {"initial_s": 0.05, "factor": 2.0, "max_s": 0.4, "jitter": 0.1, "stable_s": 60.0,
              "max_consecutive_failures": limit, "max_restarts": 100, "window_s": 60.0}  # fmt: skip
    pools = [{"id": "storm", "engine": "fake", "extra_args": ["--load-time", "0.02", "--crash-after-ready", "0.02"],
              "model_bytes": 1_000_000_000, "stop_grace_s": 1.0, "restart": policy}]  # fmt: skip
    async with Rig(root, pools) as rig:
        await rig.start()
        mark = len(rig.wire.items)
        await rig.request("storm", "preload", {"command_id": "storm"})
        await rig.wire.wait(lambda e: isinstance(e.body, RestartLimitReached), 60, mark)
        state = (await rig.state("storm")).pool.state
        events = [e for e in await rig.stream() if e.pool == "storm"]
        spawned = [e.body.pid for e in events if isinstance(e.body, EngineSpawned)]
        exits = Counter(e.body.pid for e in events if isinstance(e.body, EngineExited))
        bad_exits = sum(1 for pid in spawned if exits[pid] != 1)
        out_of_policy = 0
        delays = []
        for e in events:
            if isinstance(e.body, BackoffScheduled):
                k = e.body.attempt - 1
                base = min(policy["max_s"], policy["initial_s"] * policy["factor"] ** k)
                delays.append(e.body.delay_s)
                if not (
                    base * (1 - policy["jitter"]) - 1e-9 <= e.body.delay_s <= min(policy["max_s"], base * 1.1) + 1e-9
                ):
                    out_of_policy += 1
        assert rig.proc is not None
        zombies = zombies_of(rig.proc.pid)
        rc = await rig.terminate()
    return {"crashes": len(spawned), "exit_events_per_crash_off": bad_exits, "backoffs": len(delays),
            "backoff_out_of_policy": out_of_policy, "breaker": state == "failed", "zombies": len(zombies),
            "exit_status": rc, **log_checks(events)}  # fmt: skip


# --- the suite --------------------------------------------------------------------------------------


def _p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def problems(result: dict[str, Any]) -> list[str]:
    """Every broken invariant of a run, by name."""
    bad = []
    n, d, c = result["nats"], result["daemon"], result["storm"]
    for name, part in (("nats", n), ("daemon", d), ("storm", c)):
        for key in ("gaps", "duplicates", "applied_twice"):
            if part[key]:
                bad.append(f"{name}.{key}={part[key]}")
        if part["exit_status"] != 0:
            bad.append(f"{name}.exit_status={part['exit_status']}")
    if n["lost_events"]:
        bad.append(f"nats.lost_events={n['lost_events']}")
    for key in ("orphans", "two_engines", "left_after_stop", "check_live_rc"):
        if d[key]:
            bad.append(f"daemon.{key}={d[key]}")
    if d["stuck"]:
        bad.append(f"daemon.stuck={d['stuck']}")
    for key in ("exit_events_per_crash_off", "backoff_out_of_policy", "zombies"):
        if c[key]:
            bad.append(f"storm.{key}={c[key]}")
    if not c["breaker"]:
        bad.append("storm.breaker=false")
    return bad


async def run(root: Path, *, nats_restarts_n: int, daemon_kills_n: int) -> dict[str, Any]:
    return {
        "nats": await nats_restarts(root / "nats", nats_restarts_n),
        "daemon": await daemon_kills(root / "daemon", daemon_kills_n),
        "storm": await crash_storm(root / "storm"),
    }


def report(result: dict[str, Any]) -> str:
    n, d, c = result["nats"], result["daemon"], result["storm"]
    rows = [
        ("NATS restarts under load", f"{n['restarts']} restarts, {n['commands']} commands, {n['events']} events",
         f"gaps {n['gaps']}, dups {n['duplicates']}, applied twice {n['applied_twice']}, lost {n['lost_events']}",
         f"recovery p50 {_p(n['recovery_s'], 0.5):.3f} s, max {max(n['recovery_s'], default=0):.3f} s"),
        ("daemon SIGKILLs", f"{d['kills']} kills at {', '.join(d['points'])}",
         f"orphans {d['orphans']}, two engines {d['two_engines']}, stuck {len(d['stuck'])}, "
         f"left {d['left_after_stop']}, check-live rc {d['check_live_rc']}, gaps {d['gaps']}",
         f"restart p50 {_p(d['restart_s'], 0.5):.2f} s, ready again p50 {_p(d['ready_s'], 0.5):.2f} s"),
        ("engine crash storm", f"{c['crashes']} crashes, {c['backoffs']} backoffs",
         f"exit events off {c['exit_events_per_crash_off']}, out of policy {c['backoff_out_of_policy']}, "
         f"breaker {'failed' if c['breaker'] else 'NOT tripped'}, zombies {c['zombies']}", ""),
    ]  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)) for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nats-restarts", type=int, default=20)
    parser.add_argument("--daemon-kills", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poold-faults-") as tmp:
        result = asyncio.run(run(Path(tmp), nats_restarts_n=args.nats_restarts, daemon_kills_n=args.daemon_kills))
    print(report(result))
    bad = problems(result)
    print(json.dumps({"bench": "faults", **result, "problems": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
