"""GPU fault watchers: a thread of their own each, turning driver events into :class:`GpuFaultFact`.

* :class:`NvmlFaultWatcher`: NVML's event API. It registers every GPU for the critical events it
  supports (``nvmlEventTypeXidCriticalError``, ``nvmlEventTypeDoubleBitEccError``) on one event
  set and blocks in ``nvmlEventSetWait_v2`` (1 s at a time, so it can stop). A wait that raises
  ``GPU_IS_LOST`` means a GPU fell off the bus: each GPU is queried to find which, and reported
  ``fell_off_bus``; a handle that cannot be queried any more is ``handle_lost``.
* :class:`SimFaultWatcher`: the simulated driver's ``faults.jsonl`` (see
  :mod:`pool_managerd.adapters.sim_gpus`), read as lines are appended to it.

Neither decides anything: the facts go to ``on_fact`` (called from the watcher's thread; the
runtime hands them to its loop) and :mod:`pool_managerd.core.gpu_faults` classifies them.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool_managerd.core.gpu_faults import FAULT_KINDS, FaultKind

log = logging.getLogger(__name__)

MAX_FAULT_LINE = 4096
"""Longest line of ``faults.jsonl`` read; longer ones are skipped."""

# nvml.h values; read from the module when it has them.
_EVENT_XID = 0x0000000000000008
_EVENT_DBE = 0x0000000000000002
_ERROR_TIMEOUT = 10
_ERROR_GPU_IS_LOST = 15


@dataclass(frozen=True, slots=True)
class GpuFaultFact:
    """One critical GPU event as the driver reported it."""

    uuid: str
    kind: FaultKind
    xid: int | None = None
    at: float = 0.0


FactSink = Callable[[GpuFaultFact], None]


class _Thread:
    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _guarded(self) -> None:
        try:
            self.run()
        except Exception:
            # A watcher that dies must not take the daemon with it; faults are then seen only
            # by their consequences (engines exiting, probes failing), as before.
            log.exception("%s stopped", self._thread.name)

    def run(self) -> None:
        raise NotImplementedError


class SimFaultWatcher(_Thread):
    """Reads faults appended to a simulated driver's ``faults.jsonl``; polls every ``poll_s``."""

    def __init__(self, path: Path, on_fact: FactSink, *, poll_s: float = 0.05) -> None:
        super().__init__("gpu-faults-sim")
        self.path = path
        self.on_fact = on_fact
        self.poll_s = poll_s
        self._offset = path.stat().st_size if path.exists() else 0
        """Faults written before this daemon started are history, already acted on."""

    def run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Read what was appended since the last poll (whole lines only)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read(1024 * 1024)
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in data[: end + 1].splitlines():
            fact = parse_fault_line(line)
            if fact is not None:
                self.on_fact(fact)


def parse_fault_line(line: bytes) -> GpuFaultFact | None:
    """``{"uuid": "GPU-...", "xid": 79}`` or ``{"uuid": ..., "kind": "ecc_dbe"}`` → a fact; None
    (logged) for anything else."""
    if not line.strip() or len(line) > MAX_FAULT_LINE:
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        log.warning("faults.jsonl: not JSON, skipped")
        return None
    if not isinstance(doc, dict):
        return None
    uuid, xid, kind = doc.get("uuid"), doc.get("xid"), doc.get("kind", "xid")
    if not isinstance(uuid, str) or not uuid or len(uuid) > 96 or kind not in FAULT_KINDS:
        log.warning("faults.jsonl: a fault needs a GPU uuid and a known kind (%s); skipped", ", ".join(FAULT_KINDS))
        return None
    if kind == "xid" and (not isinstance(xid, int) or isinstance(xid, bool) or not 0 < xid < 100_000):
        log.warning("faults.jsonl: an xid fault needs an integer xid; skipped")
        return None
    return GpuFaultFact(uuid=uuid, kind=kind, xid=xid if kind == "xid" else None, at=time.time())


class NvmlFaultWatcher(_Thread):
    """Waits on NVML's event set for critical GPU events (``module``: a pynvml stand-in in tests)."""

    def __init__(self, on_fact: FactSink, *, module: Any | None = None, wait_ms: int = 1000) -> None:
        super().__init__("gpu-faults-nvml")
        self.on_fact = on_fact
        self._module = module
        self.wait_ms = wait_ms
        self.handles: dict[str, Any] = {}
        self._lost: set[str] = set()

    def _nv(self) -> Any:
        if self._module is None:
            self._module = importlib.import_module("pynvml")
        return self._module

    def _code(self, name: str, fallback: int) -> int:
        value = getattr(self._nv(), name, fallback)
        return value if isinstance(value, int) else fallback

    def open(self) -> Any:
        """Initialise NVML and register every GPU's supported critical events; the event set."""
        nv = self._nv()
        nv.nvmlInit()
        events = nv.nvmlEventSetCreate()
        wanted = self._code("nvmlEventTypeXidCriticalError", _EVENT_XID) | self._code(
            "nvmlEventTypeDoubleBitEccError", _EVENT_DBE
        )
        for index in range(int(nv.nvmlDeviceGetCount())):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            self.handles[uuid] = handle
            try:
                supported = int(nv.nvmlDeviceGetSupportedEventTypes(handle))
                nv.nvmlDeviceRegisterEvents(handle, wanted & supported, events)
            except Exception as exc:
                log.warning("GPU %s: critical events cannot be watched (%s)", uuid, exc)
        return events

    def run(self) -> None:
        try:
            events = self.open()
        except Exception as exc:
            # No pynvml, no driver, or a driver without the event API: faults are then seen only
            # by their consequences (engines exiting, probes failing).
            log.warning("GPU faults are not watched: NVML's event API is unavailable (%s: %s)", type(exc).__name__, exc)
            return
        try:
            while not self._stop.is_set():
                self.wait_once(events)
        finally:
            nv = self._nv()
            try:
                nv.nvmlEventSetFree(events)
            finally:
                nv.nvmlShutdown()

    def wait_once(self, events: Any) -> None:
        """One wait on the event set; reports what it brought."""
        nv = self._nv()
        try:
            data = nv.nvmlEventSetWait_v2(events, self.wait_ms)
        except Exception as exc:
            value = getattr(exc, "value", None)
            if value == self._code("NVML_ERROR_TIMEOUT", _ERROR_TIMEOUT):
                return
            if value == self._code("NVML_ERROR_GPU_IS_LOST", _ERROR_GPU_IS_LOST):
                self.find_lost()
                return
            raise
        kind: FaultKind = "xid"
        if int(data.eventType) & self._code("nvmlEventTypeDoubleBitEccError", _EVENT_DBE):
            kind = "ecc_dbe"
        try:
            uuid = _text(nv.nvmlDeviceGetUUID(data.device))
        except Exception:
            uuid = next((u for u, h in self.handles.items() if h is data.device), "")
        if not uuid:
            return
        xid = int(data.eventData) if kind == "xid" else None
        self.on_fact(GpuFaultFact(uuid=uuid, kind=kind, xid=xid, at=time.time()))

    def find_lost(self) -> None:
        """After ``GPU_IS_LOST``: report each GPU that no longer answers, once."""
        nv = self._nv()
        for uuid, handle in self.handles.items():
            if uuid in self._lost:
                continue
            try:
                nv.nvmlDeviceGetPciInfo(handle)
            except Exception as exc:
                lost = getattr(exc, "value", None) == self._code("NVML_ERROR_GPU_IS_LOST", _ERROR_GPU_IS_LOST)
                self._lost.add(uuid)
                kind: FaultKind = "fell_off_bus" if lost else "handle_lost"
                self.on_fact(GpuFaultFact(uuid=uuid, kind=kind, xid=79 if lost else None, at=time.time()))
        if self._lost and len(self._lost) == len(self.handles):
            self._stop.set()  # nothing left to watch


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
