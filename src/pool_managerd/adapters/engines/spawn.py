"""Starting an engine: in its own process group, optionally held at a gate until it is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from pool_managerd.adapters.engines.errors import SpawnError
from pool_managerd.adapters.engines.handles import EngineProcess, OnExit
from pool_managerd.adapters.engines.logs import rotate_log
from pool_managerd.adapters.engines.procs import wait_child
from pool_managerd.adapters.engines.record import SpawnRecord
from pool_managerd.adapters.faults import fault_point
from pool_managerd.adapters.host_facts import port_is_free

log = logging.getLogger(__name__)

__all__ = ["GATE_NAME", "spawn"]


_GATE_SCRIPT: Final = 'read -r _ || exit 125; exec "$@" </dev/null'
"""The engine's gate: wait for one line on stdin (the gate pipe), then become the engine, with
the same pid, process group and start time. EOF (the daemon died) exits 125 without running it."""
GATE_NAME: Final = "pool-managerd-gate"


def _check_executable(exe: str, env: Mapping[str, str], cwd: Path | str | None) -> None:
    """The errors exec would give, raised before the fork (the gate execs the engine later)."""
    if "/" in exe:
        path = Path(exe) if cwd is None or os.path.isabs(exe) else Path(cwd) / exe
        if cwd is not None and not Path(cwd).is_dir():
            return  # the fork reports the working directory
        if not path.exists():
            raise SpawnError("not_found", f"cannot spawn engine {exe!r}: executable not found")
        if not path.is_file() or not os.access(path, os.X_OK):
            raise SpawnError("permission", f"cannot spawn engine {exe!r}: permission denied (not executable?)")
        return
    if shutil.which(exe, path=env.get("PATH", os.defpath)) is None:
        raise SpawnError("not_found", f"cannot spawn engine {exe!r}: executable not found on PATH")


async def _popen(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` in a worker thread. A caller cancelled meanwhile does not leak the
    child: it is killed and reaped before the cancellation goes on."""

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, **kw)

    fut = asyncio.get_running_loop().run_in_executor(None, start)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            proc: subprocess.Popen[bytes] = await fut
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            await wait_child(proc)
        raise


async def spawn(
    argv: Sequence[str],
    *,
    pool: str,
    port: int,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    log_path: Path | str | None = None,
    log_max_bytes: int = 10 * 1024 * 1024,
    log_keep: int = 3,
    cwd: Path | str | None = None,
    record: SpawnRecord | None = None,
    on_exit: OnExit | None = None,
    check_port: bool = True,
    gated: bool = False,
) -> EngineProcess:
    """Start an engine in its own process group and return its handle.

    ``argv`` is already rendered (see :func:`render_argv`). ``env`` is merged over the daemon's
    environment (``inherit_env=False``: used alone); the caller passes ``CUDA_VISIBLE_DEVICES``.
    stdout and stderr are appended to ``log_path`` (rotated first when over ``log_max_bytes``,
    ``log_keep`` old files kept) after a header line; without ``log_path`` they go to
    /dev/null. ``port`` is checked free first when ``check_port``.

    With ``gated`` the engine is forked held at a gate, its spawn record entry is written (off
    the event loop) before this returns, and it runs only once :meth:`EngineProcess.release` is
    called: a crash at any instant leaves either no engine or a recorded one. A gated spawn
    whose record cannot be written is killed and raises :class:`SpawnError`.

    Raises :class:`SpawnError` (never a bare ``OSError``) when the engine cannot be started.
    """
    argv = list(argv)
    if not argv or not argv[0]:
        raise SpawnError("not_found", "empty argv: no executable to run")
    if check_port and not port_is_free(host, port):
        raise SpawnError("port_in_use", f"port {host}:{port} is already in use")
    full_env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})

    log_fd: int | None = None
    lp = None if log_path is None else Path(log_path)
    if lp is not None:
        try:
            lp.parent.mkdir(parents=True, exist_ok=True)
            rotate_log(lp, log_max_bytes, log_keep)
            log_fd = os.open(lp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            header = (
                f"==== pool-managerd: spawning pool={pool} port={port} at {time.time():.6f} "
                f"CUDA_VISIBLE_DEVICES={full_env.get('CUDA_VISIBLE_DEVICES', '<unset>')}\n"
                f"==== argv: {json.dumps(argv)}\n"
            )
            os.write(log_fd, header.encode())
        except OSError as exc:
            if log_fd is not None:
                os.close(log_fd)
            raise SpawnError("log", f"cannot open engine log {lp}: {exc.strerror or exc}") from None

    gate_r: int | None = None
    gate_w: int | None = None
    launch = argv
    if gated:
        try:
            _check_executable(argv[0], full_env, cwd)
        except SpawnError as exc:
            if log_fd is not None:
                os.write(log_fd, f"==== spawn failed: {exc.message}\n".encode())
                os.close(log_fd)
            raise
        gate_r, gate_w = os.pipe()  # both ends close-on-exec; the child gets gate_r as stdin only
        launch = ["/bin/sh", "-c", _GATE_SCRIPT, GATE_NAME, *argv]
    started_at = time.time()
    try:
        # Popen, not asyncio's subprocess: on Python 3.11 asyncio watches each child with a
        # thread of its own (1,000 engines, 1,000 threads); wait_child watches a pidfd on the
        # loop instead. The fork runs in a worker thread, as asyncio's own would yield to the
        # loop: a reply published just before (a command's "accepted") goes out meanwhile.
        proc = await _popen(
            launch,
            stdin=gate_r if gate_r is not None else subprocess.DEVNULL,
            stdout=log_fd if log_fd is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log_fd is not None else subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        errno_ = exc.errno if isinstance(exc, OSError) else None
        reason = {
            errno.ENOENT: "not_found",
            errno.EACCES: "permission",
            errno.EPERM: "permission",
        }.get(errno_ or 0, "os_error")
        if cwd is not None and isinstance(exc, OSError) and exc.filename == str(cwd):
            reason, detail = "os_error", f"working directory {str(cwd)!r}: {exc.strerror}"
        else:
            detail = {
                "not_found": "executable not found" + ("" if "/" in argv[0] else " on PATH"),
                "permission": "permission denied (not executable?)",
            }.get(reason, (exc.strerror if isinstance(exc, OSError) else None) or str(exc))
        if lp is not None and log_fd is not None:
            os.write(log_fd, f"==== spawn failed: {detail}\n".encode())
        if gate_w is not None:
            os.close(gate_w)
        raise SpawnError(reason, f"cannot spawn engine {argv[0]!r} for pool {pool!r}: {detail}") from None
    finally:
        if log_fd is not None:
            os.close(log_fd)
        if gate_r is not None:
            os.close(gate_r)
    fault_point("spawn:after_fork")

    engine = EngineProcess(
        proc,
        pool=pool,
        port=port,
        host=host,
        started_at=started_at,
        argv=argv,
        log_path=lp,
        record=record,
        on_exit=on_exit,
        gate=gate_w,
    )
    if record is not None:
        try:
            # Off the event loop, in one write with the other spawns' and exits' entries.
            await record.add_async(engine.entry())
        except OSError as exc:
            if not gated:
                log.exception("cannot write spawn record %s", record.path)
            else:
                # An engine nobody could find after a crash must not run at all.
                await engine.stop(0.0)
                raise SpawnError("record", f"cannot write spawn record {record.path}: {exc.strerror or exc}") from None
    fault_point("spawn:after_record")
    log.info("spawned engine %s pid %d port %d%s: %s", pool, engine.pid, port, " (gated)" if gated else "", argv)
    return engine
