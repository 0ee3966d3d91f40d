"""The web dashboard with 1,000 pools: time to the first full render of the table, and time for
one snapshot update to show in the page, in headless Chromium over a real nats-server.

    .venv/bin/python bench/dashboard_render.py [--pools 1000] [--loads 5] [--updates 100]

* first render: from navigation to every pool's row in the table (page load, websocket
  connect, KV watch of every snapshot, DOM), measured outside the page;
* reflect: from the moment a snapshot is written (``kv.put``) to the moment the row's state
  attribute changes in the page (a MutationObserver stamps it), both on this host's clock;
* baseline: the same write seen by a nats-py KV watcher in this process, so the figure shows
  what the page adds to what the contract itself costs.

Pools are simulated (snapshots written straight into the bucket); no daemon runs. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from playwright.async_api import async_playwright

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.event_log import ensure_kv, ensure_stream
from pool_managerd.contract.messages import PoolSnapshot, encode
from pool_managerd.contract.subjects import Subjects
from pool_managerd.dashboard import DashboardServer, PageConfig

CHROMIUM = os.environ.get("POOL_MANAGERD_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
STATES = ["ready", "draining"]


def snapshot(i: int, state: str) -> bytes:
    return encode(PoolSnapshot(pool=f"p{i:04d}", node=f"node-{i % 10}", state=state, seq=2,  # type: ignore[arg-type]
                               model=f"model-{i % 7}", device_mask=["0"], slots_total=4, restarts=i % 3,
                               simulated=True, updated_at=time.time(), last_event="engine_ready"))  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


OBSERVE = """(pool) => { window.__shown = new Promise((resolve) => {
    const tr = document.querySelector(`#pools tr[data-pool="${pool}"]`);
    const before = tr.dataset.state;
    const obs = new MutationObserver(() => {
        if (tr.dataset.state !== before) { obs.disconnect(); resolve(performance.timeOrigin + performance.now()); }
    });
    obs.observe(tr, { attributes: true, attributeFilter: ["data-state"] });
}); }"""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="poold-bench-dash-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats", websocket_port=0).start()
        dashboard = None
        try:
            assert server.ws_url is not None
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_stream(js, Subjects())
            kv = await ensure_kv(js)
            await asyncio.gather(*(kv.put(f"p{i:04d}", snapshot(i, "ready")) for i in range(args.pools)))
            dashboard = DashboardServer(PageConfig(server=server.ws_url)).start()
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                first: list[float] = []
                synced: list[float] = []
                painted: list[float] = []
                page: Any = None
                for _ in range(args.loads):
                    if page is not None:
                        await page.context.close()
                    context = await browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
                    page = await context.new_page()
                    t0 = time.perf_counter()
                    await page.goto(dashboard.url)
                    await page.wait_for_selector(f'#pool-count[data-total="{args.pools}"]', timeout=60_000)
                    # Rendered, not just counted: the last row is laid out with its cells.
                    await page.wait_for_function(
                        f"document.querySelectorAll('#pools tbody tr').length === {args.pools}"
                        " && document.querySelector('#pools tbody tr:last-child td.c-state span') !== null",
                        timeout=60_000,
                    )
                    first.append((time.perf_counter() - t0) * 1000)
                    # The page's own marks (ms since navigation start): no CDP round trip in them.
                    await page.wait_for_function("window.__poold.timings.firstPaint !== undefined")
                    marks = await page.evaluate("window.__poold.timings")
                    synced.append(marks["synced"])
                    painted.append(marks["firstPaint"])

                # Baseline: the same writes seen by a KV watcher in this process.
                waiting: dict[str, asyncio.Future[float]] = {}
                watcher = await kv.watch(">", include_history=False)
                async for entry in watcher:  # the current values first, then a None marker
                    if entry is None:
                        break

                async def follow() -> None:
                    async for entry in watcher:
                        fut = waiting.pop(entry.key, None) if entry is not None else None
                        if fut is not None and not fut.done():
                            fut.set_result(time.time() * 1000)

                follower = asyncio.create_task(follow())
                reflect: list[float] = []
                base: list[float] = []
                loop = asyncio.get_running_loop()
                for n in range(args.updates):
                    i = (n * 37) % args.pools
                    pool = f"p{i:04d}"
                    await page.evaluate(OBSERVE, pool)  # armed once this returns
                    waiting[pool] = seen = loop.create_future()
                    t_put = time.time() * 1000
                    await kv.put(pool, snapshot(i, STATES[(n // args.pools + 1) % 2]))
                    reflect.append(await page.evaluate("window.__shown") - t_put)
                    base.append(await asyncio.wait_for(seen, 10) - t_put)
                follower.cancel()
                await watcher.stop()
                await browser.close()
            await nc.close()
        finally:
            if dashboard is not None:
                dashboard.stop()
            server.close()

    print(f"\n{args.pools} simulated pools, headless Chromium ({CHROMIUM})\n")
    print(f"{'measure (ms)':<40}{'n':>6}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    rows = [("first full render (navigation -> rows)", first), ("  in-page: KV watch caught up", synced),
            ("  in-page: every row painted", painted), ("update -> row in the page", reflect),
            ("baseline: update -> nats-py KV watcher", base)]  # fmt: skip
    for name, values in rows:
        print(f"{name:<40}{len(values):>6}{pct(values, 50):>10.1f}{pct(values, 90):>10.1f}"
              f"{pct(values, 99):>10.1f}{max(values):>10.1f}")  # fmt: skip
    return {
        "pools": args.pools,
        "first_render_p50_ms": round(pct(first, 50), 1),
        "first_render_max_ms": round(max(first), 1),
        "in_page_synced_p50_ms": round(pct(synced, 50), 1),
        "in_page_painted_p50_ms": round(pct(painted, 50), 1),
        "reflect_p50_ms": round(pct(reflect, 50), 2),
        "reflect_p99_ms": round(pct(reflect, 99), 2),
        "baseline_watch_p50_ms": round(pct(base, 50), 2),
        "baseline_watch_p99_ms": round(pct(base, 99), 2),
        "reflect_minus_baseline_p50_ms": round(pct(reflect, 50) - pct(base, 50), 2),
        "loads": args.loads,
        "updates": args.updates,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--updates", type=int, default=100)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
