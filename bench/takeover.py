"""Standby takeover time over a real nats-server: a graceful hand-over (the owner releases its
lease; the baseline) vs a lapsed lease (the owner goes silent, as a killed host does), from the
moment the owner is gone to the standby's ``pool_claimed`` and to the pool ``ready`` on it.

    .venv/bin/python bench/takeover.py [--trials 3] [--ttl 2.0] [--margin 0.4]

Both daemons run in this process (distinct node ids and run dirs), with fake engines and
simulated GPUs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.config import load_config
from pool_managerd.contract.messages import EVENT_DECODER, PoolClaimed, PoolReleased, StateChanged
from pool_managerd.runtime.daemon import Daemon

POOL = {"id": "chat", "engine": "fake", "extra_args": ["--load-time", "0.1"], "model_bytes": 1_000_000_000,
        "stop_grace_s": 0.5}  # fmt: skip


async def daemon(url: str, node: str, run_dir: Path, ttl: float, margin: float) -> Daemon:
    config = load_config(None, node=node, run_dir=run_dir / node, gpus="sim:hetero-24g-48g", heartbeat_s=5.0,
                         nats={"urls": [url]}, pools=[POOL],
                         ownership={"lease_ttl_s": ttl, "lease_margin_s": margin})  # fmt: skip
    d = Daemon(config)
    await d.start()
    return d


async def trial(url: str, tmp: Path, lapse: bool, ttl: float, margin: float) -> tuple[float, float]:
    nc = await nats.connect(url)
    claimed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    released: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def on_event(msg: Msg) -> None:
        event = EVENT_DECODER.decode(msg.data)
        if isinstance(event.body, PoolReleased) and event.node == "node-a" and not released.done():
            released.set_result(time.monotonic())
        if event.node != "node-b":
            return
        if isinstance(event.body, PoolClaimed) and not claimed.done():
            claimed.set_result(time.monotonic())
        if isinstance(event.body, StateChanged) and event.body.dst == "ready" and not ready.done():
            ready.set_result(time.monotonic())

    await nc.subscribe("poold.evt.chat.>", cb=on_event)
    await nc.flush()
    a = await daemon(url, "node-a", tmp, ttl, margin)
    assert a.runtime is not None
    await a.runtime.command("chat", _preload())
    await a.runtime.wait_state("chat", frozenset({"ready"}))
    b = await daemon(url, "node-b", tmp, ttl, margin)
    if lapse:
        # As a killed host: no more renewals, no release, nothing more written; its engine goes.
        assert a.ownership is not None
        engine = a.runtime.lifecycle.registry.snapshot("chat").engine
        await a.ownership.close()
        a.ownership.held.clear()
        gone = time.monotonic()
        await a.stop(stop_engines=False)
        if engine is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.pgid, signal.SIGKILL)
    else:
        await a.stop()
        gone = await asyncio.wait_for(released, 10)  # its pool_released, just before the record says so
    t_claim = await asyncio.wait_for(claimed, ttl * 4 + 10)
    t_ready = t_claim
    if lapse:
        t_ready = await asyncio.wait_for(ready, 30)  # it was serving: the standby preloads it again
    await b.stop()
    await nc.close()
    return t_claim - gone, t_ready - gone


def _preload() -> Any:
    from pool_managerd.contract.messages import PreloadCmd

    return PreloadCmd(command_id=f"bench-{time.monotonic_ns()}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--margin", type=float, default=0.4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the daemons' takeover warnings are what is measured
    figures: dict[str, list[float]] = {"release_claim_s": [], "lapse_claim_s": [], "lapse_ready_s": []}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = NatsServer(store_dir=tmp / "nats")
        server.start()
        try:
            for i in range(args.trials):
                # Each trial on a pool history of its own: a fresh run dir, the same server.
                claim, _ = await trial(server.url, tmp / f"release-{i}", False, args.ttl, args.margin)
                figures["release_claim_s"].append(claim)
                claim, ready = await trial(server.url, tmp / f"lapse-{i}", True, args.ttl, args.margin)
                figures["lapse_claim_s"].append(claim)
                figures["lapse_ready_s"].append(ready)
        finally:
            server.close()
    bound = args.ttl + args.margin
    print(f"lease ttl {args.ttl} s, margin {args.margin} s: a lapsed lease may be claimed {bound} s after "
          f"its last renewal was seen; {args.trials} trial(s) each")  # fmt: skip
    print(f"{'hand-over':<34}{'median s':>10}{'max s':>10}")
    rows = {"released (baseline): claim": "release_claim_s", "lapsed: claim": "lapse_claim_s",
            "lapsed: ready on the standby": "lapse_ready_s"}  # fmt: skip
    out: dict[str, Any] = {"ttl_s": args.ttl, "margin_s": args.margin, "trials": args.trials}
    for label, key in rows.items():
        values = figures[key]
        print(f"{label:<34}{statistics.median(values):>10.3f}{max(values):>10.3f}")
        out[key] = round(statistics.median(values), 3)
        out[key.replace("_s", "_max_s")] = round(max(values), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
