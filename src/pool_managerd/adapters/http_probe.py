"""HTTP health probing of engines: a raw asyncio HTTP/1.1 client and a scheduled prober.

Stdlib only. :func:`probe` and :func:`http_get` make one GET per connection (``Connection:
close``); the scheduled :class:`HealthProber` keeps its connection alive between probes (an
engine that closes it costs a reconnect, nothing more), so a steady probe is a write and a read.
200 is healthy, 503 is llama.cpp's "Loading model" (and the usual "not ready yet" of other
engines), a refused or timed-out connection is an error (vLLM and SGLang do not listen until
loaded).

One job, a long module: the HTTP/1.1 client and the prober that keeps its connection alive are
one protocol implementation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

__all__ = ["HealthProber", "HttpResponse", "ProbeMode", "ProbeResult", "http_get", "probe"]

_MAX_HEAD = 16 * 1024
_USER_AGENT = "pool-managerd-probe"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe. ``ok``: HTTP 200. ``loading``: HTTP 503. ``error``: why no usable answer came
    (``connection refused``, ``connect timeout``, ``read timeout``, ``HTTP 500``...), None if ok."""

    ok: bool
    status: int | None
    loading: bool
    latency_ms: float
    error: str | None = None
    ts: float = field(default_factory=time.time)
    """Wall-clock time the probe completed (for ``HealthReport.ts``)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response read by :func:`http_get`. Header names are lower-cased."""

    status: int
    headers: dict[str, str]
    body: bytes


class _ProbeFailure(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def _request(host: str, port: int, path: str, *, keep_alive: bool = False) -> bytes:
    if not path.startswith("/") or any(c in path for c in " \r\n\t"):
        raise ValueError(f"invalid HTTP path {path!r}")
    host_header = f"[{host}]" if ":" in host else host
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}:{port}\r\nUser-Agent: {_USER_AGENT}\r\n"
        f"Accept: */*\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode("latin-1")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _ProbeFailure(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _exchange(
    host: str,
    port: int,
    path: str,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_body: int | None,
) -> tuple[int, dict[str, str], bytes]:
    """One GET; returns (status, headers, body). ``max_body=None`` skips reading the body."""
    request = _request(host, port, path)
    try:
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEAD)
    except TimeoutError:
        raise _ProbeFailure("connect timeout") from None
    except ConnectionRefusedError:
        raise _ProbeFailure("connection refused") from None
    except OSError as exc:
        raise _ProbeFailure(f"connect failed: {exc.strerror or exc}") from None
    done = False
    try:
        writer.write(request)
        async with asyncio.timeout(read_timeout_s):
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(head)
            body = b""
            if max_body is not None:
                length = headers.get("content-length")
                if length is not None and length.isdigit():
                    if int(length) > max_body:
                        raise _ProbeFailure(f"body too large ({length} bytes)")
                    body = await reader.readexactly(int(length))
                else:
                    body = await reader.read(max_body + 1)
                    if len(body) > max_body:
                        raise _ProbeFailure("body too large")
        done = True
        return status, headers, body
    except TimeoutError:
        raise _ProbeFailure("read timeout") from None
    except asyncio.IncompleteReadError:
        raise _ProbeFailure("connection closed before a complete response") from None
    except asyncio.LimitOverrunError:
        raise _ProbeFailure("response head too large") from None
    except ConnectionResetError:
        raise _ProbeFailure("connection reset") from None
    except OSError as exc:
        raise _ProbeFailure(f"read failed: {exc.strerror or exc}") from None
    finally:
        # abort() on failure (and cancellation) so no half-open socket lingers in the loop.
        if done:
            writer.close()
        else:
            writer.transport.abort()


def _classify(status: int | None, latency_ms: float, error: str | None = None) -> ProbeResult:
    if status is None:
        return ProbeResult(ok=False, status=None, loading=False, latency_ms=latency_ms, error=error)
    if status == 200:
        return ProbeResult(ok=True, status=200, loading=False, latency_ms=latency_ms)
    if status == 503:
        return ProbeResult(ok=False, status=503, loading=True, latency_ms=latency_ms, error="loading (HTTP 503)")
    return ProbeResult(ok=False, status=status, loading=False, latency_ms=latency_ms, error=f"HTTP {status}")


_KEEP_MAX_BODY = 64 * 1024
"""A health answer longer than this is read to the end only on a connection that then closes."""


class _Deadline:
    """A kept connection's connect or read deadline: one timer handle (a timeout context costs a
    handle, a reschedule and a task cancellation, a thousand times a second), and it counts
    only time the daemon was there to see.

    A deadline that fires more than half its length late found the loop held (a long step,
    a starved process), not the engine slow: it is re-armed once for its full length. When it
    does expire, ``on_expiry`` runs one loop turn later, so an answer that arrived in the same
    turn the deadline fired is read first. Without both, a thousand adopted engines all lost
    their health at once after a restart whose start-up held the loop past their deadlines."""

    __slots__ = ("_handle", "_loop", "_on_expiry", "_rearmed", "_seconds", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._seconds = seconds
        self._on_expiry = on_expiry
        self._rearmed = False
        self._when = loop.time() + seconds
        self._handle: asyncio.Handle = loop.call_at(self._when, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        if not self._rearmed and now - self._when > self._seconds / 2:
            self._rearmed = True
            self._when = now + self._seconds
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self._handle = self._loop.call_soon(self._on_expiry)

    def cancel(self) -> None:
        self._handle.cancel()


class _Connection:
    """One kept-alive HTTP/1.1 connection to an engine, for a prober's successive GETs.

    A probe on a kept connection costs a write and a read instead of a TCP handshake, a
    teardown and a TIME_WAIT socket. The connection is dropped (the next probe reconnects)
    whenever the engine says ``Connection: close``, frames the body in a way that needs reading
    to the end (no ``Content-Length``), or anything goes wrong.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self.request = _request(host, port, path, keep_alive=True)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    @property
    def open(self) -> bool:
        return self._streams is not None

    def close(self) -> None:
        streams, self._streams = self._streams, None
        if streams is not None:
            streams[1].transport.abort()

    async def get(self, connect_timeout_s: float, read_timeout_s: float) -> int:
        """One GET on the kept connection (opened first if needed); returns the status."""
        loop = asyncio.get_running_loop()
        if self._streams is None:
            task = asyncio.current_task()
            assert task is not None
            timed_out: list[bool] = []

            def give_up() -> None:
                timed_out.append(True)
                task.cancel()

            connect_deadline = _Deadline(loop, connect_timeout_s, give_up)
            try:
                self._streams = await asyncio.open_connection(self.host, self.port, limit=_MAX_HEAD)
            except asyncio.CancelledError:
                if timed_out and task.uncancel() == 0:
                    raise _ProbeFailure("connect timeout") from None
                raise
            except ConnectionRefusedError:
                raise _ProbeFailure("connection refused") from None
            except OSError as exc:
                raise _ProbeFailure(f"connect failed: {exc.strerror or exc}") from None
            finally:
                connect_deadline.cancel()
        reader, writer = self._streams
        keep = False
        # The read deadline aborts the connection (the pending read then fails).
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            writer.transport.abort()

        read_deadline = _Deadline(loop, read_timeout_s, expire)
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(head)
            length = headers.get("content-length")
            keep = (
                head.startswith(b"HTTP/1.1")
                and "close" not in headers.get("connection", "").lower()
                and "transfer-encoding" not in headers
                and length is not None
                and length.isdigit()
                and int(length) <= _KEEP_MAX_BODY
            )
            if keep and length is not None:
                await reader.readexactly(int(length))
            if expired:
                keep = False
                raise _ProbeFailure("read timeout")
            return status
        except (asyncio.IncompleteReadError, ConnectionResetError, OSError) as exc:
            if expired:
                raise _ProbeFailure("read timeout") from None
            if isinstance(exc, asyncio.IncompleteReadError):
                raise _ProbeFailure("connection closed before a complete response") from None
            if isinstance(exc, ConnectionResetError):
                raise _ProbeFailure("connection reset") from None
            raise _ProbeFailure(f"read failed: {exc.strerror or exc}") from None
        except asyncio.LimitOverrunError:
            raise _ProbeFailure("response head too large") from None
        finally:
            read_deadline.cancel()
            if not keep:
                self.close()


async def probe(
    host: str,
    port: int,
    path: str = "/health",
    connect_timeout: float = 1.0,
    read_timeout: float = 2.0,
) -> ProbeResult:
    """GET ``path`` once and classify the answer; never raises (except cancellation and a
    ``ValueError`` for a path that is not a plain absolute path).

    Only the status line and headers are read. ``latency_ms`` covers connect + request + head.
    """
    t0 = time.monotonic()
    try:
        status, _headers, _body = await _exchange(host, port, path, connect_timeout, read_timeout, None)
    except _ProbeFailure as f:
        return ProbeResult(
            ok=False, status=None, loading=False, latency_ms=(time.monotonic() - t0) * 1000, error=f.error
        )
    return _classify(status, (time.monotonic() - t0) * 1000)


async def http_get(
    host: str,
    port: int,
    path: str,
    *,
    connect_timeout: float = 1.0,
    read_timeout: float = 2.0,
    max_body: int = 1024 * 1024,
) -> HttpResponse:
    """GET ``path`` and return the whole response (e.g. an engine's ``/slots`` or ``/v1/models``).

    Raises ``ConnectionError`` (refused, reset, closed early) or ``TimeoutError`` with a short
    message; a body over ``max_body`` bytes is a ``ConnectionError`` too.
    """
    try:
        status, headers, body = await _exchange(host, port, path, connect_timeout, read_timeout, max_body)
    except _ProbeFailure as f:
        if "timeout" in f.error:
            raise TimeoutError(f"GET http://{host}:{port}{path}: {f.error}") from None
        raise ConnectionError(f"GET http://{host}:{port}{path}: {f.error}") from None
    return HttpResponse(status=status, headers=headers, body=body)


ProbeMode = Literal["preload", "steady"]
OnResult = Callable[[ProbeResult], Awaitable[None]]


class HealthProber:
    """Probes one engine on a schedule and hands every result to ``on_result``.

    ``preload`` mode probes fast: the first gap is ``preload_initial_s`` (10 ms) and each gap is
    ``preload_factor`` (1.15) times the previous one up to ``preload_max_s`` (100 ms, reached
    after ~17 probes, ~0.65 s), so an engine ready within a second is seen within a few tens of
    ms and a slow one costs at most 10 probes/s. The first ok result switches to ``steady`` mode
    (every ``steady_interval_s``). Gaps are measured start to start on the loop's monotonic
    clock; a probe slower than the gap is followed at once by the next, never overlapped.

    ``on_result`` is awaited inline (the next probe waits for it); its exceptions are logged and
    probing goes on. It may call :meth:`stop` (the task then ends at its next await) and
    :meth:`set_mode`; a :meth:`stop` from elsewhere cancels it where it is awaiting. The prober
    does not judge results: counting failures against a threshold is the caller's business
    (``consecutive_failures`` is kept for convenience).
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/health",
        *,
        on_result: OnResult,
        steady_interval_s: float = 2.0,
        preload_initial_s: float = 0.01,
        preload_max_s: float = 0.1,
        preload_factor: float = 1.15,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 2.0,
        mode: ProbeMode = "preload",
        name: str | None = None,
    ) -> None:
        if steady_interval_s <= 0 or preload_initial_s <= 0 or preload_max_s < preload_initial_s:
            raise ValueError("probe intervals must be positive and preload_max_s >= preload_initial_s")
        if preload_factor < 1:
            raise ValueError("preload_factor must be >= 1")
        _request(host, port, path)  # validates the path now rather than in the task
        self.host = host
        self.port = port
        self.path = path
        self.steady_interval_s = steady_interval_s
        self.preload_initial_s = preload_initial_s
        self.preload_max_s = preload_max_s
        self.preload_factor = preload_factor
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.name = name or f"{host}:{port}{path}"
        self.last_result: ProbeResult | None = None
        self.consecutive_failures = 0
        self.probes = 0
        self._on_result = on_result
        self._mode: ProbeMode = mode
        self._next_preload_gap = preload_initial_s
        self._gap = preload_initial_s
        self._probe_now = False
        self._waiter: asyncio.Future[bool] | None = None
        """The pause in progress: resolves True when woken early, False at its deadline."""
        self._task: asyncio.Task[None] | None = None
        self._conn = _Connection(host, port, path)
        self.connects = 0
        """TCP connections opened so far (one per probe without keep-alive)."""

    @property
    def mode(self) -> ProbeMode:
        return self._mode

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start probing now (the first probe runs at once). No-op if already running."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"probe-{self.name}")

    async def stop(self) -> None:
        """Stop probing and wait for the task to end. Idempotent; safe from ``on_result``."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        if task is asyncio.current_task():
            return
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Re-raise only when it is our caller being cancelled, not the task we just ended.
            if current is not None and current.cancelling():
                raise

    def set_mode(self, mode: ProbeMode) -> None:
        """Switch schedule. ``preload`` restarts the fast schedule with an immediate probe;
        ``steady`` takes effect for the current gap (measured from the last probe's start)."""
        if mode not in ("preload", "steady"):
            raise ValueError(f"unknown probe mode {mode!r}")
        self._mode = mode
        if mode == "preload":
            self._next_preload_gap = self.preload_initial_s
            self._probe_now = True
        self._wake()

    def probe_now(self) -> None:
        """Run the next probe at once instead of at its scheduled time."""
        self._probe_now = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _take_gap(self) -> float:
        if self._mode == "steady":
            self._gap = self.steady_interval_s
        else:
            self._gap = self._next_preload_gap
            self._next_preload_gap = min(self.preload_max_s, self._gap * self.preload_factor)
        return self._gap

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t_start = loop.time()
            self._probe_now = False
            result = await self._probe()
            self.probes += 1
            self.last_result = result
            self.consecutive_failures = 0 if result.ok else self.consecutive_failures + 1
            if result.ok and self._mode == "preload":
                self._mode = "steady"
            try:
                await self._on_result(result)
            except Exception:
                log.exception("health prober %s: on_result failed", self.name)
            await self._pause(loop, t_start)

    async def _probe(self) -> ProbeResult:
        """One GET, on the kept connection when there is one. A kept connection the engine has
        closed meanwhile (idle timeout, restart) fails at once (closed, reset, broken pipe): that
        probe is retried once on a fresh connection rather than counted as a failure."""
        t0 = time.monotonic()
        for attempt in (0, 1):
            reused = self._conn.open
            if not reused:
                self.connects += 1
            try:
                status = await self._conn.get(self.connect_timeout_s, self.read_timeout_s)
            except _ProbeFailure as f:
                # A timeout is the engine's answer (or lack of one), whatever the connection.
                if reused and attempt == 0 and "timeout" not in f.error:
                    continue
                return _classify(None, (time.monotonic() - t0) * 1000, f.error)
            except BaseException:
                self._conn.close()  # cancelled (stop()): no half-used connection lingers
                raise
            return _classify(status, (time.monotonic() - t0) * 1000)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pause(self, loop: asyncio.AbstractEventLoop, t_start: float) -> None:
        # One future and one timer handle per pause (not a timeout context over an Event's own
        # future): a thousand probers pause a thousand times a second.
        gap = self._take_gap()
        while not self._probe_now:
            deadline = t_start + gap
            if loop.time() >= deadline:
                return
            waiter = self._waiter = loop.create_future()
            timer = loop.call_at(deadline, _resolve, waiter)
            try:
                woken = await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not woken:
                return
            # Woken by set_mode/probe_now: a switch to steady stretches the current gap.
            if self._mode == "steady":
                gap = self.steady_interval_s


def _resolve(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
