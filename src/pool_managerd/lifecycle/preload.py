"""Preload policy: the ready gate and the load timeout. Pure.

A pool is never ``ready`` before a successful health probe of the engine it runs; a pool that
is not ready within the spec's load timeout has failed its preload.
"""

from __future__ import annotations

from pool_managerd.contract.messages import EngineSpec, Placement, RejectCode
from pool_managerd.core.definitions import PlanRejected, PlanRequest
from pool_managerd.placement.devicemasks import MASK_ERROR_CODES, MaskError
from pool_managerd.placement.hetero_split import PLAN_ERROR_CODES, PlanError
from pool_managerd.placement.place import place
from pool_managerd.validation.preflight import HostFacts, PreflightSpec, preflight


def ready_gate(*, probe_ok: bool, probe_pid: int | None, engine_pid: int | None) -> bool:
    """True when a probe result may make the pool ready: it is a 200 from the current engine."""
    if not probe_ok or engine_pid is None:
        return False
    return probe_pid is None or probe_pid == engine_pid


def timeout_reason(spec: EngineSpec) -> str:
    return f"load timeout: not ready within {spec.load_timeout_s:g} s"


_PLACEMENT_CODES = frozenset(MASK_ERROR_CODES) | frozenset(PLAN_ERROR_CODES)


def model_path(spec: EngineSpec) -> str | None:
    """The model as a local path, or None when the engine fetches it by name (a hub id).

    Only values that look like paths (absolute, ``./``, ``../`` or ``~``) are checked as files:
    ``meta-llama/Llama-3-8B`` is a hub id for vLLM, not a relative path.
    """
    m = spec.model
    return m if m.startswith(("/", "./", "../", "~")) else None


def plan_preload(request: PlanRequest) -> Placement | PlanRejected:
    """The planner the lifecycle machine calls at preload, reload and every restart: preflight
    (GPU-only, engine binary, model file, digest, port, compute capability, MIG, VRAM), then
    placement. Pure: the snapshot and host facts come in the request."""
    spec = request.spec
    definition = request.definition
    host = request.host if isinstance(request.host, HostFacts) else HostFacts()
    mask = request.mask
    policy = request.policy or definition.split_policy or "free"
    pf = PreflightSpec(
        engine_binary=spec.argv[0] if spec.argv else "",
        model_path=model_path(spec),
        expected_digest=spec.model_digest,
        min_compute_capability=spec.min_compute_capability,
        port=spec.port,
        model_bytes=definition.model_bytes,
        context_bytes=definition.context_bytes,
        headroom=definition.headroom_bytes,
        policy=policy,
        mask=mask if isinstance(mask, str) or mask is None else tuple(mask),
    )
    problems = preflight(pf, request.snapshot, host)
    if problems:
        placement_only = all(p.code in _PLACEMENT_CODES for p in problems)
        code: RejectCode = "placement_failed" if placement_only else "preflight_failed"
        return PlanRejected(code, "; ".join(p.message for p in problems), tuple(problems))
    assert request.snapshot is not None  # preflight refuses without one (GPU-only)
    model_file = host.files.get(pf.model_path) if pf.model_path else None
    model_bytes = (
        definition.model_bytes if definition.model_bytes is not None else (model_file.size or 0 if model_file else 0)
    )
    try:
        return place(mask, request.snapshot, model_bytes, definition.context_bytes, policy, definition.headroom_bytes)
    except MaskError as exc:
        return PlanRejected("placement_failed", exc.message, (exc.to_problem(),))
    except PlanError as exc:
        return PlanRejected("placement_failed", exc.message, tuple(exc.to_problems()))
