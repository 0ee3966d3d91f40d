"""The real-NATS test harness: start, publish, kill -9, restart, reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from pool_managerd.adapters.embedded_nats import NatsServer, NatsServerError, find_nats_server

if TYPE_CHECKING:
    from conftest import JsNamespace, NatsConnect


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reparented child that no init reaps lingers as a zombie: dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _wait_dead(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)  # ok: no event exists for another process's death
    return False


def test_binary_is_found() -> None:
    assert os.access(find_nats_server(), os.X_OK)


async def test_publish_and_read_back(nc: NATS, js_ns: JsNamespace) -> None:
    js = nc.jetstream()
    await js.add_stream(
        api.StreamConfig(name=js_ns.stream, subjects=[f"{js_ns.subjects.prefix}.>"], storage=api.StorageType.FILE)
    )
    ack = await js.publish(f"{js_ns.subjects.prefix}.hello", b"world", stream=js_ns.stream)
    msg = await js.get_msg(js_ns.stream, ack.seq)
    assert msg.data == b"world"
    assert msg.subject == f"{js_ns.subjects.prefix}.hello"


async def test_kill9_restart_keeps_file_store_and_client_reconnects(
    fresh_nats_server: NatsServer, nats_connect: NatsConnect
) -> None:
    server = fresh_nats_server
    port, store, old_pid = server.port, server.store_dir, server.pid
    assert old_pid is not None
    reconnected = asyncio.Event()
    disconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async def on_disconnect() -> None:
        disconnected.set()

    nc = await nats_connect(server.url, reconnected_cb=on_reconnect, disconnected_cb=on_disconnect)
    js = nc.jetstream(timeout=2)
    await js.add_stream(api.StreamConfig(name="KEEP", subjects=["keep.>"], storage=api.StorageType.FILE))
    ack = await js.publish("keep.one", b"durable")

    server.kill()
    assert not server.running
    assert _wait_dead(old_pid)
    await asyncio.wait_for(disconnected.wait(), 5)

    await server.arestart()
    assert server.port == port
    assert server.store_dir == store
    assert server.pid != old_pid
    await asyncio.wait_for(reconnected.wait(), 10)

    msg = await js.get_msg("KEEP", ack.seq)
    assert msg.data == b"durable"
    ack2 = await js.publish("keep.two", b"after")
    assert ack2.seq == ack.seq + 1


def test_graceful_stop_and_context_manager(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "s", monitor_port=0) as server:
        pid = server.pid
        assert pid is not None
        assert server.monitor_url is not None
        assert server.url.startswith("nats://127.0.0.1:")
        server.stop()
        assert not server.running
        assert _wait_dead(pid)
        server.restart()
        assert server.running
        pid = server.pid
    assert pid is not None
    assert _wait_dead(pid)


def test_temp_store_is_removed_on_close() -> None:
    server = NatsServer().start()
    store = server.store_dir
    assert store.is_dir()
    server.close()
    assert not store.exists()


def test_failed_start_reports_log(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "s", extra_args=["--no-such-flag"])
    with pytest.raises(NatsServerError):
        server.start(ready_timeout=5)
    assert not server.running


def test_server_dies_with_its_owner(tmp_path: Path) -> None:
    """A SIGKILLed owner (no finalizers run) still takes its server down (PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from pool_managerd.adapters.embedded_nats import NatsServer\n"
        f"s = NatsServer(store_dir={str(tmp_path / 's')!r}).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"  # ok: the owner process only waits to be SIGKILLed by the test
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        assert _alive(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert _wait_dead(pid), "nats-server outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
