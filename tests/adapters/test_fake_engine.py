"""The fake engine, run as a real subprocess, speaks llama.cpp's health protocol and obeys its knobs."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pool_managerd.adapters.engines.handles import EngineProcess
from pool_managerd.adapters.engines.ports import allocate_port
from pool_managerd.adapters.http_probe import HealthProber, ProbeResult, http_get, probe
from pool_managerd.testing.fake_engine import parse_args
from support.deadlines import ENGINE_S
from support.procs import FakeEngines, read_log, wait_for_file, wait_ready


@pytest.fixture
async def fakes(tmp_path: Path, _no_leaks: None) -> AsyncIterator[FakeEngines]:
    f = FakeEngines(tmp_path)
    yield f
    await f.close()


async def get_json(port: int, path: str) -> tuple[int, object]:
    r = await http_get("127.0.0.1", port, path)
    return r.status, json.loads(r.body)


async def test_loading_503_then_200_when_loaded(fakes: FakeEngines) -> None:
    engine = await fakes.start(load_time=float("inf"))
    seen_loading = asyncio.Event()

    async def on_result(r: ProbeResult) -> None:
        if r.loading:
            seen_loading.set()

    prober = HealthProber("127.0.0.1", engine.port, on_result=on_result)
    prober.start()
    try:
        await asyncio.wait_for(seen_loading.wait(), ENGINE_S)
    finally:
        await prober.stop()

    status, body = await get_json(engine.port, "/health")
    assert status == 503
    assert isinstance(body, dict)
    assert body["error"]["code"] == 503
    assert body["error"]["message"] == "Loading model"
    assert (await http_get("127.0.0.1", engine.port, "/slots")).status == 503

    os.kill(engine.pid, signal.SIGUSR1)  # the fake's "loading finished now"
    await wait_ready(engine)
    assert await get_json(engine.port, "/health") == (200, {"status": "ok"})


async def test_becomes_healthy_at_load_time_not_before(fakes: FakeEngines, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"
    engine = await fakes.start("--ready-file", str(ready_file), load_time=0.5)
    results = await wait_ready(engine)
    assert results[-1].ok and results[-1].status == 200
    assert all(not r.ok for r in results[:-1])
    assert any(r.loading for r in results), "a 0.5 s load must be observed as 503 at least once"
    ready_at = float(ready_file.read_text())
    # Correctness bound: the load time counts from the engine's start, which is after spawn.
    assert ready_at >= engine.started_at + 0.5


async def test_slots_models_props_and_ignored_llama_args(fakes: FakeEngines) -> None:
    engine = await fakes.start(
        "--slots", "3", "-m", "/models/m.gguf", "--alias", "chat", "-ngl", "99", "-mg", "1",
        "-ctk", "q8_0", "--tensor-split", "3,1", "-c", "2048", "--host", "127.0.0.1", "-fa",
        env={"CUDA_VISIBLE_DEVICES": "GPU-1234"},
    )  # fmt: skip
    await wait_ready(engine)

    status, slots = await get_json(engine.port, "/slots")
    assert status == 200
    assert isinstance(slots, list)
    assert [s["id"] for s in slots] == [0, 1, 2]
    assert all(s["n_ctx"] == 2048 and s["is_processing"] is False for s in slots)

    status, models = await get_json(engine.port, "/v1/models")
    assert status == 200
    assert isinstance(models, dict)
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["chat"]

    status, props = await get_json(engine.port, "/props")
    assert status == 200
    assert isinstance(props, dict)
    assert props["cuda_visible_devices"] == "GPU-1234"
    assert props["model_path"] == "/models/m.gguf"
    assert props["pid"] == engine.pid
    assert props["extra_args"] == ["-ngl", "99", "-mg", "1", "-ctk", "q8_0", "--tensor-split", "3,1", "-fa"]

    assert (await http_get("127.0.0.1", engine.port, "/nope")).status == 404


def test_parse_args_matches_whole_tokens_only() -> None:
    args, extra = parse_args(["-mg", "1", "-m", "x.gguf", "-np", "4", "-ctk", "q8_0", "--n-gpu-layers", "9"])
    assert args.model == "x.gguf"
    assert args.slots == 4
    assert args.ctx_size == 4096  # -ctk is not -c
    assert extra == ["-mg", "1", "-ctk", "q8_0", "--n-gpu-layers", "9"]


async def test_crash_after_exit_code_is_observed_by_wait(fakes: FakeEngines) -> None:
    seen = []
    engine = await fakes.start(
        "--crash-after", "0.2", "--exit-code", "7", on_exit=lambda e, info: seen.append((e, info))
    )
    info = await asyncio.wait_for(engine.wait(), ENGINE_S)
    assert (info.exit_code, info.signal, info.expected) == (7, None, False)
    assert seen == [(engine, info)]
    assert "crashing with exit code 7" in read_log(engine)


async def test_crash_after_ready_counts_from_healthy(fakes: FakeEngines, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"
    engine = await fakes.start(
        "--crash-after-ready", "0.2", "--exit-code", "3", "--ready-file", str(ready_file), load_time=0.1
    )
    info = await asyncio.wait_for(engine.wait(), ENGINE_S)
    assert info.exit_code == 3
    assert float(ready_file.read_text()) + 0.2 <= info.ended_at


async def test_fail_bind_knob_exits_like_a_bind_failure(fakes: FakeEngines) -> None:
    engine = await fakes.start("--fail-bind")
    info = await asyncio.wait_for(engine.wait(), ENGINE_S)
    assert info.exit_code == errno.EADDRINUSE
    assert "couldn't bind HTTP server socket" in read_log(engine)


async def test_port_taken_is_a_bind_failure(fakes: FakeEngines) -> None:
    port = allocate_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        engine = await fakes.start(port=port, check_port=False)
        info = await asyncio.wait_for(engine.wait(), ENGINE_S)
    assert info.exit_code == errno.EADDRINUSE


async def wait_log_line(engine: EngineProcess, text: str) -> str:
    deadline = time.monotonic() + ENGINE_S
    while text not in (log := read_log(engine)):
        assert not engine.exited.done() and time.monotonic() < deadline, log
        await asyncio.sleep(0.005)  # ok: no event for another process writing its log
    return log


async def test_hang_after_ready_accepts_but_never_answers(fakes: FakeEngines) -> None:
    engine = await fakes.start("--hang-after-ready", "0")
    log = await wait_log_line(engine, "hanging:")  # printed in the same loop step that hangs
    assert log.index("model loaded") < log.index("hanging:")
    r = await probe("127.0.0.1", engine.port, "/health", connect_timeout=5.0, read_timeout=0.3)
    assert not r.ok and r.status is None and r.error == "read timeout"


async def test_hang_from_start(fakes: FakeEngines) -> None:
    engine = await fakes.start("--hang-after", "0", "--pid-file", str(fakes.tmp / "pid"))
    # The pid file is written once the port is bound, so a connect cannot be refused after it.
    await wait_for_file(fakes.tmp / "pid", engine)
    r = await probe("127.0.0.1", engine.port, "/health", connect_timeout=5.0, read_timeout=0.3)
    assert r.error == "read timeout"


async def test_sigterm_exit_code_knob(fakes: FakeEngines) -> None:
    engine = await fakes.start("--exit-on-sigterm-code", "5")
    await wait_ready(engine)
    info = await asyncio.wait_for(engine.stop(5.0), ENGINE_S)
    assert (info.exit_code, info.signal, info.expected) == (5, None, True)
