"""Inputs of the pure lifecycle: pool definitions, the step context, and the planner contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pool_managerd.contract.messages import EngineSpec, GpuSnapshot, Placement, Problem, RejectCode
from pool_managerd.core.gpu_verify import GpuCheckPolicy
from pool_managerd.lifecycle.supervision import RestartPolicy


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
    new_lease_id: str | None = None
    """An unguessable id the shell drew for a lease this step may grant (None: the command id,
    which only pure tests rely on)."""


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


OverrideKind = Literal["int", "float", "bool", "choice"]


@dataclass(frozen=True, slots=True)
class OverrideDecl:
    """One override a pool's configuration declares: its name on the wire, its type and bounds,
    and the engine flag its value follows. A ``bool`` adds the bare flag when true."""

    name: str
    kind: OverrideKind
    flag: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()


DEFAULT_MAX_LEASE_TTL_S = 3600.0


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
    overrides: tuple[OverrideDecl, ...] = ()
    """What a reload may set beyond the model (see :mod:`pool_managerd.core.command_spec`)."""
    models: tuple[str, ...] = ()
    """The models a command may choose; empty: any well-formed one."""
    max_lease_ttl_s: float = DEFAULT_MAX_LEASE_TTL_S
    gpu_check: GpuCheckPolicy | None = None
    """Verify after launch that the engine holds memory on its GPUs (None: readiness is the first
    healthy probe alone, for runtimes that have no per-process GPU memory to read)."""
