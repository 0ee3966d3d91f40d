"""Preload policy: the ready gate and the load timeout. Pure.

A pool is never ``ready`` before a successful health probe of the engine it runs; a pool that
is not ready within the spec's load timeout has failed its preload.
"""

from __future__ import annotations

from pool_managerd.messages import EngineSpec


def ready_gate(*, probe_ok: bool, probe_pid: int | None, engine_pid: int | None) -> bool:
    """True when a probe result may make the pool ready: it is a 200 from the current engine."""
    if not probe_ok or engine_pid is None:
        return False
    return probe_pid is None or probe_pid == engine_pid


def load_deadline(spec: EngineSpec, started_at: float) -> float:
    """The instant a preload that began at ``started_at`` times out."""
    return started_at + spec.load_timeout_s


def timeout_reason(spec: EngineSpec) -> str:
    return f"load timeout: not ready within {spec.load_timeout_s:g} s"
