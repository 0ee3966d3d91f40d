"""More engines than ``select()`` could watch: every exit seen, a clean stop, no thread per engine.

The engines are ``sleep`` processes (the tiniest thing that runs until told otherwise): the
process adapter only cares that they run, exit and lead their own process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from pool_managerd.adapters.engines.handles import AdoptedProcess, EngineHandle, ExitInfo
from pool_managerd.adapters.engines.procs import pid_alive, proc_start_ticks
from pool_managerd.adapters.engines.record import SpawnEntry, SpawnRecord
from pool_managerd.adapters.engines.spawn import spawn
from support.deadlines import MANY_ENGINES_S
from support.procs import track_pid

COUNT = 1100  # beyond 1,024: the descriptor numbers the watchers use pass FD_SETSIZE


def _highest_fd() -> int:
    return max(int(n) for n in os.listdir("/proc/self/fd"))


def _pidfds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += "pidfd" in os.readlink(f"/proc/self/fd/{name}")
    return count


async def _start_detached(count: int) -> list[int]:
    """Start ``count`` sleeps in their own sessions that are not our children (their parent
    exits), as a previous daemon's engines are after it died."""
    script = 'i=0; while [ "$i" -lt "$1" ]; do setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!; i=$((i+1)); done'
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", script, "sh", str(count), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    pids = [int(line) for line in out.split()]
    for pid in pids:
        track_pid(pid)
    return pids


async def _wait_leading(pids: list[int]) -> None:
    # setsid makes each sleep its group's leader as it starts; wait until all have.
    async with asyncio.timeout(MANY_ENGINES_S):
        for pid in pids:
            while os.getpgid(pid) != pid:
                await asyncio.sleep(0.001)  # ok: setsid() in another process gives no event


async def test_adopting_more_than_1024_engines_sees_every_exit_and_stops_cleanly(tmp_path: Path) -> None:
    pids = await _start_detached(COUNT)
    assert len(pids) == COUNT
    await _wait_leading(pids)
    record = SpawnRecord(tmp_path / "engines.json", fsync=False)
    entries = [
        SpawnEntry(f"p{i}", pid, pid, 20000 + i, "127.0.0.1", 0.0, ["sleep", "600"], None, proc_start_ticks(pid))
        for i, pid in enumerate(pids)
    ]
    for entry in entries:
        record.add(entry)
    threads_before = threading.active_count()

    exits: dict[int, ExitInfo] = {}
    all_seen = asyncio.Event()

    def on_exit(handle: EngineHandle, info: ExitInfo) -> None:
        exits[handle.pid] = info
        if len(exits) == COUNT:
            all_seen.set()

    handles = [AdoptedProcess.adopt(e, record=record, on_exit=on_exit) for e in SpawnRecord.load(record.path)]
    assert all(h is not None for h in handles)
    adopted = [h for h in handles if h is not None]
    deadline = time.monotonic() + 10.0
    while _highest_fd() <= 1024 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # ok: watcher tasks open their pidfds; nothing to wait on but the count
    assert _highest_fd() > 1024, "the watchers must hold descriptors above FD_SETSIZE"
    assert all(h.running for h in adopted), "a watcher died"

    # Half crash (killed from outside): each exit is seen, unexpected.
    crashed = adopted[: COUNT // 2]
    for h in crashed:
        os.kill(h.pid, signal.SIGKILL)
    async with asyncio.timeout(MANY_ENGINES_S):
        await asyncio.gather(*(h.wait() for h in crashed))
    assert all(not exits[h.pid].expected for h in crashed)

    # The rest are stopped as a shutdown does, all at once.
    rest = adopted[COUNT // 2 :]
    async with asyncio.timeout(MANY_ENGINES_S):
        infos = await asyncio.gather(*(h.stop(5.0) for h in rest))
        await all_seen.wait()
    assert all(info.expected for info in infos)
    assert sorted(exits) == sorted(pids)
    assert not any(pid_alive(pid) for pid in pids)
    assert SpawnRecord.load(record.path) == []
    # Watching cost descriptors, not threads (the worker pool for record updates is bounded).
    assert threading.active_count() - threads_before <= 40
    assert _pidfds() == 0, "every pidfd is closed once its engine is gone"


async def test_spawning_more_than_1024_engines_costs_no_thread_each(tmp_path: Path) -> None:
    record = SpawnRecord(tmp_path / "engines.json", fsync=False)
    threads_before = threading.active_count()
    exits: list[ExitInfo] = []
    engines = []
    try:
        for i in range(COUNT):
            engine = await spawn(["sleep", "600"], pool=f"p{i}", port=20000 + i, check_port=False, record=record,
                                 on_exit=lambda e, info: exits.append(info))  # fmt: skip
            engines.append(engine)
        assert len(record.entries) == COUNT == len(SpawnRecord.load(record.path))
        assert _highest_fd() > 1024
        # asyncio's watcher on 3.11 would hold a thread per child here.
        assert threading.active_count() - threads_before <= 40
        for engine in engines[:10]:
            os.kill(engine.pid, signal.SIGKILL)
        async with asyncio.timeout(MANY_ENGINES_S):
            crashed = await asyncio.gather(*(e.wait() for e in engines[:10]))
        assert all(info.signal == signal.SIGKILL and not info.expected for info in crashed)
    finally:
        async with asyncio.timeout(MANY_ENGINES_S):
            await asyncio.gather(*(e.stop(5.0) for e in engines))
    assert len(exits) == COUNT
    assert _pidfds() == 0
    assert all(e.returncode is not None for e in engines)  # every child reaped: no zombie left
    assert SpawnRecord.load(record.path) == []
