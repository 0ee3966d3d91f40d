"""The simulated GPU driver: per-process GPU memory and device faults, kept in files.

A simulated inventory (``sim:<profile>`` or a snapshot file) has no driver to ask which process
holds what. This module plays that part under one directory (``<run_dir>/sim-gpu``):

* ``gpus.json``: the UUIDs of the simulated GPUs (written at start, like the device list a
  driver exposes), so a fake engine can pick a device outside its mask on purpose;
* ``procs/<pid>.json``: what process ``pid`` allocated, ``{"pid": N, "alloc": {"GPU-...": bytes}}``,
  written by the process itself (the fake engine's ``--gpu-alloc`` knob) as a CUDA allocation
  would be seen by the driver. A file whose process is gone is dropped, as NVML drops a killed
  process from its list. The daemon never takes an engine's word on the wire: it reads these
  files exactly as it reads NVML's per-process list;
* ``faults.jsonl``: one JSON object per line, ``{"uuid": "GPU-...", "xid": 79}`` or
  ``{"uuid": "GPU-...", "kind": "ecc_dbe"}``: device faults, read by :class:`SimFaultWatcher`
  (:mod:`pool_managerd.adapters.gpu_faults`) as NVML's event set would deliver them.

Every file is bounded in size and parsed defensively: a malformed one is ignored, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import msgspec

from pool_managerd.contract.messages import GpuProcess, GpuSnapshot

SIM_GPU_DIR_ENV = "POOL_MANAGERD_SIM_GPU_DIR"
"""Given to engines on a simulated inventory: where to record their (simulated) allocations."""
SIM_GPU_BUDGETS_ENV = "POOL_MANAGERD_SIM_GPU_BUDGETS"
"""Given to engines on a simulated inventory: the plan's budget per GPU UUID, as JSON (what a
real engine would size from its model and context)."""

MAX_PROC_FILE = 16 * 1024
MAX_PROC_FILES = 4096


def proc_path(root: Path, pid: int) -> Path:
    """Where process ``pid`` records its allocations."""
    return root / "procs" / f"{pid}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SimGpuState:
    """A simulated inventory with what its processes hold: :meth:`snapshot` is the base profile
    with each live process's allocations listed on its GPUs and taken off their free memory."""

    def __init__(self, base: GpuSnapshot, root: Path) -> None:
        self.base = base
        self.root = root
        (root / "procs").mkdir(parents=True, exist_ok=True)
        self._known = {g.uuid for g in base.gpus}
        tmp = root / "gpus.json.tmp"
        tmp.write_text(json.dumps({"uuids": [g.uuid for g in sorted(base.gpus, key=lambda g: g.index)]}))
        tmp.replace(root / "gpus.json")

    @property
    def faults_path(self) -> Path:
        return self.root / "faults.jsonl"

    def processes(self) -> dict[str, list[GpuProcess]]:
        """Live processes' allocations per GPU UUID (files of dead processes are removed)."""
        out: dict[str, list[GpuProcess]] = {}
        try:
            entries = sorted(os.scandir(self.root / "procs"), key=lambda e: e.name)[:MAX_PROC_FILES]
        except OSError:
            return out
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if not (dot and ext == "json" and stem.isdigit()):
                continue
            pid = int(stem)
            if not _alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            alloc = _read_alloc(Path(entry.path), pid)
            for uuid, used in alloc.items():
                if uuid in self._known:
                    out.setdefault(uuid, []).append(GpuProcess(pid=pid, used_memory=used))
        return out

    def snapshot(self) -> GpuSnapshot:
        """The base inventory as the simulated driver sees it now."""
        procs = self.processes()
        if not procs:
            return self.base
        gpus = []
        for gpu in self.base.gpus:
            mine = procs.get(gpu.uuid, [])
            used = sum(p.used_memory for p in mine)
            free = max(0, gpu.memory_free - used)
            gpus.append(msgspec.structs.replace(gpu, processes=[*gpu.processes, *mine], memory_free=free,
                                                memory_used=gpu.memory_used + (gpu.memory_free - free)))  # fmt: skip
        return msgspec.structs.replace(self.base, gpus=gpus)


def _read_alloc(path: Path, pid: int) -> dict[str, int]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PROC_FILE + 1)
    except OSError:
        return {}
    if len(data) > MAX_PROC_FILE:
        return {}
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(doc, dict) or doc.get("pid") != pid or not isinstance(doc.get("alloc"), dict):
        return {}
    out: dict[str, int] = {}
    for uuid, used in doc["alloc"].items():
        if isinstance(uuid, str) and isinstance(used, int) and not isinstance(used, bool) and used > 0:
            out[uuid] = used
    return out
