"""Process inspection (/proc) and process-group signals, also for processes this daemon did not spawn.

Zombies count as dead here: a killed process whose parent does not reap it holds no memory, GPU
or port any more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import time
import weakref

log = logging.getLogger(__name__)

__all__ = [
    "GroupScans",
    "group_members",
    "kill_group",
    "pid_alive",
    "proc_start_ticks",
    "stop_group",
    "wait_child",
    "wait_group_gone",
    "wait_pid_exit",
]


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
    return _live_groups().get(pgid, [])


def _live_groups() -> dict[int, list[int]]:
    """Live (non-zombie) pids of every process group, from one scan of /proc."""
    groups: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return groups
    for name in names:
        if not name.isdigit():
            continue
        fields = _proc_stat(int(name))
        if fields is not None and len(fields) > 3 and fields[0] not in "ZX":
            groups.setdefault(int(fields[3]), []).append(int(name))
    return groups


class GroupScans:
    """Scans of /proc for the members of process groups, one at a time, each shared by every
    caller that asked since the previous one began.

    A scan reads every process's stat file: milliseconds with a thousand engines, and a stop of
    a thousand adopted engines (not our children: their zombies wait for another parent to reap
    them, so their groups still exist) asked for a thousand of them at once, one after another
    in worker threads, for seconds. A caller always gets a scan that began after it asked, so
    it sees every process that existed when it asked. Loop-confined.
    """

    def __init__(self) -> None:
        self.scans = 0
        """Scans made so far."""
        self._next: asyncio.Future[dict[int, list[int]]] | None = None
        self._runner: asyncio.Task[None] | None = None

    async def members(self, pgid: int) -> list[int]:
        """Live pids of group ``pgid`` now (zombies excluded)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="proc-group-scans")
        groups = await asyncio.shield(fut)
        return groups.get(pgid, [])

    async def _run(self) -> None:
        try:
            while self._next is not None:
                fut, self._next = self._next, None
                try:
                    groups = await asyncio.to_thread(_live_groups)
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as exc:
                    fut.set_exception(exc)
                else:
                    self.scans += 1
                    fut.set_result(groups)
        finally:
            self._runner = None


_SCANS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupScans] = weakref.WeakKeyDictionary()


def _loop_scans() -> GroupScans:
    loop = asyncio.get_running_loop()
    scans = _SCANS.get(loop)
    if scans is None:
        scans = _SCANS[loop] = GroupScans()
    return scans


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


async def wait_group_gone(pgid: int, within_s: float, *, scans: GroupScans | None = None) -> bool:
    """Wait until ``pgid`` has no live member, re-scanning as members exit (they may fork).

    The scans of /proc are shared with the loop's other waiters (``scans``: whose; by default
    one :class:`GroupScans` per event loop)."""
    deadline = time.monotonic() + within_s
    shared = scans if scans is not None else _loop_scans()
    while True:
        # The common case first: the leader was reaped and left nothing behind, so the group
        # is gone and the kernel says so without a scan of /proc (milliseconds per engine).
        if not _group_exists(pgid):
            return True
        # A /proc scan takes milliseconds on a busy host: off the event loop, shared.
        members = await shared.members(pgid)
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
    if await wait_group_gone(pgid, grace_s):
        return True
    kill_group(pgid, signal.SIGKILL)
    return await wait_group_gone(pgid, settle_s)
