"""Inputs of the pure lifecycle: pool definitions, the step context, and the planner contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pool_managerd.core.gpu_verify import GpuCheckPolicy
from pool_managerd.lifecycle.supervision import RestartPolicy
from pool_managerd.messages import EngineSpec, GpuSnapshot, Placement, Problem, RejectCode


@dataclass(frozen=True, slots=True)
class Context:
    """Everything impure a step may need, passed in by the shell."""

    now: float
    rand: float = 0.5
    command_id: str | None = None
    traceparent: str | None = None
    snapshot: GpuSnapshot | None = None
    host: object | None = None
    """Host facts gathered by the shell (binaries, files, free ports); opaque to the machine."""


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What the planner needs to place (and preflight) one pool's engine."""

    pool: str
    spec: EngineSpec
    mask: str | list[str] | None
    policy: str | None
    snapshot: GpuSnapshot | None
    host: object | None
    definition: PoolDefinition


@dataclass(frozen=True, slots=True)
class PlanRejected:
    """The planner refused: preflight problems or a placement error."""

    code: RejectCode
    message: str
    problems: tuple[Problem, ...] = ()


Planner = Callable[[PlanRequest], Placement | PlanRejected]


@dataclass(frozen=True, slots=True)
class PoolDefinition:
    """A pool as configured: its engine spec and placement/restart preferences."""

    pool: str
    spec: EngineSpec
    device_mask: str | list[str] | None = None
    split_policy: str | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    model_bytes: int | None = None
    context_bytes: int = 0
    headroom_bytes: int = 0
    gpu_check: GpuCheckPolicy | None = None
    """Verify after launch that the engine holds memory on its GPUs (None: readiness is the first
    healthy probe alone, for runtimes that have no per-process GPU memory to read)."""
