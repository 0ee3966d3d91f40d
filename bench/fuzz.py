"""``make fuzz``: 100,000 invalid messages against the daemon as a real process.

One nats-server, one daemon process (``pool-managerd run``), a real fake engine: a ready pool
holding a lease and declaring an override, and an idle pool that takes outside health reports.
The messages come from :mod:`pool_managerd.testing.wire_fuzz` (seeded): every subject the daemon
listens on, each message invalid by construction. After every message both pools' ``status`` is
read and compared with the state before the run.

Counts: crashes (the daemon process exited), untyped replies (no reply within the deadline, or
one no client can decode, or a code outside the stable set), accepted invalid messages, state
changes. Also the daemon's RSS before and after, and ``status`` latency during the run against a
baseline measured in the same run before the first fuzzed message. Prints a table and one JSON
line (``{"bench": "fuzz", ...}``); exits 1 when anything but typed rejections came back.

    python bench/fuzz.py [--messages 100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.testing.wire_fuzz import judge, probe, state_of

NODE = "node-fz"
POOLS = ["chat", "idle"]
REPLY_TIMEOUT_S = 5.0
FAKE = {"engine": "fake", "extra_args": ["--load-time", "0.1"], "model_bytes": 1_000_000_000, "stop_grace_s": 2.0}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Fuzz:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = NatsServer(store_dir=root / "nats")
        self.proc: asyncio.subprocess.Process | None = None
        self.nc: NATS | None = None

    async def start(self) -> None:
        await self.server.astart()
        config = {
            "node": NODE, "run_dir": str(self.root / "run"), "gpus": "sim:hetero-24g-48g", "heartbeat_s": 30.0,
            "log_level": "error", "nats": {"urls": [self.server.url]},
            "pools": [
                {"id": "chat", **FAKE, "slots": 2, "models": ["chat"],
                 "overrides": {"ctx_size": {"type": "int", "min": 512, "max": 131072, "flag": "--ctx-size"}}},
                {"id": "idle", **FAKE, "external_health": True},
            ],
        }  # fmt: skip
        path = self.root / "poold.yaml"
        path.write_text(yaml.safe_dump(config))
        log = os.open(self.root / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pool_managerd", "run", "--config", str(path), "--log-format", "text",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(log)
        self.nc = await nats.connect(self.server.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.status("idle")
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.returncode is not None:
                    raise RuntimeError("the daemon did not answer status within 30 s") from None
                await asyncio.sleep(0.1)  # ok: waiting for a subprocess to subscribe; bounded above
        await self.request("poold.cmd.chat.preload", {"command_id": "up"})
        while (await self.status("chat"))["state"] != "ready":
            if time.monotonic() > deadline:
                raise RuntimeError("chat did not become ready")
            await asyncio.sleep(0.02)  # ok: polls a cheap read; bounded by the deadline
        await self.request("poold.cmd.chat.lease", {"command_id": "held", "ttl_s": 3600, "holder": "fuzz"})

    async def request(self, subject: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
        assert self.nc is not None
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply: dict[str, Any] = json.loads((await self.nc.request(subject, data, timeout=REPLY_TIMEOUT_S)).data)
        return reply

    async def status(self, pool: str) -> dict[str, Any]:
        snapshot: dict[str, Any] = (await self.request(f"poold.cmd.{pool}.status", b""))["pool"]
        return snapshot

    async def states(self, latencies: list[float]) -> dict[str, tuple[Any, ...]]:
        out = {}
        for pool in POOLS:
            t0 = time.perf_counter()
            out[pool] = state_of(await self.status(pool))
            latencies.append((time.perf_counter() - t0) * 1000)
        return out

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.server.close()


async def run(root: Path, messages: int, seed: int) -> dict[str, Any]:
    fz = Fuzz(root)
    try:
        await fz.start()
        assert fz.proc is not None and fz.nc is not None
        baseline_ms: list[float] = []
        for _ in range(500):
            before = await fz.states(baseline_ms)
        rss_before = _rss_kib(fz.proc.pid)
        rng = random.Random(seed)
        verdicts: Counter[tuple[str, str]] = Counter()
        during_ms: list[float] = []
        crashes = state_changes = sent = 0
        findings: list[str] = []
        t0 = time.monotonic()
        for n in range(messages):
            p = probe(rng, POOLS, NODE)
            family = p.mutation.split(":")[1]
            if p.expects_reply:
                try:
                    verdict = judge(
                        (await fz.nc.request(f"poold.{p.subject}", p.payload, timeout=REPLY_TIMEOUT_S)).data
                    )
                except TimeoutError:
                    verdict = "untyped"
            else:
                await fz.nc.publish(f"poold.{p.subject}", p.payload)
                verdict = "published"
            sent += 1
            verdicts[(family, verdict)] += 1
            if verdict in ("untyped", "accepted") and len(findings) < 10:
                findings.append(f"{verdict}: {p.subject} {p.mutation} {p.payload[:120]!r}")
            if fz.proc.returncode is not None:
                crashes += 1
                findings.append(f"daemon exited with {fz.proc.returncode} after message {n}")
                break
            try:
                now = await fz.states(during_ms)
            except Exception as exc:
                crashes += 1
                findings.append(f"status unanswered after message {n}: {type(exc).__name__}")
                break
            if now != before:
                state_changes += 1
                if len(findings) < 10:
                    findings.append(f"state changed by {p.subject} {p.mutation}: {before} -> {now}")
                before = now
            if (n + 1) % 10_000 == 0:
                print(f"... {n + 1} messages, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - t0
        rss_after = _rss_kib(fz.proc.pid) if fz.proc.returncode is None else 0
    finally:
        await fz.close()
    untyped = sum(c for (_, v), c in verdicts.items() if v == "untyped")
    accepted = sum(c for (_, v), c in verdicts.items() if v == "accepted")
    return {
        "messages": sent, "seconds": round(elapsed, 1), "crashes": crashes, "untyped_replies": untyped,
        "accepted_invalid": accepted, "state_changes": state_changes,
        "rss_before_kib": rss_before, "rss_after_kib": rss_after,
        "status_ms_baseline_p50": round(statistics.median(baseline_ms), 3),
        "status_ms_baseline_p99": round(_pct(baseline_ms, 0.99), 3),
        "status_ms_during_p50": round(statistics.median(during_ms), 3) if during_ms else None,
        "status_ms_during_p99": round(_pct(during_ms, 0.99), 3) if during_ms else None,
        "by_family": {f: {v: c for (ff, v), c in verdicts.items() if ff == f} for f in sorted({f for f, _ in verdicts})},  # noqa: E501
        "findings": findings,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poold-fuzz-") as tmp:
        result = asyncio.run(run(Path(tmp), args.messages, args.seed))
    print(f"\nfuzz: {result['messages']} messages in {result['seconds']} s (seed {args.seed})\n")
    print(f"{'mutation':<26} {'rejected':>9} {'published':>10} {'accepted':>9} {'untyped':>8}")
    for family, counts in result["by_family"].items():
        print(f"{family:<26} {counts.get('rejected', 0):>9} {counts.get('published', 0):>10} "
              f"{counts.get('accepted', 0):>9} {counts.get('untyped', 0):>8}")  # fmt: skip
    print()
    rss = f"{result['rss_before_kib'] / 1024:.1f} / {result['rss_after_kib'] / 1024:.1f}"
    rows = [
        ("crashes", result["crashes"]), ("untyped replies", result["untyped_replies"]),
        ("accepted invalid messages", result["accepted_invalid"]), ("state changes", result["state_changes"]),
        ("daemon RSS before / after (MiB)", rss),
        ("status p50 / p99 baseline (ms)", f"{result['status_ms_baseline_p50']} / {result['status_ms_baseline_p99']}"),
        ("status p50 / p99 during (ms)", f"{result['status_ms_during_p50']} / {result['status_ms_during_p99']}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:<34} {value}")
    for finding in result["findings"]:
        print(f"  ! {finding}")
    figures = {k: v for k, v in result.items() if k not in ("by_family", "findings")}
    print(json.dumps({"bench": "fuzz", "seed": args.seed, **figures}))
    bad = result["crashes"] or result["untyped_replies"] or result["accepted_invalid"] or result["state_changes"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
