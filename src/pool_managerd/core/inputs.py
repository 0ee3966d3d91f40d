"""What reaches a pool: one typed value per kind of input, applied by :meth:`PoolMachine.step`.

The shell never hands the core a closure: every command, probe result, timer, engine fact and
recovery step is one of these values, so what a pool was asked to do can be logged, queued with
a bound and followed from the wire to the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pool_managerd.contract.messages import EngineInfo, HealthReport, PoolCommand
from pool_managerd.core.effects import TimerName
from pool_managerd.core.gpu_verify import GpuSample

if TYPE_CHECKING:
    from pool_managerd.core.state import PoolValue


@dataclass(frozen=True, slots=True)
class CommandInput:
    """A client's (or the daemon's own) pool command."""

    cmd: PoolCommand
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class HealthInput:
    """One health report of the pool's engine."""

    report: HealthReport


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer armed by ``ArmTimer`` fired (stale tokens are ignored)."""

    name: TimerName
    token: int


@dataclass(frozen=True, slots=True)
class EngineStarted:
    """The shell forked the engine that ``SpawnEngine`` number ``attempt`` asked for (held at its
    gate, recorded)."""

    info: EngineInfo
    cuda_visible_devices: str
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    """The shell could not start the engine of spawn ``attempt``."""

    error: str
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class EngineExitedInput:
    """An engine process ended (observed by waiting on it)."""

    pid: int
    exit_code: int | None
    signal: int | None


@dataclass(frozen=True, slots=True)
class EngineAdoptedInput:
    """After a daemon restart the engine the log names was found alive and taken over."""

    info: EngineInfo


@dataclass(frozen=True, slots=True)
class RestoreInput:
    """Put the pool back where its event log left it (daemon recovery): the fold of its events."""

    value: PoolValue


@dataclass(frozen=True, slots=True)
class RemoveInput:
    """The configuration dropped the pool: take it towards ``unready`` (drain if it serves)."""

    drain_s: float


@dataclass(frozen=True, slots=True)
class GpuChecked:
    """The shell's sample of the GPU memory engine ``pid`` holds (``VerifyGpus``), final: the
    verdict on it is no longer pending, or the deadline has passed. ``source`` names the
    inventory it was read from."""

    pid: int
    sample: GpuSample
    source: str = ""


@dataclass(frozen=True, slots=True)
class ExpireLeases:
    """Drop expired leases now."""


@dataclass(frozen=True, slots=True)
class ClaimInput:
    """This node won the pool's ownership lease at ``epoch``, taking it from ``previous_node``
    (None: nobody held it; this node's own id: its own earlier life)."""

    epoch: int
    previous_node: str | None
    previous_epoch: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseInput:
    """This node gives the pool's ownership lease up (a graceful stop)."""


PoolInput = (
    CommandInput
    | HealthInput
    | TimerFired
    | EngineStarted
    | SpawnFailed
    | EngineExitedInput
    | EngineAdoptedInput
    | RestoreInput
    | RemoveInput
    | ExpireLeases
    | ClaimInput
    | ReleaseInput
    | GpuChecked
)


def label(inp: PoolInput) -> str:
    """A short, bounded name of an input (logs, the ``internal_error`` event)."""
    if isinstance(inp, CommandInput):
        return str(inp.cmd.__struct_config__.tag)
    if isinstance(inp, TimerFired):
        return inp.name
    names: dict[type, str] = {
        HealthInput: "health",
        EngineStarted: "engine_spawned",
        SpawnFailed: "spawn_failed",
        EngineExitedInput: "engine_exited",
        EngineAdoptedInput: "engine_adopted",
        RestoreInput: "restore",
        RemoveInput: "remove",
        ExpireLeases: "expire_leases",
        ClaimInput: "claim",
        ReleaseInput: "release_ownership",
        GpuChecked: "gpu_checked",
    }
    return names.get(type(inp), "unknown")
