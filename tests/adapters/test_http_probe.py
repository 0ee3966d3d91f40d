"""The raw HTTP probe and the scheduled HealthProber, against in-process servers and the fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pool_managerd.adapters.engines.ports import allocate_port
from pool_managerd.adapters.http_probe import HealthProber, ProbeResult, http_get, probe
from support.deadlines import ENGINE_S
from support.procs import FakeEngines, wait_ready

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fakes(tmp_path: Path, _no_leaks: None) -> AsyncIterator[FakeEngines]:
    f = FakeEngines(tmp_path)
    yield f
    await f.close()


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    """An in-process TCP server on a free port; yields the port. On exit every connection is
    aborted and every handler cancelled, including those accepted but not yet started."""
    transports: set[asyncio.BaseTransport] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def tracked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await handler(r, w)
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            pass  # shutdown; 3.11's start_server would log these as errors
        finally:
            w.close()

    class Protocol(asyncio.StreamReaderProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.add(transport)
            super().connection_made(transport)
            tasks.update(t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("tracked"))

    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Protocol(asyncio.StreamReader(), tracked), "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        for tr in transports:
            tr.abort()  # type: ignore[attr-defined]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


async def respond(w: asyncio.StreamWriter, status_line: bytes, body: bytes = b"{}") -> None:
    w.write(status_line + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await w.drain()


def answering(status_line: bytes, body: bytes = b"{}") -> Handler:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        await respond(w, status_line, body)

    return handle


# -- probe -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status_line", "ok", "status", "loading", "error"),
    [
        (b"HTTP/1.1 200 OK", True, 200, False, None),
        (b"HTTP/1.1 503 Service Unavailable", False, 503, True, "loading (HTTP 503)"),
        (b"HTTP/1.0 500 Internal Server Error", False, 500, False, "HTTP 500"),
        (b"HTTP/1.1 404 Not Found", False, 404, False, "HTTP 404"),
    ],
)
async def test_probe_classifies_status(
    status_line: bytes, ok: bool, status: int, loading: bool, error: str | None
) -> None:
    async with server(answering(status_line)) as port:
        r = await probe("127.0.0.1", port, "/health", 1.0, 2.0)
    assert (r.ok, r.status, r.loading, r.error) == (ok, status, loading, error)
    assert r.latency_ms >= 0


async def test_probe_connection_refused() -> None:
    r = await probe("127.0.0.1", allocate_port(), "/health", 1.0, 1.0)
    assert (r.ok, r.status, r.loading, r.error) == (False, None, False, "connection refused")


async def test_probe_read_timeout_when_nothing_answers() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.get_running_loop().create_future()

    async with server(silent) as port:
        r = await probe("127.0.0.1", port, "/health", 1.0, 0.1)
    assert (r.ok, r.status, r.error) == (False, None, "read timeout")


async def test_probe_connect_timeout_when_the_backlog_is_full() -> None:
    # A listener that never accepts, with its accept queue full: Linux drops further SYNs.
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                fillers.append(s)
                if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                    break
            r = await probe("127.0.0.1", port, "/health", 0.2, 1.0)
        finally:
            for s in fillers:
                s.close()
    assert (r.ok, r.error) == (False, "connect timeout")


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"", "connection closed before a complete response"),
        (b"garbage\r\n\r\n", "bad status line 'garbage'"),
    ],
)
async def test_probe_bad_answers(response: bytes, error: str) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(response)
        await w.drain()

    async with server(handle) as port:
        r = await probe("127.0.0.1", port, "/health", 1.0, 1.0)
    assert (r.ok, r.status, r.error) == (False, None, error)


async def test_probe_sends_a_plain_http11_get() -> None:
    seen: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.readuntil(b"\r\n\r\n"))
        await respond(w, b"HTTP/1.1 200 OK")

    async with server(handle) as port:
        assert (await probe("127.0.0.1", port, "/health?x=1", 1.0, 1.0)).ok
    lines = seen[0].decode().split("\r\n")
    assert lines[0] == "GET /health?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}" in lines
    assert "Connection: close" in lines


async def test_probe_rejects_a_path_that_could_inject_headers() -> None:
    with pytest.raises(ValueError):
        await probe("127.0.0.1", 1, "/health\r\nX: y", 1.0, 1.0)
    with pytest.raises(ValueError):
        await probe("127.0.0.1", 1, "health", 1.0, 1.0)


async def test_http_get_reads_the_body() -> None:
    async with server(answering(b"HTTP/1.1 200 OK", b'[{"id":0}]')) as port:
        resp = await http_get("127.0.0.1", port, "/slots")
    assert (resp.status, resp.body, resp.headers["content-length"]) == (200, b'[{"id":0}]', "10")
    with pytest.raises(ConnectionError, match="refused"):
        await http_get("127.0.0.1", allocate_port(), "/slots")


# -- HealthProber ------------------------------------------------------------------------------


class Recorder:
    """on_result that records results and lets a test await the n-th one."""

    def __init__(self) -> None:
        self.results: list[ProbeResult] = []
        self.changed = asyncio.Condition()

    async def __call__(self, r: ProbeResult) -> None:
        self.results.append(r)
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, pred: Callable[[list[ProbeResult]], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: pred(self.results)), ENGINE_S)


async def test_prober_preload_then_steady_after_first_ok() -> None:
    loaded = False

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await answering(b"HTTP/1.1 200 OK" if loaded else b"HTTP/1.1 503 Service Unavailable")(r, w)

    rec = Recorder()
    async with server(handle) as port:
        prober = HealthProber("127.0.0.1", port, on_result=rec, steady_interval_s=3600)
        initial_mode = prober.mode
        assert initial_mode == "preload"
        prober.start()
        prober.start()  # no second task
        try:
            await rec.wait_for(lambda rs: len(rs) >= 3)
            assert all(r.loading for r in rec.results)
            assert prober.consecutive_failures == len(rec.results)
            loaded = True
            await rec.wait_for(lambda rs: rs[-1].ok)
            assert prober.mode == "steady"
            assert prober.consecutive_failures == 0
            n = len(rec.results)
            prober.probe_now()
            await rec.wait_for(lambda rs: len(rs) == n + 1)
            prober.set_mode("preload")  # e.g. the engine was restarted: probe at once, fast again
            await rec.wait_for(lambda rs: len(rs) == n + 2)
        finally:
            await prober.stop()
    assert not prober.running


async def test_a_prober_started_later_waits_for_its_first_probe_unless_one_is_asked_for() -> None:
    rec = Recorder()
    async with server(answering(b"HTTP/1.1 200 OK")) as port:
        prober = HealthProber("127.0.0.1", port, on_result=rec, steady_interval_s=3600, mode="steady")
        prober.start(first_after_s=3600)
        try:
            # An hour away; one round trip to the server shows no probe was made meanwhile.
            await http_get("127.0.0.1", port, "/health")
            assert rec.results == [] and prober.probes == 0
            prober.probe_now()
            await rec.wait_for(lambda rs: len(rs) == 1)
            assert rec.results[0].ok
        finally:
            await prober.stop()


def test_prober_preload_gaps_back_off_gently_to_the_cap() -> None:
    async def noop(r: ProbeResult) -> None:
        pass

    prober = HealthProber("127.0.0.1", 1, on_result=noop, preload_initial_s=0.01, preload_max_s=0.1)
    gaps = [prober._take_gap() for _ in range(30)]
    assert gaps[0] == 0.01
    assert all(b > a for a, b in itertools.pairwise(gaps[:15]))
    assert all(b / a <= prober.preload_factor + 1e-9 for a, b in itertools.pairwise(gaps))
    assert gaps[-1] == 0.1
    prober.set_mode("steady")
    assert prober._take_gap() == prober.steady_interval_s
    prober.set_mode("preload")
    assert prober._take_gap() == 0.01


async def test_prober_stop_cancels_cleanly_even_mid_probe() -> None:
    request_seen = asyncio.Event()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        request_seen.set()
        await asyncio.get_running_loop().create_future()

    async def never(r: ProbeResult) -> None:
        raise AssertionError("no result expected")

    async with server(silent) as port:
        prober = HealthProber("127.0.0.1", port, on_result=never, read_timeout_s=60)
        prober.start()
        await asyncio.wait_for(request_seen.wait(), ENGINE_S)  # the probe is waiting for an answer
        await prober.stop()
        await prober.stop()
    assert not prober.running
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe-")]


async def test_prober_survives_callback_errors_and_can_stop_itself() -> None:
    calls = 0
    stopped = asyncio.Event()
    prober: HealthProber

    async def on_result(r: ProbeResult) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("callback bug")
        await prober.stop()
        stopped.set()

    prober = HealthProber("127.0.0.1", allocate_port(), on_result=on_result)
    prober.start()
    await asyncio.wait_for(stopped.wait(), ENGINE_S)
    assert calls == 2
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe-") and not t.done()]


async def test_prober_sees_the_fake_engine_load(fakes: FakeEngines) -> None:
    engine = await fakes.start(load_time=0.3)
    results = await wait_ready(engine)
    assert results[-1].ok
    assert {r.error for r in results[:-1]} <= {"connection refused", "loading (HTTP 503)"}


async def _probes(count: int, port: int) -> tuple[HealthProber, list[ProbeResult]]:
    results: list[ProbeResult] = []
    enough = asyncio.Event()

    async def on_result(result: ProbeResult) -> None:
        results.append(result)
        if len(results) >= count:
            await prober.stop()  # from inside: no probe starts after the last one counted
            enough.set()

    prober = HealthProber("127.0.0.1", port, on_result=on_result, steady_interval_s=0.005, mode="steady")
    prober.start()
    try:
        await asyncio.wait_for(enough.wait(), 10)
    finally:
        await prober.stop()
    return prober, results


async def test_prober_keeps_its_connection_alive_between_probes(fakes: FakeEngines) -> None:
    engine = await fakes.start(load_time=0.0)
    await wait_ready(engine)
    prober, results = await _probes(20, engine.port)
    assert all(r.ok for r in results)
    assert prober.connects == 1, f"{prober.connects} connections for {len(results)} probes"


async def test_prober_reconnects_when_the_engine_closes_the_connection() -> None:
    # An engine that answers "Connection: close" (or closes idle connections) costs a reconnect
    # per probe, never a failed probe.
    connections = itertools.count(1)

    async def closing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        next(connections)
        await r.readuntil(b"\r\n\r\n")
        await respond(w, b"HTTP/1.1 200 OK")

    async def idle_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Keep-alive framing, then the connection is closed after the answer without saying so.
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await w.drain()

    async with server(closing) as port:
        prober, results = await _probes(5, port)
    assert all(r.ok for r in results) and prober.connects == len(results) == next(connections) - 1
    async with server(idle_close) as port:
        prober, results = await _probes(5, port)
    assert all(r.ok for r in results), [r.error for r in results]
    assert prober.connects == len(results)


async def test_prober_on_a_kept_connection_times_a_silent_engine_out_and_reconnects() -> None:
    # The first answer keeps the connection; the engine then stops answering on it: the read
    # deadline ends that probe as a timeout (not a reset or a close) and drops the connection.
    answered = itertools.count()

    async def once_then_silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await r.readuntil(b"\r\n\r\n")
            if next(answered) % 2:
                await asyncio.get_running_loop().create_future()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await w.drain()

    results: list[ProbeResult] = []
    connects: list[int] = []
    enough = asyncio.Event()

    async def on_result(result: ProbeResult) -> None:
        results.append(result)
        connects.append(prober.connects)
        if len(results) >= 4:
            enough.set()

    async with server(once_then_silent) as port:
        prober = HealthProber("127.0.0.1", port, on_result=on_result, steady_interval_s=0.005, mode="steady",
                              read_timeout_s=0.1)  # fmt: skip
        prober.start()
        try:
            await asyncio.wait_for(enough.wait(), ENGINE_S)
        finally:
            await prober.stop()
    assert [(r.ok, r.error) for r in results[:4]] == [(True, None), (False, "read timeout")] * 2
    assert all(r.latency_ms >= 100 for r in results[1:4:2])
    assert connects[:4] == [1, 1, 2, 2]  # the timed-out connection is not reused


async def test_an_answer_in_time_counts_even_when_the_loop_was_held_past_the_deadline() -> None:
    # The engine answers at once, then the loop is held (a long synchronous stretch elsewhere in
    # the daemon) well past the read deadline: the answer was in, so the probe is healthy.
    import time

    async def answer_then_hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            time.sleep(0.3)  # ok: holds the loop on purpose, the stall under test

    results: list[ProbeResult] = []
    enough = asyncio.Event()

    async def on_result(result: ProbeResult) -> None:
        results.append(result)
        if len(results) >= 3:
            await prober.stop()
            enough.set()

    async with server(answer_then_hold) as port:
        prober = HealthProber("127.0.0.1", port, on_result=on_result, steady_interval_s=0.005, mode="steady",
                              read_timeout_s=0.05)  # fmt: skip
        prober.start()
        try:
            await asyncio.wait_for(enough.wait(), ENGINE_S)
        finally:
            await prober.stop()
    assert [(r.ok, r.error) for r in results] == [(True, None)] * 3
    assert all(r.latency_ms >= 300 for r in results)  # each waited out the hold, past its deadline
    assert prober.connects == 1


async def test_a_connect_the_daemon_was_too_busy_to_see_in_time_is_not_a_timeout() -> None:
    # The connect is under way when the loop is held (a long synchronous stretch) for three
    # times the connect deadline: the deadline fires late, so it was the daemon, not the engine,
    # that was slow; the deadline is re-armed and the probe succeeds on the connection made.
    import time

    results: list[ProbeResult] = []
    done = asyncio.Event()

    async def on_result(result: ProbeResult) -> None:
        results.append(result)
        await prober.stop()
        done.set()

    async with server(answering(b"HTTP/1.1 200 OK")) as port:
        prober = HealthProber("127.0.0.1", port, on_result=on_result, steady_interval_s=3600, mode="steady",
                              connect_timeout_s=0.1)  # fmt: skip
        prober.start()
        await asyncio.sleep(0)  # ok: one loop turn, so the prober's first step (its connect) is in flight
        time.sleep(0.3)  # ok: holds the loop on purpose, the stall under test
        try:
            await asyncio.wait_for(done.wait(), ENGINE_S)
        finally:
            await prober.stop()
    assert [(r.ok, r.error) for r in results] == [(True, None)]
    assert results[0].latency_ms >= 300
