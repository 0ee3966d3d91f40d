"""Engine process adapter: argv templates, ports, logs, spawn/stop/group kill, the spawn record."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pool_managerd.adapters.engines.argv import render_argv
from pool_managerd.adapters.engines.errors import SpawnError, SpawnRecordError, TemplateError
from pool_managerd.adapters.engines.handles import AdoptedProcess, ExitInfo
from pool_managerd.adapters.engines.logs import rotate_log
from pool_managerd.adapters.engines.ports import PortAllocator, allocate_port
from pool_managerd.adapters.engines.procs import (
    GroupScans,
    kill_group,
    pid_alive,
    proc_start_ticks,
    stop_group,
    wait_group_gone,
    wait_pid_exit,
)
from pool_managerd.adapters.engines.record import SpawnEntry, SpawnRecord
from pool_managerd.adapters.engines.spawn import spawn
from pool_managerd.adapters.host_facts import port_is_free
from support.deadlines import ENGINE_S
from support.procs import FakeEngines, read_log, track_pid, wait_ready


@pytest.fixture
async def fakes(tmp_path: Path, _no_leaks: None) -> AsyncIterator[FakeEngines]:
    f = FakeEngines(tmp_path)
    yield f
    await f.close()


async def assert_gone(pid: int) -> None:
    """The pid exits (or is a zombie, which holds nothing) before the deadline."""
    assert await wait_pid_exit(pid, ENGINE_S), f"pid {pid} is still alive"
    assert not pid_alive(pid)


# -- render_argv --------------------------------------------------------------------------------

VALUES: dict[str, str | int] = {
    "model": "/m/x y.gguf",
    "port": 8081,
    "host": "127.0.0.1",
    "tensor_split": "3,1",
    "n_gpus": 2,
}


def test_render_substitutes_inside_elements_without_a_shell() -> None:
    tpl = ["llama-server", "--model", "{model}", "--port", "{port}", "--host={host}", "-ts", "{tensor_split}"]
    assert render_argv(tpl, VALUES) == [
        "llama-server", "--model", "/m/x y.gguf", "--port", "8081", "--host=127.0.0.1", "-ts", "3,1",
    ]  # fmt: skip
    assert render_argv(["e", "--tp={n_gpus}", "{{literal}}", "$(rm -rf /);"], VALUES) == [
        "e", "--tp=2", "{literal}", "$(rm -rf /);",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (["e", "--tensor-split", "{tensor_split}", "-ngl", "99"], ["e", "-ngl", "99"]),
        (["e", "-ts", "{tensor_split}"], ["e"]),
        (["e", "--tensor-split={tensor_split}", "x"], ["e", "x"]),
        (["e", "--other", "{tensor_split}"], ["e", "--other"]),
        (["e", "--ts-is={tensor_split}"], ["e", "--ts-is="]),
    ],
)
def test_render_empty_tensor_split_drops_its_flag(template: list[str], expected: list[str]) -> None:
    assert render_argv(template, {**VALUES, "tensor_split": ""}) == expected
    no_split = {k: v for k, v in VALUES.items() if k != "tensor_split"}
    assert render_argv(template, no_split) == expected


@pytest.mark.parametrize(
    ("template", "match"),
    [
        (["e", "{gpu}"], "unknown placeholder"),
        (["e", "{}"], "unknown placeholder"),
        (["e", "{model.name}"], "unknown placeholder"),
        (["e", "{port:>6}"], "format specs"),
        (["e", "{port!r}"], "format specs"),
        (["e", "{model"], "argv element"),
        (["e", "model}"], "argv element"),
        ([], "empty"),
        (["{tensor_split}"], "no executable"),
    ],
)
def test_render_errors_are_typed(template: list[str], match: str) -> None:
    with pytest.raises(TemplateError, match=match) as info:
        render_argv(template, {**VALUES, "tensor_split": ""})
    assert info.value.code == "bad_request"


def test_render_required_placeholder_needs_a_value() -> None:
    with pytest.raises(TemplateError, match=r"no value for \{model\}"):
        render_argv(["e", "--model", "{model}"], {**VALUES, "model": ""})
    with pytest.raises(TemplateError, match=r"no value for \{port\}"):
        render_argv(["e", "{port}"], {})


# -- ports and logs ----------------------------------------------------------------------------


def test_allocate_port_and_port_is_free() -> None:
    port = allocate_port("127.0.0.1")
    assert 0 < port < 65536
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_is_free("127.0.0.1", port)
    assert port_is_free("127.0.0.1", port)


def test_port_allocator_never_hands_out_a_port_it_holds() -> None:
    # Nothing binds the ports meanwhile, as between a gated spawn and its engine's bind: the
    # kernel alone offers some port twice within a couple of thousand asks (bind to 0 starts
    # from a random point of the range each time).
    ports = PortAllocator()
    got = [ports.allocate("127.0.0.1") for _ in range(2000)]
    assert len(set(got)) == len(got) == ports.held
    ports.release("127.0.0.1", got[0])
    ports.release("127.0.0.1", got[0])  # twice, or a port never held: nothing
    ports.release("127.0.0.1", 1)
    assert ports.held == len(got) - 1


def test_rotate_log_keeps_n(tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    assert not rotate_log(log, 10, 2)  # nothing to rotate
    for gen in range(4):
        log.write_text(f"generation {gen} " * 3)
        assert rotate_log(log, 10, 2)
    assert not log.exists()
    assert (tmp_path / "pool.log.1").read_text().startswith("generation 3")
    assert (tmp_path / "pool.log.2").read_text().startswith("generation 2")
    assert not (tmp_path / "pool.log.3").exists()
    log.write_text("small")
    assert not rotate_log(log, 10, 2)
    assert log.read_text() == "small"


async def test_spawn_rotates_an_oversized_log_and_passes_env(fakes: FakeEngines, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "chat.log"
    log.parent.mkdir()
    log.write_text("old engine output\n" * 100)
    engine = await fakes.start(log_path=log, log_max_bytes=1000, log_keep=2, env={"CUDA_VISIBLE_DEVICES": "GPU-abc"})
    await wait_ready(engine)
    assert (tmp_path / "logs" / "chat.log.1").read_text().startswith("old engine output")
    text = read_log(engine)
    assert "old engine output" not in text
    assert "CUDA_VISIBLE_DEVICES=GPU-abc" in text  # the header line
    assert "cuda_visible_devices=GPU-abc" in text  # what the engine itself saw


# -- spawn errors ------------------------------------------------------------------------------


async def test_spawn_missing_binary_is_a_spawn_error(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="executable not found") as info:
        await spawn(["/nonexistent/llama-server"], pool="p", port=allocate_port(), log_path=tmp_path / "p.log")
    assert info.value.reason == "not_found"
    assert "spawn failed" in (tmp_path / "p.log").read_text()
    with pytest.raises(SpawnError, match="not found on PATH"):
        await spawn(["no-such-engine-binary-xyz"], pool="p", port=allocate_port())


async def test_spawn_not_executable_is_a_spawn_error(tmp_path: Path) -> None:
    f = tmp_path / "engine"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    with pytest.raises(SpawnError) as info:
        await spawn([str(f)], pool="p", port=allocate_port())
    assert info.value.reason == "permission"


async def test_spawn_refuses_a_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SpawnError, match="in use") as info:
            await spawn(["true"], pool="p", port=port)
    assert info.value.reason == "port_in_use"


# -- stop and group kill ----------------------------------------------------------------------


async def test_stop_graceful(fakes: FakeEngines) -> None:
    engine = await fakes.start()
    await wait_ready(engine)
    info = await asyncio.wait_for(engine.stop(5.0), ENGINE_S)
    assert (info.exit_code, info.signal, info.expected) == (0, None, True)
    assert not engine.running and engine.returncode == 0


async def test_stop_sigkills_an_engine_that_ignores_sigterm_within_grace(fakes: FakeEngines) -> None:
    grace = 0.5
    engine = await fakes.start("--ignore-sigterm")
    await wait_ready(engine)  # its SIGTERM handler is installed before it listens
    t0 = time.monotonic()
    info = await engine.stop(grace)
    elapsed = time.monotonic() - t0
    assert elapsed < grace + 1.0  # correctness bound: SIGKILL follows the grace period
    assert (info.exit_code, info.signal, info.expected) == (None, signal.SIGKILL, True)
    assert "ignoring SIGTERM" in read_log(engine)


async def test_stop_is_idempotent_and_shared(fakes: FakeEngines) -> None:
    engine = await fakes.start("--ignore-sigterm")
    await wait_ready(engine)
    a, b = await asyncio.gather(engine.stop(0.2), engine.stop(0.2))
    assert a is b
    assert await engine.stop(0.2) is a
    assert await engine.wait() is a
    assert not engine.signal_group(signal.SIGKILL)  # known gone: never signals a reused id


async def test_stop_after_exit_returns_the_exit(fakes: FakeEngines) -> None:
    engine = await fakes.start("--crash-after", "0", "--exit-code", "4")
    info = await asyncio.wait_for(engine.wait(), ENGINE_S)
    assert await engine.stop(1.0) is info
    assert not info.expected


async def test_cancelling_a_stop_caller_does_not_cancel_the_stop(fakes: FakeEngines) -> None:
    engine = await fakes.start("--ignore-sigterm")
    await wait_ready(engine)
    caller = asyncio.ensure_future(engine.stop(0.3))
    await asyncio.sleep(0)  # ok: let the stop start, then cancel its caller
    caller.cancel()
    info = await asyncio.wait_for(engine.wait(), ENGINE_S)
    assert info.signal == signal.SIGKILL


@pytest.mark.parametrize("knobs", [(), ("--ignore-sigterm",)])
async def test_grandchild_dies_with_the_group_on_stop(
    fakes: FakeEngines, tmp_path: Path, knobs: tuple[str, ...]
) -> None:
    pid_file = tmp_path / "gc.pid"
    engine = await fakes.start("--spawn-grandchild", "--grandchild-pid-file", str(pid_file), *knobs)
    await wait_ready(engine)  # the pid file is written before the engine listens
    grandchild = int(pid_file.read_text())
    track_pid(grandchild)
    assert pid_alive(grandchild)
    assert os.getpgid(grandchild) == engine.pgid == engine.pid
    await engine.stop(0.3)
    await assert_gone(grandchild)


async def test_grandchild_dies_when_the_leader_crashes(fakes: FakeEngines, tmp_path: Path) -> None:
    pid_file = tmp_path / "gc.pid"
    engine = await fakes.start(
        "--spawn-grandchild", "--grandchild-pid-file", str(pid_file), "--crash-after-ready", "0.1"
    )
    await wait_ready(engine)
    grandchild = int(pid_file.read_text())
    track_pid(grandchild)
    info = await asyncio.wait_for(engine.wait(), ENGINE_S)  # no stop(): the leader exits alone
    assert info.exit_code == 1
    await assert_gone(grandchild)


async def test_stop_group_for_a_process_we_did_not_wait_on(fakes: FakeEngines, tmp_path: Path) -> None:
    pid_file = tmp_path / "gc.pid"
    engine = await fakes.start("--ignore-sigterm", "--spawn-grandchild", "--grandchild-pid-file", str(pid_file))
    await wait_ready(engine)
    grandchild = int(pid_file.read_text())
    track_pid(grandchild)
    t0 = time.monotonic()
    assert await stop_group(engine.pgid, 0.3)
    assert time.monotonic() - t0 < 0.3 + 1.0 + 1.0  # grace + settle, correctness bound
    assert not pid_alive(grandchild) and not pid_alive(engine.pid)
    assert (await asyncio.wait_for(engine.wait(), ENGINE_S)).signal == signal.SIGKILL
    assert await stop_group(engine.pgid, 0.3)  # an empty group: nothing to do


async def test_waits_on_many_groups_share_their_scans_of_proc() -> None:
    # Zombie leaders nobody reaped yet (as adopted engines' are until another parent reaps
    # them): each group still exists, so only a scan of /proc tells it has no live member.
    zombies = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(40)]
    # A group whose leader exited while its child lives on.
    holder = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout is not None
        track_pid(int(holder.stdout.readline()))
        for proc in zombies:
            proc.kill()
        for proc in [*zombies, holder]:
            assert await wait_pid_exit(proc.pid, ENGINE_S)
        scans = GroupScans()
        gone = await asyncio.gather(
            *(wait_group_gone(proc.pid, ENGINE_S, scans=scans) for proc in zombies),
            wait_group_gone(holder.pid, 0.2, scans=scans),
        )
        assert gone == [True] * len(zombies) + [False]
        assert 1 <= scans.scans <= 3  # one scan for every waiter that asked before it began
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        for proc in [*zombies, holder]:
            proc.kill()
            proc.wait()


def test_kill_group_refuses_dangerous_groups() -> None:
    for pgid in (0, 1, -5, os.getpgrp()):
        with pytest.raises(ValueError):
            kill_group(pgid, 0)


# -- spawn record and adoption -------------------------------------------------------------------


async def test_spawn_record_tracks_live_engines(fakes: FakeEngines, tmp_path: Path) -> None:
    record = SpawnRecord(tmp_path / "run" / "engines.json")
    exits: list[ExitInfo] = []
    engine = await fakes.start(
        "--model", "m.gguf", pool="chat", record=record, on_exit=lambda e, info: exits.append(info)
    )
    (entry,) = SpawnRecord.load(record.path)
    assert entry == SpawnEntry(
        pool="chat",
        pid=engine.pid,
        pgid=engine.pid,
        port=engine.port,
        host="127.0.0.1",
        started_at=engine.started_at,
        argv=engine.argv,
        log_path=str(engine.log_path),
        start_ticks=proc_start_ticks(engine.pid),
    )
    assert entry.is_live()
    assert SpawnRecord(record.path).entries == [entry]  # a restarted daemon finds it
    await wait_ready(engine)
    await engine.stop(2.0)
    assert SpawnRecord.load(record.path) == []
    assert len(exits) == 1
    assert not entry.is_live()
    assert sorted(p.name for p in record.path.parent.iterdir()) == ["engines.json"]  # no temp files


def _entry(pid: int) -> SpawnEntry:
    return SpawnEntry(f"p{pid}", pid, pid, 1000 + pid, "127.0.0.1", 1.0, ["e"], None)


def test_spawn_record_compaction_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "engines.json"
    record = SpawnRecord(path)
    first = _entry(10)
    record.add(first)
    # Churn until the next update compacts the journal (over 64 lines), with the rename failing.
    for pid in range(11, 42):
        record.add(_entry(pid))
        record.remove(pid)
    record.add(_entry(42))
    assert record._lines == 65
    before = path.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        record.remove(42)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert SpawnRecord.load(path) == [first, _entry(42)] == record.entries
    assert [p.name for p in tmp_path.iterdir()] == ["engines.json"]  # no temp file left
    record.remove(42)  # compacts now
    assert SpawnRecord.load(path) == [first]
    assert path.read_bytes().count(b"\n") == 2


def test_spawn_record_updates_cost_one_line(tmp_path: Path) -> None:
    # An update appends one line whatever the number of engines: no rewrite of the whole record.
    path = tmp_path / "engines.json"
    record = SpawnRecord(path, fsync=False)
    sizes = []
    for pid in range(100, 1300):
        before = path.stat().st_size if path.exists() else 0
        record.add(_entry(pid))
        sizes.append(path.stat().st_size - before)
    assert max(sizes[1:]) < 300, max(sizes[1:])
    for pid in range(100, 1300, 2):
        record.remove(pid)
    assert sorted(e.pid for e in SpawnRecord.load(path)) == list(range(101, 1300, 2))
    # Compaction kept the journal within about twice the live entries.
    assert path.read_bytes().count(b"\n") <= 2 * 600 + 2


async def test_spawn_record_updates_asked_for_together_are_written_together(tmp_path: Path) -> None:
    path = tmp_path / "engines.json"
    record = SpawnRecord(path)
    record.add(_entry(1))  # the journal exists: the updates below append to it
    writes = record.writes
    await asyncio.gather(*(record.add_async(_entry(pid)) for pid in range(100, 300)))
    assert sorted(e.pid for e in SpawnRecord.load(path)) == [1, *range(100, 300)]
    await asyncio.gather(*(record.remove_async(pid) for pid in range(100, 300)), record.remove_async(999))
    assert SpawnRecord.load(path) == [_entry(1)] == record.entries
    assert record.writes - writes <= 4  # 400 durable updates, a handful of fsynced writes


async def test_a_spawn_record_batch_that_cannot_be_written_fails_each_caller_and_changes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "engines.json"
    record = SpawnRecord(path)
    record.add(_entry(1))
    path.unlink()
    path.mkdir()  # the journal cannot be opened for appending now
    updates = (record.add_async(_entry(2)), record.add_async(_entry(3)), record.remove_async(1))
    results = await asyncio.gather(*updates, return_exceptions=True)
    assert [type(r) for r in results] == [IsADirectoryError] * 3
    assert record.entries == [_entry(1)]


def test_spawn_record_ignores_an_append_torn_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "engines.json"
    record = SpawnRecord(path)
    record.add(_entry(10))
    record.add(_entry(11))
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"add":{"pool":"p12","pid":1')  # the crash hit mid-append
    assert SpawnRecord.load(path) == [_entry(10), _entry(11)]
    # A damaged line that is not the last one is corruption, not a torn append.
    path.write_bytes(intact.replace(b'{"add":{"pool":"p11"', b'{"add":{"pool":"p11" garbage') + b"\n")
    with pytest.raises(SpawnRecordError, match="line 3"):
        SpawnRecord.load(path)


def test_spawn_record_reads_and_replaces_the_version_1_document(tmp_path: Path) -> None:
    path = tmp_path / "engines.json"
    old = _entry(7)
    path.write_text(json.dumps({"version": 1, "engines": [dataclasses.asdict(old)]}, indent=1))
    record = SpawnRecord(path)
    assert record.entries == [old]
    record.add(_entry(8))
    assert path.read_bytes().startswith(b'{"version": 2}\n')
    assert SpawnRecord.load(path) == [old, _entry(8)]


def test_spawn_record_load_errors(tmp_path: Path) -> None:
    assert SpawnRecord.load(tmp_path / "missing.json") == []
    bad = tmp_path / "bad.json"
    for content in ("{not json", '{"version": 99, "engines": []}', '{"version": 1, "engines": [{}]}'):
        bad.write_text(content)
        with pytest.raises(SpawnRecordError):
            SpawnRecord.load(bad)
    bad.write_text(json.dumps([{"pool": "a", "pid": 5, "pgid": 5, "port": 1, "started_at": 0, "argv": ["e"]}]))
    assert SpawnRecord.load(bad)[0].pid == 5


async def test_adopt_watches_and_stops_an_engine(fakes: FakeEngines, tmp_path: Path) -> None:
    record = SpawnRecord(tmp_path / "engines.json")
    engine = await fakes.start("--ignore-sigterm", record=record)
    await wait_ready(engine)
    (entry,) = SpawnRecord(record.path).entries  # what a restarted daemon would read

    stale = dataclasses.replace(entry, start_ticks=(entry.start_ticks or 0) + 1)
    assert AdoptedProcess.adopt(stale) is None  # same pid, different process: never touched

    adopted = AdoptedProcess.adopt(entry, record=record)
    assert adopted is not None and adopted.running
    info = await adopted.stop(0.3)
    assert (info.exit_code, info.signal, info.expected) == (None, None, True)
    assert (await asyncio.wait_for(engine.wait(), ENGINE_S)).signal == signal.SIGKILL
    assert SpawnRecord.load(record.path) == []
    assert AdoptedProcess.adopt(entry) is None


async def test_wait_pid_exit_works_with_descriptors_above_1024() -> None:
    # A daemon with many engines holds more than 1024 descriptors; the exit watcher must not depend
    # on an API (select) that refuses them.
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        assert probe > 1024, "the test must run with descriptors above 1024"
        waiter = asyncio.ensure_future(wait_pid_exit(proc.pid, ENGINE_S))
        await asyncio.sleep(0)  # ok: one loop turn lets the waiter register its pidfd before the kill
        assert not waiter.done()
        proc.kill()
        await proc.wait()
        assert await waiter
        # Already gone: the immediate check answers without waiting.
        assert await wait_pid_exit(proc.pid, 0.0)
    finally:
        for fd in filler:
            os.close(fd)
