"""Engine processes: argv rendering, port allocation, spawning, stopping, the spawn record.

Every engine runs in its own session and process group (``start_new_session=True``, so its
pgid equals its pid) with stdout and stderr going straight to a per-pool log file: the daemon is
not in the engine's output path, so a slow or dead daemon never blocks or SIGPIPEs an engine.

Exit is observed by watching the child's pidfd on the event loop (no thread per engine), never by
polling. When the
leader exits, for whatever reason, the whole group is SIGKILLed so no grandchild outlives it.

Processes this daemon did not spawn (found in the spawn record after a restart) cannot be
waited on; :func:`wait_pid_exit` uses a pidfd where the kernel has one (an event, not a poll) and
falls back to a short poll otherwise. Zombies count as dead everywhere in this module: a killed
process whose parent does not reap it (a container's pid 1 often does not) holds no memory,
GPU or port any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import string
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from pool_managerd.adapters.faults import fault_point
from pool_managerd.adapters.host_facts import port_is_free
from pool_managerd.contract.errors import PoolManagerError

log = logging.getLogger(__name__)

__all__ = [
    "PLACEHOLDERS",
    "AdoptedProcess",
    "EngineProcess",
    "ExitInfo",
    "SpawnEntry",
    "SpawnError",
    "SpawnRecord",
    "SpawnRecordError",
    "TemplateError",
    "allocate_port",
    "group_members",
    "kill_group",
    "pid_alive",
    "port_is_free",
    "proc_start_ticks",
    "render_argv",
    "rotate_log",
    "spawn",
    "stop_group",
    "wait_child",
    "wait_pid_exit",
]

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class SpawnError(PoolManagerError):
    """An engine could not be started. ``reason`` is one of ``not_found``, ``permission``,
    ``port_in_use``, ``log`` (the log file could not be opened), ``os_error``."""

    code = "internal"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TemplateError(PoolManagerError):
    """An argv template is malformed, names an unknown placeholder or lacks a required value."""

    code = "bad_request"


class SpawnRecordError(PoolManagerError):
    """The spawn record exists but cannot be read back."""

    code = "internal"


# --------------------------------------------------------------------------------------------
# argv templates
# --------------------------------------------------------------------------------------------

PLACEHOLDERS: Final = frozenset({"model", "port", "host", "tensor_split", "n_gpus"})
"""Placeholders an argv template may use."""

_OPTIONAL: Final = frozenset({"tensor_split"})
# Flags whose value is an optional placeholder: dropped together with an empty value.
_OPTIONAL_FLAGS: Final = {"tensor_split": frozenset({"--tensor-split", "-ts"})}
_FORMATTER: Final = string.Formatter()


def render_argv(template: Sequence[str], values: Mapping[str, str | int]) -> list[str]:
    """Substitute ``{model} {port} {host} {tensor_split} {n_gpus}`` inside each argv element.

    Each element stays one argv element whatever it contains (there is no shell). ``{{`` and
    ``}}`` are literal braces. Errors (all :class:`TemplateError`): an unknown placeholder, a
    conversion or format spec (``{port!r}``, ``{port:5}``), attribute or index access, unbalanced
    braces, an empty template, a required placeholder with no value or an empty one.

    ``{tensor_split}`` is optional (a single-GPU placement has none): when its value is missing or
    empty, an element that is exactly ``{tensor_split}`` is dropped together with the element
    before it if that is ``--tensor-split`` or ``-ts``, and an element ``--tensor-split={tensor_split}``
    (or ``-ts=...``) is dropped. Any other use of an empty ``{tensor_split}`` renders as ``""``.
    """
    if not template:
        raise TemplateError("argv template is empty")
    out: list[str] = []
    for element in template:
        try:
            parts = list(_FORMATTER.parse(element))
        except ValueError as exc:
            raise TemplateError(f"argv element {element!r}: {exc}") from None
        rendered: list[str] = []
        empty_optional: str | None = None
        only_placeholder = len(parts) == 1 and parts[0][0] == "" and parts[0][1] is not None
        for literal, name, spec, conv in parts:
            rendered.append(literal)
            if name is None:
                continue
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                raise TemplateError(f"argv element {element!r}: unknown placeholder {{{name}}} ({known})")
            if spec or conv:
                raise TemplateError(f"argv element {element!r}: format specs and conversions are not allowed")
            value = values.get(name)
            text = "" if value is None else str(value)
            if not text:
                if name not in _OPTIONAL:
                    raise TemplateError(f"argv element {element!r}: no value for {{{name}}}")
                empty_optional = name
            rendered.append(text)
        if empty_optional is not None:
            flags = _OPTIONAL_FLAGS[empty_optional]
            if only_placeholder:
                if out and out[-1] in flags:
                    out.pop()
                continue
            if len(parts) == 1 and parts[0][0].endswith("=") and parts[0][0][:-1] in flags:
                continue
        out.append("".join(rendered))
    if not out or not out[0]:
        raise TemplateError("argv template renders to no executable")
    return out


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def allocate_port(host: str = "127.0.0.1") -> int:
    """Return a port the kernel considers free on ``host`` (bind to port 0, then release it).

    Another process may take it before the engine binds; the engine then fails to bind and
    exits, which supervision handles like any early exit.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` when it is at least ``max_bytes`` long: ``path`` → ``path.1`` → ... →
    ``path.<keep>``; the oldest beyond ``keep`` is deleted (``keep=0`` just deletes ``path``).
    Returns whether it rotated. Done at spawn time only: a running engine's log grows unbounded.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < max_bytes:
        return False
    if keep <= 0:
        path.unlink(missing_ok=True)
        return True
    Path(f"{path}.{keep}").unlink(missing_ok=True)
    for i in range(keep - 1, 0, -1):
        src = Path(f"{path}.{i}")
        if src.exists():
            os.replace(src, f"{path}.{i + 1}")
    os.replace(path, f"{path}.1")
    return True


# --------------------------------------------------------------------------------------------
# Process inspection and group signals (also for processes this daemon did not spawn)
# --------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the comm field (index 0 = state), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    return raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        # No procfs (not Linux): the kill(0) answer is all we have.
        return not os.path.isdir("/proc/self")
    return fields[0] not in ("Z", "X")


def proc_start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (/proc field 22), or None.

    With the pid it identifies a process across pid reuse; the spawn record stores it so an
    adopting daemon never signals a stranger that inherited a recorded pid.
    """
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``; scans /proc (a few ms)."""
    members: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit():
            continue
        fields = _proc_stat(int(name))
        if fields is not None and len(fields) > 3 and fields[3] == str(pgid) and fields[0] not in "ZX":
            members.append(int(name))
    return members


def _group_exists(pgid: int) -> bool:
    """False when no process (zombies included) is in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_pgid(pgid: int) -> None:
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    if pgid == os.getpgrp():
        raise ValueError(f"refusing to signal our own process group {pgid}")


def kill_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if the group no longer exists.

    Refuses (``ValueError``) groups 0 and 1 and the caller's own group: a corrupt spawn record
    must never make the daemon signal itself or everything.
    """
    _check_pgid(pgid)
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("no permission to signal process group %d", pgid)
        return False
    return True


async def wait_pid_exit(pid: int, within_s: float | None) -> bool:
    """Wait up to ``within_s`` (None: forever) until ``pid`` is gone or a zombie; True if it is.

    Works for processes that are not our children. Uses a pidfd (readable when the process
    exits, an event) where available, else polls with a short interval.
    """
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        ready: asyncio.Future[None] = loop.create_future()
        try:
            # poll, not select: select() refuses descriptors numbered 1024 and above, which a daemon
            # watching hundreds of engines reaches (its watchers then died and exits went unseen).
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if poller.poll(0):
                return True

            def on_readable() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(fd, on_readable)
            try:
                await asyncio.wait_for(ready, within_s)
            except TimeoutError:
                return not pid_alive(pid)
            finally:
                loop.remove_reader(fd)
            return True
        finally:
            os.close(fd)
    deadline = None if within_s is None else time.monotonic() + within_s
    delay = 0.005
    while pid_alive(pid):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)  # ok: no pidfd; a non-child cannot be waited on
        delay = min(delay * 2, 0.05)
    return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_child(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a child of this process to exit, reap it, and return its return code (negative:
    the signal that killed it), as ``Popen.returncode`` says it.

    Watches the child's pidfd on the event loop (readable once it has exited), so a thousand
    engines cost a thousand descriptors and no thread; without pidfds (not Linux, or a kernel
    before 5.3) a worker thread waits.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return await asyncio.to_thread(proc.wait)
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG never blocks)
            except ChildProcessError:
                # Reaped elsewhere (someone else's waitpid(-1)): the status is lost.
                proc.returncode = proc.returncode if proc.returncode is not None else 255
                return proc.returncode
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
    finally:
        os.close(fd)


async def _wait_group_gone(pgid: int, within_s: float) -> bool:
    """Wait until ``pgid`` has no live member, re-scanning as members exit (they may fork)."""
    deadline = time.monotonic() + within_s
    while True:
        # The common case first: the leader was reaped and left nothing behind, so the group
        # is gone and the kernel says so without a scan of /proc (milliseconds per engine).
        if not _group_exists(pgid):
            return True
        # A /proc scan takes milliseconds on a busy host: keep it off the event loop.
        members = await asyncio.to_thread(group_members, pgid)
        if not members:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for pid in members:
            if not await wait_pid_exit(pid, max(0.0, deadline - time.monotonic())):
                return False


async def stop_group(pgid: int, grace_s: float, *, settle_s: float = 1.0) -> bool:
    """Stop a process group this daemon did not spawn (adoption, orphan reaping).

    SIGTERM to the group, wait up to ``grace_s`` for every member to exit, SIGKILL the group,
    wait up to ``settle_s`` more. Returns True when no live member is left.
    """
    _check_pgid(pgid)
    if not kill_group(pgid, signal.SIGTERM) and not group_members(pgid):
        return True
    if await _wait_group_gone(pgid, grace_s):
        return True
    kill_group(pgid, signal.SIGKILL)
    return await _wait_group_gone(pgid, settle_s)


def kill_leftovers(entry: SpawnEntry) -> list[int]:
    """SIGKILL what is left of a recorded engine's process group after its leader died.

    Only members that started no earlier than the recorded leader are killed: a group id can be
    reused once every member is gone, and a stranger's process must never be signalled. Without
    a recorded start time nothing is killed. Returns the pids signalled.
    """
    if entry.start_ticks is None or entry.pgid <= 1 or entry.pgid == os.getpgrp():
        return []
    killed = []
    for pid in group_members(entry.pgid):
        ticks = proc_start_ticks(pid)
        if ticks is not None and ticks >= entry.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


# --------------------------------------------------------------------------------------------
# Spawn record
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpawnEntry:
    """One live engine as recorded on disk, enough for a restarted daemon to find it."""

    pool: str
    pid: int
    pgid: int
    port: int
    host: str
    started_at: float
    argv: list[str]
    log_path: str | None
    start_ticks: int | None = None
    """/proc start time of ``pid``; guards adoption against pid reuse (see :func:`proc_start_ticks`)."""

    def is_live(self) -> bool:
        """True when the recorded process is still running and is the same process."""
        if not pid_alive(self.pid):
            return False
        if self.start_ticks is not None:
            ticks = proc_start_ticks(self.pid)
            if ticks is not None and ticks != self.start_ticks:
                return False
        try:
            return os.getpgid(self.pid) == self.pgid
        except OSError:
            return False

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SpawnEntry:
        return cls(
            pool=str(obj["pool"]),
            pid=int(obj["pid"]),
            pgid=int(obj["pgid"]),
            port=int(obj["port"]),
            host=str(obj.get("host", "127.0.0.1")),
            started_at=float(obj["started_at"]),
            argv=[str(a) for a in obj["argv"]],
            log_path=None if obj.get("log_path") is None else str(obj["log_path"]),
            start_ticks=None if obj.get("start_ticks") is None else int(obj["start_ticks"]),
        )


_RECORD_VERSION: Final = 2
_LEGACY_VERSION: Final = 1
_COMPACT_MIN_OPS: Final = 64


class SpawnRecord:
    """The daemon's list of live engines: an append-only journal with compaction.

    Format: JSON lines. The first is ``{"version": 2}``; each further line is
    ``{"add": <SpawnEntry as an object>}`` or ``{"del": <pid>}``. An update appends one short
    line and fsyncs it, so its cost does not grow with the number of engines (the whole-file
    rewrite it replaces cost 12 ms for the first engine and 158 ms for the 1000th). Once the
    journal holds more than twice as many lines as live engines (and at least 64), it is
    compacted: the live entries are written to a temporary file in the same directory, fsynced
    and ``os.replace``d over the journal (and the directory fsynced), so compaction costs O(1)
    per update on average. A crash at any instant leaves a readable record: a rename is atomic
    and an append torn by a crash can only be the last line, which :meth:`load` ignores (its
    update never returned, so the engine it describes was never released). The version 1 format
    (one JSON document) is still read, and replaced by a journal at the first update.

    Writes are synchronous and serialised by a lock; callers on the event loop run them in a
    worker thread (an fsync costs milliseconds).
    """

    def __init__(self, path: Path | str, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: dict[int, SpawnEntry] = {e.pid: e for e in self.load(self.path)}
        # Lines in the journal now; None: the file is absent or not a journal (rewrite first).
        self._lines: int | None = self._journal_lines()

    @staticmethod
    def load(path: Path | str) -> list[SpawnEntry]:
        """Read a record; a missing file is an empty record; a corrupt one raises
        :class:`SpawnRecordError`."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return _parse_record(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SpawnRecordError(f"spawn record {p} is unreadable: {exc}") from None

    def _journal_lines(self) -> int | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.startswith(b'{"version": 2}\n'):
            return None
        return raw.count(b"\n")

    @property
    def entries(self) -> list[SpawnEntry]:
        return list(self._entries.values())

    def add(self, entry: SpawnEntry) -> None:
        """Record ``entry`` durably (one appended line, fsynced) before returning."""
        with self._lock:
            self._entries[entry.pid] = entry
            try:
                self._append({"add": asdict(entry)})
            except BaseException:
                self._entries.pop(entry.pid, None)
                raise

    def remove(self, pid: int) -> None:
        """Forget ``pid`` durably; a pid not in the record costs nothing."""
        with self._lock:
            entry = self._entries.pop(pid, None)
            if entry is None:
                return
            try:
                self._append({"del": pid})
            except BaseException:
                self._entries[pid] = entry
                raise

    def _append(self, op: Mapping[str, Any]) -> None:
        if self._lines is None:
            self._rewrite()  # absent or a version 1 document: start the journal from the entries
            return
        if self._lines > max(_COMPACT_MIN_OPS, 2 * len(self._entries) + 1):
            self._rewrite()
            return
        line = json.dumps(op, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._lines += 1

    def _rewrite(self) -> None:
        lines = [b'{"version": 2}\n']
        lines += [
            json.dumps({"add": asdict(e)}, separators=(",", ":")).encode() + b"\n" for e in self._entries.values()
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(lines))
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._lines = len(lines)
        if self.fsync:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _parse_record(raw: bytes) -> list[SpawnEntry]:
    """Entries of a journal (version 2) or of a version 1 document."""
    if not raw.startswith(b'{"version": 2}\n'):
        doc = json.loads(raw)
        if isinstance(doc, list):  # tolerate a bare list of entries
            doc = {"version": _LEGACY_VERSION, "engines": doc}
        if doc.get("version") != _LEGACY_VERSION:
            raise ValueError(f"unsupported version {doc.get('version')!r}")
        return [SpawnEntry.from_json(e) for e in doc["engines"]]
    entries: dict[int, SpawnEntry] = {}
    lines = raw.split(b"\n")
    # The text after the last newline is an append a crash tore (or nothing): its update never
    # returned, so nothing depends on it.
    for n, line in enumerate(lines[1:-1], start=2):
        try:
            op = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from None
        if "add" in op:
            entry = SpawnEntry.from_json(op["add"])
            entries[entry.pid] = entry
        elif "del" in op:
            entries.pop(int(op["del"]), None)
        else:
            raise ValueError(f"line {n}: neither add nor del")
    return list(entries.values())


# --------------------------------------------------------------------------------------------
# Engine handles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How an engine ended. Exactly one of ``exit_code``/``signal`` is set for a spawned child;
    both are None for an adopted process (a non-child's status cannot be read)."""

    exit_code: int | None
    signal: int | None
    expected: bool = False
    """True when the exit followed our own stop request."""
    ended_at: float = field(default_factory=time.time)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        return "exited (status unknown)"


OnExit = Callable[["EngineHandle", ExitInfo], None]


class EngineHandle:
    """What the pool actor holds for a running engine, spawned or adopted.

    ``exited`` resolves (never fails) with the :class:`ExitInfo` once the leader is gone and the
    group has been SIGKILLed; ``on_exit`` (sync, called once, exceptions logged) fires just
    before. ``stop`` is idempotent, safe after exit, and shared by concurrent callers.
    """

    def __init__(
        self,
        *,
        pool: str,
        pid: int,
        port: int,
        host: str,
        started_at: float,
        argv: list[str],
        log_path: Path | None,
        record: SpawnRecord | None,
        on_exit: OnExit | None,
    ) -> None:
        self.pool = pool
        self.pid = pid
        self.pgid = pid
        self.port = port
        self.host = host
        self.started_at = started_at
        self.argv = argv
        self.log_path = log_path
        self.stop_requested = False
        self.exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._record = record
        self._on_exit = on_exit
        self._group_gone = False
        self._stop_task: asyncio.Task[ExitInfo] | None = None
        self._recorded_gone = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def entry(self) -> SpawnEntry:
        return SpawnEntry(
            pool=self.pool,
            pid=self.pid,
            pgid=self.pgid,
            port=self.port,
            host=self.host,
            started_at=self.started_at,
            argv=list(self.argv),
            log_path=None if self.log_path is None else str(self.log_path),
            start_ticks=proc_start_ticks(self.pid),
        )

    async def wait(self) -> ExitInfo:
        """Wait for the engine to exit (cancelling this does not affect the engine)."""
        return await asyncio.shield(self.exited)

    def signal_group(self, sig: int) -> bool:
        """Signal the engine's group unless it is known to be gone (its id may be reused)."""
        if self._group_gone:
            return False
        return kill_group(self.pgid, sig)

    async def stop(self, grace_s: float, *, settle_s: float = 1.0) -> ExitInfo:
        """SIGTERM the group, wait up to ``grace_s`` for the leader, then SIGKILL the group.

        Returns once the leader has been reaped and the group SIGKILLed, having waited up to
        ``settle_s`` for the other members to vanish (so GPU memory and ports are released).
        Worst case ``grace_s + settle_s`` plus scheduling. Cancelling a caller does not cancel
        the stop.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(
                self._stop(grace_s, settle_s), name=f"stop-engine-{self.pool}-{self.pid}"
            )
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float, settle_s: float) -> ExitInfo:
        if not self.exited.done():
            self.stop_requested = True
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
            except TimeoutError:
                log.info("engine %s pid %d ignored SIGTERM for %.1fs: SIGKILL", self.pool, self.pid, grace_s)
                self.signal_group(signal.SIGKILL)
        info = await asyncio.shield(self.exited)
        if not self._group_gone:
            self.signal_group(signal.SIGKILL)
            self._group_gone = await _wait_group_gone(self.pgid, settle_s)
        # A stopped engine is out of the spawn record when stop() returns.
        await self._recorded_gone.wait()
        return info

    async def _finish(self, info: ExitInfo) -> None:
        # The leader is gone: kill the rest of the group before anything else can run, so no
        # grandchild survives an engine that crashed or exited on its own.
        with contextlib.suppress(ValueError):
            self.signal_group(signal.SIGKILL)
        # Report the exit first: the fsync of the spawn record and the /proc scan below cost
        # milliseconds each, and the exit must reach the lifecycle before them. A dead pid left
        # in the record for a moment is harmless: adoption checks the process start time.
        if self._on_exit is not None:
            try:
                self._on_exit(self, info)
            except Exception:
                log.exception("on_exit callback of engine %s pid %d failed", self.pool, self.pid)
        self.exited.set_result(info)
        await asyncio.sleep(0)
        try:
            if self._record is not None:
                await asyncio.to_thread(self._record.remove, self.pid)
        except OSError:
            log.exception("cannot update spawn record %s", self._record.path if self._record else "?")
        finally:
            self._recorded_gone.set()
        if self._stop_task is None:
            self._group_gone = await _wait_group_gone(self.pgid, 1.0)


class EngineProcess(EngineHandle):
    """An engine spawned by this daemon (see :func:`spawn`); exit is observed by ``wait()``.

    A gated engine (``gate`` is the write end of its gate pipe) is held before ``exec`` until
    :meth:`release`; it never runs if the daemon dies first (the pipe closes and the gate exits)."""

    def __init__(self, proc: subprocess.Popen[bytes], *, gate: int | None = None, **kw: Any) -> None:
        super().__init__(pid=proc.pid, **kw)
        self.proc = proc
        self._gate = gate
        self._watch_task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"watch-engine-{kw['pool']}-{proc.pid}"
        )

    @property
    def gated(self) -> bool:
        """Whether the engine still waits at its gate."""
        return self._gate is not None

    def release(self) -> None:
        """Let a gated engine run (a no-op for one that runs already)."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        try:
            os.write(gate, b"go\n")
        except OSError as exc:
            # The gate is gone (the process was killed meanwhile): its exit is reported as usual.
            log.warning("engine %s pid %d: gate not opened: %s", self.pool, self.pid, exc)
        finally:
            os.close(gate)

    def _close_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            with contextlib.suppress(OSError):
                os.close(gate)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _watch(self) -> None:
        rc = await wait_child(self.proc)
        self._close_gate()
        info = (
            ExitInfo(exit_code=None, signal=-rc, expected=self.stop_requested)
            if rc < 0
            else ExitInfo(exit_code=rc, signal=None, expected=self.stop_requested)
        )
        log.info("engine %s pid %d %s", self.pool, self.pid, info.describe())
        await self._finish(info)


class AdoptedProcess(EngineHandle):
    """An engine from the spawn record, left running by a previous daemon; not our child, so
    its exit status is unknown (``ExitInfo(None, None)``). Create with :meth:`adopt`."""

    def __init__(self, entry: SpawnEntry, record: SpawnRecord | None, on_exit: OnExit | None) -> None:
        super().__init__(
            pool=entry.pool,
            pid=entry.pid,
            port=entry.port,
            host=entry.host,
            started_at=entry.started_at,
            argv=list(entry.argv),
            log_path=None if entry.log_path is None else Path(entry.log_path),
            record=record,
            on_exit=on_exit,
        )
        self.pgid = entry.pgid
        self._watch_task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"watch-adopted-{entry.pool}-{entry.pid}"
        )

    @classmethod
    def adopt(
        cls, entry: SpawnEntry, *, record: SpawnRecord | None = None, on_exit: OnExit | None = None
    ) -> AdoptedProcess | None:
        """Take over ``entry`` if its process is still the one recorded, else None.

        Must be called with a running event loop. Refuses groups 0/1 and the daemon's own group.
        """
        if entry.pgid <= 1 or entry.pgid == os.getpgrp() or not entry.is_live():
            return None
        return cls(entry, record, on_exit)

    async def _watch(self) -> None:
        await wait_pid_exit(self.pid, None)
        await self._finish(ExitInfo(exit_code=None, signal=None, expected=self.stop_requested))


# --------------------------------------------------------------------------------------------
# Spawning
# --------------------------------------------------------------------------------------------


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
            # Two fsyncs: off the event loop.
            await asyncio.to_thread(record.add, engine.entry())
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
