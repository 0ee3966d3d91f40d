"""Command latency over a real nats-server: raw nats-py request/reply to an echo responder (the
baseline) vs ``status`` round trips to the daemon, interleaved, and command -> first event for a
``drain`` of an idle ready pool.

    .venv/bin/python bench/command_latency.py [--requests 2000] [--drains 30]

The echo responder and the daemon each run in their own process, as they would in production;
the client is this process. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import nats

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.contract.messages import REPLY_DECODER, Accepted, StatusReply
from pool_managerd.testing import echo_responder


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_daemon(url: str, run_dir: Path) -> subprocess.Popen[bytes]:
    cfg = run_dir / "bench.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            node = "bench"
            run_dir = "{run_dir / "run"}"
            gpus = "sim:hetero-24g-48g"
            heartbeat_s = 60
            log_level = "warning"
            [nats]
            urls = ["{url}"]
            [[pools]]
            id = "bench"
            engine = "fake"
            extra_args = ["--load-time", "0.05"]
            model_bytes = 1000000000
            """
        )
    )
    return subprocess.Popen(
        [sys.executable, "-m", "pool_managerd", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(run_dir / "daemon.log", "wb"),
        start_new_session=True,
    )


async def wait_ready(nc: nats.NATS, pool: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await nc.request(f"poold.cmd.{pool}.status", b"", timeout=1)
            reply = REPLY_DECODER.decode(msg.data)
            if isinstance(reply, StatusReply):
                return
        except Exception:  # the daemon is still starting
            await asyncio.sleep(0.05)
    raise SystemExit("daemon did not start")


async def until_state(nc: nats.NATS, pool: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await nc.request(f"poold.cmd.{pool}.status", b"", timeout=2)
        reply = REPLY_DECODER.decode(msg.data)
        if isinstance(reply, StatusReply) and reply.pool.state == state:
            return
        await asyncio.sleep(0.01)
    raise SystemExit(f"pool {pool} never reached {state}")


async def run(args: argparse.Namespace) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="poold-bench-"))
    server = NatsServer(store_dir=tmp / "nats").start()
    echo = subprocess.Popen(echo_responder.argv(server.url), stdout=subprocess.PIPE, start_new_session=True)
    daemon = start_daemon(server.url, tmp)
    try:
        assert echo.stdout is not None
        echo.stdout.readline()
        nc = await nats.connect(server.url)
        await wait_ready(nc, "bench", 30)
        # Warm both paths up before measuring.
        for _ in range(200):
            await nc.request("bench.echo", b"{}", timeout=2)
            await nc.request("poold.cmd.bench.status", b"", timeout=2)
        raw: list[float] = []
        status: list[float] = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            await nc.request("bench.echo", b"", timeout=2)
            t1 = time.perf_counter()
            msg = await nc.request("poold.cmd.bench.status", b"", timeout=2)
            t2 = time.perf_counter()
            raw.append((t1 - t0) * 1e6)
            status.append((t2 - t1) * 1e6)
            assert msg.data.startswith(b'{"type":"status"')

        # command -> first event: drain an idle ready pool, then bring it back.
        cmd_to_event: list[float] = []
        got: asyncio.Queue[float] = asyncio.Queue()

        async def on_event(_msg: object) -> None:
            got.put_nowait(time.perf_counter())

        sub = await nc.subscribe("poold.evt.bench.state_changed", cb=on_event)
        for _ in range(args.drains):
            await nc.request(
                "poold.cmd.bench.preload", json.dumps({"command_id": uuid.uuid4().hex}).encode(), timeout=5
            )
            await until_state(nc, "bench", "ready")
            while not got.empty():
                got.get_nowait()
            t0 = time.perf_counter()
            msg = await nc.request(
                "poold.cmd.bench.drain", json.dumps({"command_id": uuid.uuid4().hex}).encode(), timeout=5
            )
            assert isinstance(REPLY_DECODER.decode(msg.data), Accepted), msg.data
            first = await asyncio.wait_for(got.get(), 5)
            cmd_to_event.append((first - t0) * 1e6)
            await until_state(nc, "bench", "unready")
        await sub.unsubscribe()
        await nc.close()
    finally:
        for proc in (daemon, echo):
            proc.terminate()
        for proc in (daemon, echo):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.close() if hasattr(server, "close") else server.stop()

    raw_p50, raw_p99 = pct(raw, 50), pct(raw, 99)
    st_p50, st_p99 = pct(status, 50), pct(status, 99)
    rows = [
        ("raw nats-py echo (baseline)", raw),
        ("daemon status", status),
        ("drain command -> first event", cmd_to_event),
    ]
    print(f"{'round trip (us)':<32}{'n':>6}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for name, values in rows:
        print(f"{name:<32}{len(values):>6}{pct(values, 50):>10.0f}{pct(values, 90):>10.0f}"
              f"{pct(values, 99):>10.0f}{statistics.fmean(values):>10.0f}")  # fmt: skip
    print(f"ratio status/raw: p50 {st_p50 / raw_p50:.2f}, p99 {st_p99 / raw_p99:.2f} (targets <= 1.3 and <= 2.0)")
    return {
        "raw_rtt_p50_us": round(raw_p50, 1),
        "raw_rtt_p99_us": round(raw_p99, 1),
        "status_rtt_p50_us": round(st_p50, 1),
        "status_rtt_p99_us": round(st_p99, 1),
        "ratio_p50": round(st_p50 / raw_p50, 3),
        "ratio_p99": round(st_p99 / raw_p99, 3),
        "cmd_to_event_p50_us": round(pct(cmd_to_event, 50), 1),
        "cmd_to_event_p99_us": round(pct(cmd_to_event, 99), 1),
        "requests": args.requests,
        "drains": args.drains,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--drains", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
