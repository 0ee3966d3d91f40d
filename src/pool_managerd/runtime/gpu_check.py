"""The shell side of the post-launch GPU check: sample what the engine holds until it is judged.

The pure verdict is :func:`pool_managerd.core.gpu_verify.judge`; this module reads the GPUs (NVML
or the simulated driver, off the event loop), finds the engine's processes among those holding
memory (its pid, and every process in its process group: vLLM and SGLang allocate in worker
processes), and polls every ``poll_s`` until the verdict is final or the deadline has passed.
The last sample is what the pool records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import GpuSnapshot
from pool_managerd.core.effects import VerifyGpus
from pool_managerd.core.gpu_verify import MAX_SAMPLE_PIDS, GpuSample, engine_held, judge
from pool_managerd.core.inputs import GpuChecked

log = logging.getLogger(__name__)

GpuReader = Callable[[], GpuSnapshot]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def sample_of(
    snapshot: GpuSnapshot | None, pid: int, pgid: int, elapsed_s: float, planned: tuple[str, ...] = ()
) -> GpuSample:
    """What engine ``pid`` (and its process group) holds in ``snapshot`` (None: nothing read).

    The reader lists processes per physical GPU; a placement on a MIG instance (``planned``)
    counts what is held on its parent as held on the instance."""
    if snapshot is None:
        return GpuSample(held={}, pids=(pid,), elapsed_s=elapsed_s)
    seen = {p.pid for gpu in snapshot.gpus for p in gpu.processes}
    members = {pid} | {p for p in seen if p != pid and _pgid(p) == pgid}
    processes = {gpu.uuid: [(p.pid, p.used_memory) for p in gpu.processes] for gpu in snapshot.gpus}
    for gpu in snapshot.gpus:
        instance = next((m.uuid for m in gpu.mig_instances if m.uuid in planned), None)
        if instance is not None:
            processes[instance] = processes.pop(gpu.uuid)
    return GpuSample(held=engine_held(processes, members), pids=tuple(sorted(members))[:MAX_SAMPLE_PIDS],
                     elapsed_s=round(elapsed_s, 3))  # fmt: skip


async def check_engine(
    effect: VerifyGpus,
    read: GpuReader,
    *,
    alive: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> GpuChecked | None:
    """Sample until the verdict on the sample is final; None when the engine went away first."""
    policy = effect.policy
    start = clock()
    source = ""
    while True:
        snapshot: GpuSnapshot | None = None
        try:
            snapshot = await asyncio.to_thread(read)
            source = snapshot.source
        except PoolManagerError as exc:
            # A failed read is a sample of nothing: the deadline turns it into a failed start.
            log.warning("GPU check of engine %d: the GPUs could not be read (%s)", effect.pid, exc.message)
        elapsed = clock() - start
        sample = sample_of(snapshot, effect.pid, effect.pgid, elapsed, tuple(effect.placement.uuids))
        if judge(effect.placement, sample, policy).status != "pending":
            return GpuChecked(effect.pid, sample, source)
        if not alive():
            return None
        await asyncio.sleep(max(0.0, min(policy.poll_s, policy.deadline_s - elapsed)))
