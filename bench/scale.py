"""A thousand pools on one daemon: what each pool costs at idle, and how bulk operations scale.

    .venv/bin/python bench/scale.py [--sizes 10,100,1000] [--idle-s 30] [--requests 1000]

For each N: one nats-server, one daemon (its own process) with N pools of a tiny HTTP engine (a
C program compiled here with the machine's ``cc``: it answers 200 on any path, keeps connections
alive, and costs a few hundred KiB), probes every 1 s, simulated GPUs. Measured, in order:

- preload all: N preloads sent at once, until every pool's ``state_changed`` to ready is seen;
  the engine's own start (fork, exec, first 200) is measured alone for comparison;
- idle steady state over ``--idle-s``: daemon CPU from /proc (cores, and per pool), RSS, threads,
  KV puts/s and health reports/s seen on the wire;
- status p50/p99 against a raw nats-py echo responder (its own process), interleaved;
- node reply sizes: the first ``pools`` page, ``inventory``, ``$SRV.INFO``, ``$SRV.STATS``;
- recovery after SIGKILL: a new daemon started until every pool answers ready with its engine
  adopted;
- graceful shutdown: SIGTERM until the daemon exits (every engine stopped), and its exit status.

RSS per pool is the daemon's RSS with N ready pools minus that of the same daemon before any
pool was preloaded, over N (what a running pool adds: actor, prober, engine handle). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.client import PoolClient
from pool_managerd.contract.messages import REPLY_DECODER, PoolsReply, StatusReply
from pool_managerd.testing import echo_responder

ENGINE_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#define MAXC 64
int main(int argc, char **argv) {
    const char *host = "127.0.0.1"; int port = 0;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--host")) host = argv[++i];
    }
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_port = htons(port);
    inet_pton(AF_INET, host, &a.sin_addr);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) return 1;
    struct pollfd p[MAXC + 1]; int n = 1; p[0].fd = s; p[0].events = POLLIN;
    static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}";
    char buf[4096];
    for (;;) {
        if (poll(p, n, -1) < 0) continue;
        if ((p[0].revents & POLLIN) && n <= MAXC) {
            int c = accept(s, 0, 0);
            if (c >= 0) { p[n].fd = c; p[n].events = POLLIN; p[n].revents = 0; n++; }
        }
        for (int i = 1; i < n; i++) {
            if (!p[i].revents) continue;
            ssize_t r = read(p[i].fd, buf, sizeof buf - 1);
            if (r <= 0) { close(p[i].fd); p[i--] = p[--n]; continue; }
            buf[r] = 0;
            if (strstr(buf, "\r\n\r\n")) {
                if (write(p[i].fd, ok, sizeof ok - 1) < 0 || strstr(buf, "onnection: close")) {
                    close(p[i].fd); p[i--] = p[--n];
                }
            }
        }
    }
}
"""


CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def build_engine(out: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench/scale.py needs a C compiler (cc) for its tiny engine")
    src = out / "tiny_engine.c"
    src.write_text(ENGINE_C)
    exe = out / "tiny-engine"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def cpu_s(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def write_config(path: Path, run_dir: Path, url: str, engine: Path, n: int) -> list[str]:
    pools = [f"p{i:04d}" for i in range(n)]
    lines = [
        'node = "bench"',
        f'run_dir = "{run_dir}"',
        'gpus = "sim:hetero-24g-48g"',
        "heartbeat_s = 10",
        'log_level = "warning"',
        "[nats]",
        f'urls = ["{url}"]',
    ]
    for pool in pools:
        lines += [
            "[[pools]]",
            f'id = "{pool}"',
            'engine = "custom"',
            f'argv = ["{engine}", "--host", "{{host}}", "--port", "{{port}}"]',
            "model_bytes = 1000000",
            "probe_interval_s = 1.0",
            "stop_grace_s = 5.0",
            "load_timeout_s = 120.0",
            # The tiny engine holds no GPU memory, simulated or not: readiness is its probe alone.
            'gpu_check = "off"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return pools


def start_daemon(
    cfg: Path, log: Path, profile: Path | None = None, *, from_start: bool = False
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if profile is not None:
        env["POOL_MANAGERD_PROFILE"] = str(profile)
        env["POOL_MANAGERD_PROFILE_FROM_START"] = "1" if from_start else "0"
    return subprocess.Popen(
        [sys.executable, "-m", "pool_managerd", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
        start_new_session=True,
        env=env,
    )


async def engine_start_s(engine: Path, samples: int = 20) -> float:
    """The tiny engine's own start: fork, exec, listen, first 200 (median of ``samples``)."""
    from pool_managerd.adapters.engines.ports import allocate_port
    from pool_managerd.adapters.http_probe import probe

    times = []
    for _ in range(samples):
        port = allocate_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(engine), "--host", "127.0.0.1", "--port", str(port)])
        while not (await probe("127.0.0.1", port, "/health", 1.0, 1.0)).ok:
            await asyncio.sleep(0.001)
        times.append(time.perf_counter() - t0)
        proc.kill()
        proc.wait()
    return statistics.median(times)


async def pools_states(client: PoolClient) -> dict[str, tuple[str, int | None]]:
    reply = await client.node("bench", "pools", timeout=10)
    if not isinstance(reply, PoolsReply):
        return {}
    return {s.pool: (s.state, s.engine.pid if s.engine else None) for s in reply.pools}


async def wait_serving(nc: nats.NATS, pool: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await nc.request(f"poold.cmd.{pool}.status", b"", timeout=1)
            if isinstance(REPLY_DECODER.decode(msg.data), StatusReply):
                return
        except Exception:  # the daemon is still starting
            await asyncio.sleep(0.02)
    raise SystemExit(f"daemon not serving {pool} within {timeout} s")


async def wait_all_ready(client: PoolClient, pools: list[str], timeout: float) -> dict[str, int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = await pools_states(client)
        if len(states) == len(pools) and all(state == "ready" for state, _ in states.values()):
            return {p: pid for p, (_, pid) in states.items()}
        await asyncio.sleep(0.05)
    raise SystemExit(f"not every pool ready within {timeout} s")


async def one_size(n: int, args: argparse.Namespace, engine: Path, tmp: Path) -> dict[str, Any]:
    work = tmp / f"n{n}"
    work.mkdir()
    server = NatsServer(store_dir=work / "nats").start()
    echo = subprocess.Popen(echo_responder.argv(server.url), stdout=subprocess.PIPE, start_new_session=True)
    cfg = work / "bench.toml"
    pools = write_config(cfg, work / "run", server.url, engine, n)
    profile = args.profile / f"n{n}" if args.profile else None
    daemon = start_daemon(cfg, work / "daemon.log", profile)
    out: dict[str, Any] = {"pools": n}
    try:
        assert echo.stdout is not None
        echo.stdout.readline()
        nc = await nats.connect(server.url, max_reconnect_attempts=-1)
        client = PoolClient(nc, timeout=10)
        await wait_serving(nc, pools[-1], 120)
        await asyncio.sleep(1.0)
        rss_before = status_field(daemon.pid, "VmRSS")

        # -- preload all at once ---------------------------------------------------------------
        ready: set[str] = set()
        all_ready = asyncio.Event()

        async def on_change(msg: Any) -> None:
            if b'"dst":"ready"' in msg.data:
                ready.add(msg.subject.split(".")[2])
                if len(ready) == n:
                    all_ready.set()

        sub = await nc.subscribe("poold.evt.*.state_changed", cb=on_change)
        await nc.flush()
        if profile is not None:
            daemon.send_signal(signal.SIGUSR1)  # profile-1: the preload
        t0 = time.perf_counter()
        body = json.dumps({"command_id": "x"}).encode()
        replies = await asyncio.gather(
            *(nc.request(f"poold.cmd.{p}.preload", body.replace(b"x", uuid.uuid4().hex.encode()), timeout=60)
              for p in pools)
        )  # fmt: skip
        assert all(r.data.startswith(b'{"type":"accepted"') for r in replies), replies[0].data
        await asyncio.wait_for(all_ready.wait(), 300)
        out["preload_all_s"] = round(time.perf_counter() - t0, 3)
        if profile is not None:
            daemon.send_signal(signal.SIGUSR1)
        await sub.unsubscribe()

        # -- idle steady state -----------------------------------------------------------------
        await asyncio.sleep(5.0)  # let preload-time work (KV writes, acks) settle
        counts = {"kv": 0, "health": 0}

        async def count_kv(_msg: Any) -> None:
            counts["kv"] += 1

        async def count_health(_msg: Any) -> None:
            counts["health"] += 1

        kv_sub = await nc.subscribe("$KV.poold_pools.>", cb=count_kv)
        health_sub = await nc.subscribe("poold.health.>", cb=count_health)
        await nc.flush()
        if profile is not None:
            daemon.send_signal(signal.SIGUSR1)  # profile-2: the idle window (runtime/profiling.py)
        c0, w0 = cpu_s(daemon.pid), time.monotonic()
        await asyncio.sleep(args.idle_s)
        c1, w1 = cpu_s(daemon.pid), time.monotonic()
        if profile is not None:
            daemon.send_signal(signal.SIGUSR1)
        await kv_sub.unsubscribe()
        await health_sub.unsubscribe()
        cores = (c1 - c0) / (w1 - w0)
        rss = status_field(daemon.pid, "VmRSS")
        out.update(
            idle_cores=round(cores, 4),
            cpu_ms_per_pool_s=round(cores * 1000 / n, 4),
            rss_mib=round(rss / 1024, 1),
            rss_kib_per_pool=round((rss - rss_before) / n, 1),
            threads=status_field(daemon.pid, "Threads"),
            kv_puts_per_s=round(counts["kv"] / (w1 - w0), 2),
            health_msgs_per_s=round(counts["health"] / (w1 - w0), 2),
        )

        # -- status latency against a raw echo -------------------------------------------------
        # A request that times out counts at its timeout (and is counted): on a loaded machine one
        # can, and a bench that stops there measures nothing.
        timeouts = {"raw": 0, "status": 0}

        async def timed(kind: str, subject: str) -> float:
            t0 = time.perf_counter()
            try:
                await nc.request(subject, b"", timeout=2)
            except nats.errors.TimeoutError:
                timeouts[kind] += 1
            return (time.perf_counter() - t0) * 1e6

        target = pools[n // 2]
        for _ in range(100):
            await timed("raw", "bench.echo")
            await timed("status", f"poold.cmd.{target}.status")
        timeouts = {"raw": 0, "status": 0}
        raw: list[float] = []
        status: list[float] = []
        for i in range(args.requests):
            raw.append(await timed("raw", "bench.echo"))
            status.append(await timed("status", f"poold.cmd.{pools[i % n]}.status"))
        out["request_timeouts"] = timeouts
        out.update(
            raw_p50_us=round(pct(raw, 50)),
            raw_p99_us=round(pct(raw, 99)),
            status_p50_us=round(pct(status, 50)),
            status_p99_us=round(pct(status, 99)),
            status_ratio_p99=round(pct(status, 99) / pct(raw, 99), 2),
        )

        # -- node reply sizes ------------------------------------------------------------------
        sizes = {}
        for name, subject in (
            ("pools_page", "poold.node.bench.cmd.pools"),
            ("inventory", "poold.node.bench.cmd.inventory"),
            ("srv_info", "$SRV.INFO.pool-managerd"),
            ("srv_stats", "$SRV.STATS.pool-managerd"),
        ):
            msg = await nc.request(subject, b"", timeout=10)
            sizes[name] = len(msg.data)
        out["reply_bytes"] = sizes
        out["max_payload"] = nc.max_payload

        # -- recovery after SIGKILL ------------------------------------------------------------
        before = await wait_all_ready(client, pools, 30)
        daemon.kill()
        daemon.wait()
        t0 = time.perf_counter()
        daemon = start_daemon(cfg, work / "daemon.log", profile / "recovery" if profile else None, from_start=True)
        after = await wait_all_ready(client, pools, 120)
        out["recovery_s"] = round(time.perf_counter() - t0, 3)
        if profile is not None:
            daemon.send_signal(signal.SIGUSR1)  # recovery/profile-1: start-up until all ready
        out["engines_adopted"] = sum(1 for p in pools if after.get(p) == before.get(p))

        # -- graceful shutdown -----------------------------------------------------------------
        pids = [pid for pid in after.values() if pid]
        t0 = time.perf_counter()
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(daemon.wait, 60)
        except subprocess.TimeoutExpired:
            rc = None
        out["shutdown_s"] = round(time.perf_counter() - t0, 3)
        out["shutdown_rc"] = rc
        out["engines_left"] = sum(1 for pid in pids if Path(f"/proc/{pid}").exists() and _alive(pid))
        await nc.close()
    finally:
        for proc in (daemon, echo):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # Whatever a failed run left: the engines are the tiny engine, found by their executable.
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink(f"/proc/{name}/exe") == str(engine):
                        os.kill(int(name), signal.SIGKILL)
                except OSError:
                    pass
        server.stop()
    return out


def _alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def table(rows: list[dict[str, Any]], engine_s: float) -> None:
    cols = [
        ("pools", "pools", "{}"),
        ("idle cores", "idle_cores", "{:.3f}"),
        ("ms/pool-s", "cpu_ms_per_pool_s", "{:.3f}"),
        ("RSS MiB", "rss_mib", "{:.0f}"),
        ("KiB/pool", "rss_kib_per_pool", "{:.0f}"),
        ("threads", "threads", "{}"),
        ("KV/s", "kv_puts_per_s", "{:.1f}"),
        ("health/s", "health_msgs_per_s", "{:.1f}"),
        ("preload s", "preload_all_s", "{:.2f}"),
        ("st p50 us", "status_p50_us", "{}"),
        ("st p99 us", "status_p99_us", "{}"),
        ("raw p99 us", "raw_p99_us", "{}"),
        ("p99 ratio", "status_ratio_p99", "{:.2f}"),
        ("recover s", "recovery_s", "{:.2f}"),
        ("stop s", "shutdown_s", "{:.2f}"),
        ("rc", "shutdown_rc", "{}"),
    ]
    print("  ".join(f"{h:>10}" for h, _, _ in cols))
    for row in rows:
        print("  ".join(f"{fmt.format(row[k]) if row.get(k) is not None else '-':>10}" for _, k, fmt in cols))
    print(f"engine's own start (fork, exec, first 200): {engine_s * 1000:.1f} ms")
    for row in rows:
        s = row["reply_bytes"]
        print(f"N={row['pools']}: reply bytes pools page {s['pools_page']}, inventory {s['inventory']}, "
              f"$SRV.INFO {s['srv_info']}, $SRV.STATS {s['srv_stats']} (max payload {row['max_payload']}); "
              f"engines adopted {row['engines_adopted']}/{row['pools']}, "
              f"left after stop {row['engines_left']}")  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="poold-scale-"))
    engine = build_engine(tmp)
    engine_s = await engine_start_s(engine)
    rows = []
    for n in args.sizes:
        row = await one_size(n, args, engine, tmp)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    table(rows, engine_s)
    if args.keep:
        print(f"kept {tmp} (daemon logs under n<N>/daemon.log)", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"engine_start_s": round(engine_s, 4), "idle_s": args.idle_s, "sizes": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 1000])
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, daemon logs)")
    ap.add_argument(
        "--profile", type=Path, default=None, help="cProfile each daemon's preload and idle windows into this directory"
    )
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
