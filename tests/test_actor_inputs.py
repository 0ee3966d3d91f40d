"""Bounds: a pool's input queue under a flood of health reports (anyone may publish them) or
commands, the command cache by count and age, the digest cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.host_facts import sha256_file
from pool_managerd.config import PoolConfig
from pool_managerd.contract.messages import HealthReport, Rejected, StopCmd
from pool_managerd.runtime.actor import MAX_QUEUED_COMMANDS, MAX_QUEUED_HEALTH
from pool_managerd.runtime.commands import CommandCache
from pool_managerd.runtime.pools import PoolRuntime, RuntimeOptions
from pool_managerd.testing.memory_sink import MemoryEventSink


async def test_a_flood_of_health_reports_is_bounded(tmp_path: Path) -> None:
    snapshot = load_gpu_source("sim:hetero-24g-48g")
    rt = PoolRuntime(MemoryEventSink(), lambda: snapshot, RuntimeOptions(run_dir=tmp_path))
    actor = rt.add_pool(PoolConfig(id="p", engine="fake").definition(), simulated=True)
    try:
        # Queued synchronously, before the actor's loop gets a turn: the worst case.
        accepted = [rt.health_report(HealthReport(pool="p", ts=float(i), ok=False)) for i in range(200)]
        assert accepted.count(True) == MAX_QUEUED_HEALTH
        assert actor.stats.health_dropped == 200 - MAX_QUEUED_HEALTH
        assert rt.health_report(HealthReport(pool="other", ts=1.0, ok=True)) is False  # not ours
    finally:
        await rt.close()
    # Once processed, the budget is free again.
    assert actor._health_queued == 0


async def test_commands_past_the_pools_bound_are_answered_overloaded(tmp_path: Path) -> None:
    snapshot = load_gpu_source("sim:hetero-24g-48g")
    sink = MemoryEventSink()
    rt = PoolRuntime(sink, lambda: snapshot, RuntimeOptions(run_dir=tmp_path))
    rt.add_pool(PoolConfig(id="p", engine="fake").definition(), simulated=True)
    try:
        # All submitted before the actor's loop gets a turn: the worst case.
        replies = await asyncio.gather(*(rt.command("p", StopCmd(command_id=f"s{i}")) for i in range(100)))
        codes = [r.code for r in replies if isinstance(r, Rejected)]
        assert codes.count("overloaded") == 100 - MAX_QUEUED_COMMANDS
        assert codes.count("illegal_transition") == MAX_QUEUED_COMMANDS  # stop while unready
        # Refusals change nothing, so nothing is in the log, and the budget is free again.
        assert sink.of("p") == []
        again = await rt.command("p", StopCmd(command_id="later"))
        assert isinstance(again, Rejected) and again.code == "illegal_transition"
    finally:
        await rt.close()


async def test_the_command_cache_is_bounded_by_count_and_age_and_keeps_what_is_in_flight() -> None:
    now = [1000.0]
    cache = CommandCache(max_entries=3, ttl_s=10.0, clock=lambda: now[0])
    gate = asyncio.Event()

    async def slow() -> bytes:
        await gate.wait()
        return b"slow"

    in_flight = asyncio.ensure_future(cache.run("p", "first", "stop:a", slow))
    await asyncio.sleep(0)  # ok: lets the first command enter the cache
    for i in range(5):
        assert await cache.run("p", f"c{i}", "stop:b", _answer(f"r{i}")) == f"r{i}".encode()
    assert len(cache) == 3 + 1, "the entry in flight is kept, the oldest finished ones go"
    assert await cache.run("p", "c4", "stop:b", _answer("again")) == b"r4"  # a hit
    now[0] += 11.0
    assert await cache.run("p", "c5", "stop:b", _answer("r5")) == b"r5"
    assert len(cache) == 2, "aged entries behind the one in flight expire too"
    gate.set()
    assert await in_flight == b"slow"
    # Rebuilt replies age from when they were given.
    cache.seed("p", "old", "lease:x", b"gone", at=now[0] - 11.0)
    cache.seed("p", "kept", "lease:x", b"kept", at=now[0] - 1.0)
    assert await cache.run("p", "kept", "lease:x", _answer("no")) == b"kept"
    assert await cache.run("p", "old", "lease:x", _answer("fresh")) == b"fresh"


def _answer(text: str) -> Callable[[], Awaitable[bytes]]:
    async def apply() -> bytes:
        return text.encode()

    return apply


def test_model_digests_are_cached_by_path_size_and_mtime(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"a" * 4096)
    first = sha256_file(model)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()
    # Same size and mtime: the cached digest is returned without reading the file again.
    st = model.stat()
    model.write_bytes(b"b" * 4096)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(model) == first
    # A rewrite that changes the mtime is hashed again.
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(model) == hashlib.sha256(b"b" * 4096).hexdigest()
