"""What a daemon killed and started again must leave behind, as the recovery tests and the fault
benchmark check it: no process of a pool beyond its engine, no zombie under the daemon, each
pool's and each node's sequence whole, no command applied twice.

Processes are found by a marker the test put in the engine's command line (``--alias MARKER``),
read from ``/proc``: an engine left by a killed daemon is no child of the checker.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from pathlib import Path

from pool_managerd.contract.messages import Event, LeaseGranted, LeaseReleased

__all__ = ["log_checks", "only_processes", "processes_with", "sequences", "zombies_of"]


def _state(stat: bytes) -> bytes:
    """The state letter of a ``/proc/<pid>/stat`` line (after the command name, which may hold
    spaces and parentheses)."""
    return stat[stat.rfind(b")") + 2 :][:1]


def processes_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and _state(stat) != b"Z":
            found.append(int(name))
    return found


async def only_processes(marker: str, allowed: set[int], within_s: float = 10.0) -> list[int]:
    """Wait until every live process carrying ``marker`` is in ``allowed`` (or ``within_s``
    passed); returns them."""
    deadline = time.monotonic() + within_s
    while True:
        found = processes_with(marker)
        if set(found) <= allowed or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)  # ok: a process's exit has no event we can wait on from here


def zombies_of(parent: int) -> list[int]:
    """Pids of exited children of ``parent`` it has not reaped."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[0] == b"Z" and int(fields[1]) == parent:
                out.append(int(name))
    return out


def sequences(events: list[Event]) -> dict[str, list[int]]:
    """Each pool's (``pool``) and each node's (``node:<id>``) sequence numbers, in stream order."""
    seqs: dict[str, list[int]] = {}
    for e in events:
        seqs.setdefault(e.pool or f"node:{e.node}", []).append(e.seq)
    return seqs


def log_checks(events: list[Event]) -> dict[str, int]:
    """Gaps and duplicated sequences per pool and node, commands applied twice."""
    gaps = dups = 0
    for got in sequences(events).values():
        dups += len(got) - len(set(got))
        gaps += sum(1 for a, b in itertools.pairwise(got) if b not in (a, a + 1))
        if got and got[0] != 1:
            gaps += 1
    # A lease or release is applied by its own step (the events carrying its fingerprint): two
    # such grants or releases for one command id mean a retry was applied again.
    applied: Counter[tuple[str | None, str | None, str]] = Counter(
        (e.pool, e.command_id, e.type)
        for e in events
        if e.fingerprint is not None and isinstance(e.body, LeaseGranted | LeaseReleased)
    )
    twice = sum(1 for n in applied.values() if n > 1)
    return {"gaps": gaps, "duplicates": dups, "applied_twice": twice}
