"""Effects: what the pure lifecycle asks the shell to do. The machine never does I/O itself.

The shell publishes a step's events first (they are the source of truth), then runs its
effects in order. Results of effects come back as facts (``engine_spawned``,
``engine_exited``, ``timer_fired``, health reports), which the machine turns into triggers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pool_managerd.contract.messages import EngineSpec, Placement
from pool_managerd.core.gpu_verify import GpuCheckPolicy

TimerName = Literal["load_timeout", "backoff", "drain_deadline", "lease_expiry"]


@dataclass(frozen=True, slots=True)
class SpawnEngine:
    """Start the engine for ``spec`` on ``placement``; report back ``engine_spawned`` or
    ``spawn_failed``, then ``engine_exited`` when it ends."""

    spec: EngineSpec
    placement: Placement
    attempt: int


@dataclass(frozen=True, slots=True)
class ReleaseEngine:
    """Let the engine ``pid`` run. The shell forks an engine held at a gate and writes its spawn
    record before reporting ``engine_spawned``; the machine releases it only once the event that
    names it is in the log, so a crash at any instant leaves no engine the record and the log do
    not know."""

    pid: int


@dataclass(frozen=True, slots=True)
class StopEngine:
    """Stop one engine: SIGTERM to its process group, SIGKILL after ``grace_s``."""

    pid: int
    pgid: int
    grace_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Fire ``timer_fired(name, token)`` after ``delay_s``; re-arming a name replaces it."""

    name: TimerName
    delay_s: float
    token: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: TimerName


@dataclass(frozen=True, slots=True)
class VerifyGpus:
    """Sample the GPU memory the engine ``pid`` (and its process group ``pgid``) holds until
    :func:`~pool_managerd.core.gpu_verify.judge` gives a verdict or the deadline passes; report
    the last sample back as ``GpuChecked``."""

    pid: int
    pgid: int
    placement: Placement
    policy: GpuCheckPolicy


Effect = SpawnEngine | ReleaseEngine | StopEngine | ArmTimer | CancelTimer | VerifyGpus
