"""Does the engine really run on its GPUs? The post-launch check, as a pure function.

A first healthy probe says the engine answers; it does not say where the model lives. A CPU-only
build, a driver library missing from the engine's environment or a mask CUDA truncated all give
an engine that answers 200 while the model runs on the CPU. So once the engine reports healthy,
the shell samples the per-process GPU memory (NVML's compute processes, or the simulated
inventory's) and this module judges each sample against the placement:

* the engine's processes (its pid and every member of its process group) hold memory on a GPU
  outside the placement: ``wrong_devices`` at once (it ignored its mask);
* by the deadline they hold nothing on any GPU of the placement: ``cpu_fallback``;
* by the deadline they hold memory on some but not every GPU of the placement: ``wrong_devices``
  (a truncated mask, a tensor split that left a device out);
* by the deadline some GPU holds less than ``min_fraction`` of its planned budget:
  ``under_budget`` (only where the plan has a budget for it);
* otherwise the engine is verified, and what it holds is what the pool holds from then on.

Before the deadline an incomplete sample is ``pending``: engines that allocate late (vLLM's
profiling run, llama.cpp's mmap'd weights paged in) get until the deadline. Time comes in as
``elapsed_s``; the caller records the inputs (:class:`GpuSample`) with the verdict, so a replay
re-judges without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pool_managerd.contract.messages import Placement
from pool_managerd.placement.units import format_bytes

VerifyFailure = Literal["cpu_fallback", "wrong_devices", "under_budget"]
VERIFY_FAILURES: tuple[VerifyFailure, ...] = ("cpu_fallback", "wrong_devices", "under_budget")

DEFAULT_MIN_FRACTION = 0.5
"""An engine must hold at least this share of each GPU's planned budget. Budgets are estimates
(weights share plus context); real engines hold more (CUDA context, vLLM's whole
``gpu_memory_utilization``) or somewhat less (a smaller context than planned), never a small
fraction unless most of the model is elsewhere."""

MAX_SAMPLE_PIDS = 64
"""Most engine pids one sample records (an engine with more processes is recorded truncated)."""


@dataclass(frozen=True, slots=True)
class GpuCheckPolicy:
    """How a pool's engine is verified after launch.

    ``deadline_s`` counts from the first healthy probe; ``min_fraction`` is the share of each
    GPU's budget it must hold by then."""

    deadline_s: float = 10.0
    min_fraction: float = DEFAULT_MIN_FRACTION
    poll_s: float = 0.1


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of what the engine holds: the recorded inputs of a verdict.

    ``held`` maps each GPU UUID where the engine's processes hold memory to the bytes held (the
    sum over those processes); ``pids`` are the engine's processes the sample looked for."""

    held: Mapping[str, int]
    pids: tuple[int, ...]
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """``ok``, ``pending`` or ``failed`` (with ``reason``); ``message`` explains it to a person."""

    status: Literal["ok", "pending", "failed"]
    reason: VerifyFailure | None = None
    message: str = ""
    held: Mapping[str, int] = field(default_factory=dict)


def engine_held(processes: Mapping[str, Iterable[tuple[int, int]]], pids: Iterable[int]) -> dict[str, int]:
    """Bytes the processes ``pids`` hold per GPU, from ``{uuid: [(pid, used_bytes), ...]}``.

    GPUs where they hold nothing are left out."""
    members = frozenset(pids)
    held: dict[str, int] = {}
    for uuid, procs in processes.items():
        total = sum(max(0, used) for pid, used in procs if pid in members)
        if total > 0:
            held[uuid] = total
    return held


def judge(placement: Placement, sample: GpuSample, policy: GpuCheckPolicy) -> Verdict:
    """The verdict on one sample (see the module docstring)."""
    planned = list(placement.uuids)
    held = {uuid: int(b) for uuid, b in sample.held.items() if b > 0}
    late = sample.elapsed_s >= policy.deadline_s
    foreign = sorted(uuid for uuid in held if uuid not in planned)
    if foreign:
        return Verdict("failed", "wrong_devices",
                       f"the engine holds memory on {', '.join(foreign)}, outside its placement "
                       f"({', '.join(planned)}): it did not use the devices it was given", held)  # fmt: skip
    missing = [uuid for uuid in planned if uuid not in held]
    if len(missing) == len(planned):
        if not late:
            return Verdict("pending", message="no GPU memory held yet", held=held)
        return Verdict("failed", "cpu_fallback",
                       f"the engine answers but holds no memory on any of its GPUs "
                       f"({', '.join(planned)}) {policy.deadline_s:g} s after it became healthy: "
                       f"it runs on the CPU (a CPU-only build, no driver library in its environment?)",
                       held)  # fmt: skip
    if missing:
        if not late:
            return Verdict("pending", message=f"nothing held yet on {', '.join(missing)}", held=held)
        return Verdict("failed", "wrong_devices",
                       f"the engine holds memory on {len(planned) - len(missing)} of its {len(planned)} GPUs; "
                       f"nothing on {', '.join(missing)} (a truncated mask? a split that left it out?)",
                       held)  # fmt: skip
    short = []
    for uuid, budget in zip(planned, placement.budgets, strict=False):
        want = int(budget * policy.min_fraction)
        if budget > 0 and held[uuid] < want:
            short.append(f"{uuid} holds {format_bytes(held[uuid])} of {format_bytes(budget)} planned")
    if short:
        if not late:
            return Verdict("pending", message="; ".join(short), held=held)
        return Verdict("failed", "under_budget",
                       f"below {policy.min_fraction:.0%} of the plan by the deadline: {'; '.join(short)} "
                       f"(part of the model on the CPU?)", held)  # fmt: skip
    return Verdict("ok", message=f"holds {', '.join(f'{u}={format_bytes(b)}' for u, b in held.items())}", held=held)
