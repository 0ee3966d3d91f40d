"""The spawn record: the daemon's durable list of live engines, and cleaning up after one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from pool_managerd.adapters.engines.errors import SpawnRecordError
from pool_managerd.adapters.engines.procs import group_members, pid_alive, proc_start_ticks

__all__ = ["SpawnEntry", "SpawnRecord", "kill_leftovers"]


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


_Op = SpawnEntry | int
"""One update of the record: an entry to add, or the pid of one to remove."""

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

    Writes are synchronous and serialised by a lock. Callers on the event loop use
    :meth:`add_async` and :meth:`remove_async`: the updates asked for while one write is under
    way go out together in the next (one append, one fsync, in a worker thread), so a thousand
    engines started or stopped at once cost a few writes, not a thousand one after another
    (each caller still returns only once its own update is durable).
    """

    def __init__(self, path: Path | str, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: dict[int, SpawnEntry] = {e.pid: e for e in self.load(self.path)}
        # Lines in the journal now; None: the file is absent or not a journal (rewrite first).
        self._lines: int | None = self._journal_lines()
        self.writes = 0
        """Appends and rewrites made (a batch of updates is one)."""
        self._batch: list[tuple[_Op, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

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
        self._apply([entry])

    def remove(self, pid: int) -> None:
        """Forget ``pid`` durably; a pid not in the record costs nothing."""
        self._apply([pid])

    async def add_async(self, entry: SpawnEntry) -> None:
        """:meth:`add` from the event loop, written together with the updates asked for meanwhile."""
        await self._queue(entry)

    async def remove_async(self, pid: int) -> None:
        """:meth:`remove` from the event loop, written together with the updates asked for meanwhile."""
        await self._queue(pid)

    async def _queue(self, op: _Op) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._batch.append((op, done))
        if self._writer is None:
            self._writer = loop.create_task(self._write_batches(), name=f"spawn-record-{self.path.name}")
        # Shielded: a caller that stops waiting does not withdraw its update from the batch.
        await asyncio.shield(done)

    async def _write_batches(self) -> None:
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    # Off the loop: an fsync costs milliseconds.
                    await asyncio.to_thread(self._apply, [op for op, _ in batch])
                except BaseException as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc if isinstance(exc, Exception) else OSError("write cancelled"))
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._writer = None

    def _apply(self, ops: list[_Op]) -> None:
        """Apply ``ops`` (an entry: add it; a pid: remove it) in memory and on disk, or neither."""
        with self._lock:
            undo: list[tuple[int, SpawnEntry | None]] = []
            lines: list[Mapping[str, Any]] = []
            for op in ops:
                if isinstance(op, SpawnEntry):
                    undo.append((op.pid, self._entries.get(op.pid)))
                    self._entries[op.pid] = op
                    lines.append({"add": asdict(op)})
                elif op in self._entries:
                    undo.append((op, self._entries.pop(op)))
                    lines.append({"del": op})
            if not lines:
                return
            try:
                self._append(lines)
            except BaseException:
                for pid, old in reversed(undo):
                    if old is None:
                        self._entries.pop(pid, None)
                    else:
                        self._entries[pid] = old
                raise

    def _append(self, ops: list[Mapping[str, Any]]) -> None:
        if self._lines is None:
            self._rewrite()  # absent or a version 1 document: start the journal from the entries
            return
        if self._lines > max(_COMPACT_MIN_OPS, 2 * len(self._entries) + 1):
            self._rewrite()
            return
        self.writes += 1
        # One write: a crash can tear only its last line, which load() ignores.
        data = b"".join(json.dumps(op, separators=(",", ":")).encode() + b"\n" for op in ops)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._lines += len(ops)

    def _rewrite(self) -> None:
        self.writes += 1
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
