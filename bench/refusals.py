"""What a refused command costs the history: bytes added to the pool stream and to the audit
stream per refusal, and refusals answered per second, against a real nats-server and daemon.

    .venv/bin/python bench/refusals.py [--refusals 2000] [--concurrency 32]

Baseline, measured in the same run: each refusal appended as a ``command_rejected`` event to the
pool's stream through the fenced publisher, which is what every refusal cost before refusals
moved to the audit stream. Now: the same number of refused ``drain`` commands sent to an unready
pool of a daemon. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path

import nats

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.event_log import EventPublisher, ensure_stream
from pool_managerd.config import load_config
from pool_managerd.contract.messages import REPLY_DECODER, SCHEMA_VERSION, CommandRejected, Event, Rejected
from pool_managerd.contract.subjects import AUDIT_STREAM, STREAM_NAME, Subjects
from pool_managerd.runtime.daemon import Daemon

MESSAGE = "pool 'chat': 'drain' is not allowed in state 'unready' (allowed: preload, status)"


async def stream_bytes(nc: nats.NATS, stream: str) -> int:
    try:
        return int((await nc.jetstream().stream_info(stream)).state.bytes or 0)
    except nats.js.errors.NotFoundError:
        return 0


async def baseline(nc: nats.NATS, n: int, concurrency: int) -> tuple[float, int]:
    """The old cost: one command_rejected event per refusal in the pool stream."""
    await ensure_stream(nc.jetstream(), Subjects())
    before = await stream_bytes(nc, STREAM_NAME)
    publisher = await EventPublisher(nc, Subjects()).start()
    t0 = time.perf_counter()
    futures = []
    for seq in range(1, n + 1):
        body = CommandRejected(verb="drain", code="illegal_transition", message=MESSAGE, state="unready")
        event = Event(v=SCHEMA_VERSION, seq=seq, ts=time.time(), node="bench", pool="old", command_id=f"c{seq}",
                      fingerprint="drain:0123456789abcdef01234567", body=body)  # fmt: skip
        futures.append(publisher.publish_nowait(event))
        if len(futures) >= concurrency:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    took = time.perf_counter() - t0
    await publisher.close()
    return n / took, await stream_bytes(nc, STREAM_NAME) - before


async def now(nc: nats.NATS, url: str, run_dir: Path, n: int, concurrency: int) -> tuple[float, int, int]:
    config = load_config(None, node="bench", run_dir=run_dir, gpus="sim:hetero-24g-48g", heartbeat_s=3600,
                         nats={"urls": [url]}, pools=[{"id": "chat", "engine": "fake"}])  # fmt: skip
    daemon = Daemon(config)
    await daemon.start()
    try:
        events_before = await stream_bytes(nc, STREAM_NAME)
        audit_before = await stream_bytes(nc, AUDIT_STREAM)
        gate = asyncio.Semaphore(concurrency)

        async def refuse(i: int) -> None:
            async with gate:
                msg = await nc.request("poold.cmd.chat.drain", json.dumps({"command_id": f"r{i}"}).encode(), timeout=10)
                assert isinstance(REPLY_DECODER.decode(msg.data), Rejected)

        t0 = time.perf_counter()
        await asyncio.gather(*(refuse(i) for i in range(n)))
        took = time.perf_counter() - t0
        deadline = time.monotonic() + 10
        while daemon.audit is not None and daemon.audit.written < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # ok: audit records are written without an ack to wait on
        await nc.flush()
        pool_added = await stream_bytes(nc, STREAM_NAME) - events_before
        audit_added = await stream_bytes(nc, AUDIT_STREAM) - audit_before
    finally:
        await daemon.stop()
    return n / took, pool_added, audit_added


async def main(args: argparse.Namespace) -> dict[str, float]:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats")
        server.start()
        try:
            nc = await nats.connect(server.url)
            try:
                old_rate, old_bytes = await baseline(nc, args.refusals, args.concurrency)
                new_rate, pool_bytes, audit_bytes = await now(nc, server.url, Path(tmp) / "run", args.refusals,
                                                             args.concurrency)  # fmt: skip
            finally:
                await nc.close()
        finally:
            server.close()
    n = args.refusals
    result = {
        "refusals": n,
        "baseline_pool_stream_bytes_per_refusal": round(old_bytes / n, 1),
        "baseline_appends_per_s": round(old_rate, 1),
        "pool_stream_bytes_per_refusal": round(pool_bytes / n, 1),
        "audit_stream_bytes_per_refusal": round(audit_bytes / n, 1),
        "refusals_answered_per_s": round(new_rate, 1),
        "audit_max_bytes_holds_refusals": round(64 * 1024 * 1024 / max(1.0, audit_bytes / n)),
    }
    print(f"{'':40} {'pool stream B':>14} {'audit B':>9} {'per s':>9}")
    print(f"{'before: command_rejected per refusal':40} {old_bytes / n:14.1f} {0:9.1f} {old_rate:9.1f}")
    print(f"{'now: refusal to the audit stream':40} {pool_bytes / n:14.1f} {audit_bytes / n:9.1f} {new_rate:9.1f}")
    print(f"64 MiB of audit stream holds ~{result['audit_max_bytes_holds_refusals']} refusals")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refusals", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
