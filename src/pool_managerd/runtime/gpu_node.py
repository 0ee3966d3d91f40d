"""The daemon's GPU side, in one place: the inventory source, the simulated driver, device health
and the fault watcher.

* :meth:`GpuNode.snapshot`: NVML read fresh through one reader, or the simulated inventory with
  what its processes hold (:class:`~pool_managerd.adapters.sim_gpus.SimGpuState`), with the
  devices marked unhealthy by faults flagged.
* :meth:`GpuNode.engine_env`: on a simulated inventory, where engines record their simulated
  allocations (and the plan's budgets), so the post-launch check has something to read.
* :meth:`GpuNode.recover`: the device marks rebuilt from this node's ``gpu_fault`` and
  ``gpu_cleared`` events.
* :meth:`GpuNode.start`: the fault watcher thread (NVML's event set, or the simulated driver's
  ``faults.jsonl``) and the :class:`~pool_managerd.runtime.gpu_watch.GpuWatch` consuming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from pool_managerd.adapters.event_log import read_subject_events
from pool_managerd.adapters.gpu_faults import NvmlFaultWatcher, SimFaultWatcher
from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.sim_gpus import SIM_GPU_BUDGETS_ENV, SIM_GPU_DIR_ENV, SimGpuState
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import GpuSnapshot, Placement
from pool_managerd.contract.subjects import Subjects
from pool_managerd.runtime.gpu_watch import GpuHealth, GpuWatch, Publish
from pool_managerd.runtime.pools import PoolRuntime, mark_unhealthy

log = logging.getLogger(__name__)


class GpuNode:
    """Everything GPU of one daemon (see the module docstring)."""

    def __init__(self, source: str, run_dir: Path, *, fixed: GpuSnapshot | None = None) -> None:
        self.source = source
        self.run_dir = run_dir
        self._fixed = fixed
        self._sim: SimGpuState | None = None
        self._nvml: Any = None
        self.health = GpuHealth()
        self.watch: GpuWatch | None = None
        self._watcher: SimFaultWatcher | NvmlFaultWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def sim_dir(self) -> Path:
        return self.run_dir / "sim-gpu"

    @property
    def sim(self) -> SimGpuState | None:
        """The simulated driver, once a simulated inventory has been read."""
        return self._sim

    def _base(self) -> GpuSnapshot | None:
        """The simulated base inventory, or None for NVML."""
        if self._fixed is not None:
            return self._fixed if self._fixed.simulated else None
        if self.source == "nvml":
            return None
        return load_gpu_source(self.source)

    def raw(self) -> GpuSnapshot:
        """The GPUs now, without the health marks. Raises ``PoolManagerError`` subclasses."""
        if self._sim is not None:
            return self._sim.snapshot()
        if self._fixed is not None and not self._fixed.simulated:
            return self._fixed
        base = self._base()
        if base is not None:
            self._sim = SimGpuState(base, self.sim_dir)
            return self._sim.snapshot()
        if self._nvml is None:
            from pool_managerd.adapters.nvml import NvmlReader

            self._nvml = NvmlReader()
        snapshot: GpuSnapshot = self._nvml.snapshot()
        return snapshot

    def snapshot(self) -> GpuSnapshot:
        """The GPUs now, faulted devices flagged ``healthy=False``."""
        return mark_unhealthy(self.raw(), self.health.unhealthy)

    def engine_env(self, placement: Placement) -> dict[str, str]:
        """Environment for an engine on ``placement``: the simulated driver's, when simulated."""
        if self._sim is None:
            return {}
        budgets = dict(zip(placement.uuids, placement.budgets, strict=False))
        return {SIM_GPU_DIR_ENV: str(self.sim_dir), SIM_GPU_BUDGETS_ENV: json.dumps(budgets)}

    async def recover(self, js: Any, subjects: Subjects, node: str) -> None:
        """Rebuild the device marks from this node's fault events (best effort: logged)."""
        try:
            for _seq, event in await read_subject_events(
                js, [subjects.node_event(node, "gpu_fault"), subjects.node_event(node, "gpu_cleared")]
            ):
                self.health.apply(event.body)
        except Exception as exc:
            log.error("GPU fault history not read (%s: %s); devices start healthy", type(exc).__name__, exc)
        if self.health.unhealthy:
            log.warning("GPUs still unhealthy from earlier faults: %s", ", ".join(sorted(self.health.unhealthy)))

    def start(self, runtime: PoolRuntime, publish: Publish, *, simulated: bool, nvml_module: Any = None) -> None:
        """Start watching for faults. Without NVML's event API (or pynvml) only logged."""
        self.watch = GpuWatch(runtime, publish, self.health, simulated=simulated)
        self._task = asyncio.get_running_loop().create_task(self.watch.run(), name="gpu-faults")
        if self._sim is not None:
            self._watcher = SimFaultWatcher(self._sim.faults_path, self.watch.report)
        elif self.source == "nvml" and self._fixed is None:
            self._watcher = NvmlFaultWatcher(self.watch.report, module=nvml_module)
        if self._watcher is not None:
            self._watcher.start()

    async def stop_watching(self) -> None:
        """Stop the fault watcher and the loop task consuming it (shutdown, before the pools stop)."""
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
            self._watcher = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def close(self) -> None:
        """Shut the NVML reader down (the last step of shutdown)."""
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.close()
            self._nvml = None

    async def clear(self, uuid: str) -> bool:
        """``ctl gpu-clear``: False when ``uuid`` was not marked unhealthy."""
        if self.watch is None:
            raise PoolManagerError("the GPU watch is not running")
        return await self.watch.clear(uuid)
