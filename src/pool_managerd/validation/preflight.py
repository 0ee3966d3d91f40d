"""Preflight: every reason a preload cannot go ahead, found before anything is spawned. Pure.

The shell gathers facts (``adapters.host_facts.gather_host_facts``, ``adapters.nvml``) and passes
them in; this module only judges them. It returns *all* problems at once so an operator fixes
everything in one go; an empty list means go.

GPU-only: without a usable GPU snapshot the answer is ``gpu_unavailable`` (message starting
``"GPU-only enforcement:"``). There is no CPU fallback, ever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pool_managerd.contract.messages import GpuSnapshot, Placement, Problem
from pool_managerd.placement.devicemasks import Device, MaskError, snapshot_devices
from pool_managerd.placement.hetero_split import PlanError, Policy
from pool_managerd.placement.place import place
from pool_managerd.placement.units import format_bytes

PREFLIGHT_CODES: tuple[str, ...] = (
    "gpu_unavailable",
    "compute_capability_too_low",
    "mig_mismatch",
    "insufficient_vram",
    "engine_missing",
    "engine_not_executable",
    "model_missing",
    "model_unreadable",
    "digest_mismatch",
    "digest_unverified",
    "port_in_use",
)
"""Codes preflight itself produces. Placement problems keep their own codes (``MaskError`` /
``PlanError``: ``unknown_device``, ``duplicate_device``, ``insufficient_vram``, ...)."""

GPU_ONLY_PREFIX = "GPU-only enforcement:"


@dataclass(frozen=True, slots=True)
class ExecutableFact:
    """What the shell found for an executable name or path."""

    path: str | None
    """Resolved absolute path; None when nothing by that name exists."""
    executable: bool = False


@dataclass(frozen=True, slots=True)
class FileFact:
    """What the shell found at a path."""

    exists: bool
    readable: bool = False
    size: int | None = None
    sha256: str | None = None
    """Hex digest; None when not hashed (not asked for, unreadable, or over the size cap)."""
    is_dir: bool = False


@dataclass(frozen=True, slots=True)
class HostFacts:
    """Facts about the host, gathered by the shell right before preflight."""

    executables: Mapping[str, ExecutableFact] = field(default_factory=dict)
    """Keyed by the name or path as the engine spec gives it (argv[0])."""
    files: Mapping[str, FileFact] = field(default_factory=dict)
    """Keyed by the path as the spec gives it."""
    free_ports: frozenset[int] = frozenset()
    """Ports a bind succeeded on; a port not listed counts as taken."""
    gpu_problem: Problem | None = None
    """Why there is no snapshot (from ``adapters.nvml.GpuUnavailable``), to explain the refusal."""


@dataclass(frozen=True, slots=True)
class PreflightSpec:
    """What a preload wants, as far as preflight can check it."""

    engine_binary: str
    """argv[0] of the engine command."""
    model_path: str | None = None
    """A local file or directory; None when the engine fetches the model itself."""
    model_digest: str | None = None
    """A known digest of the model (e.g. from a cache); else the host facts' sha256 is used."""
    expected_digest: str | None = None
    """The digest the model must have (``sha256:<hex>`` or bare hex)."""
    min_compute_capability: tuple[int, int] | None = None
    require_mig: bool | None = None
    """True: MIG instances only; False: whole GPUs only; None: either."""
    port: int | None = None
    model_bytes: int | None = None
    """Bytes of weights to place; None: the model file's size (0 if unknown)."""
    context_bytes: int = 0
    headroom: int = 0
    policy: str | tuple[float, ...] | Policy = "free"
    mask: str | tuple[str, ...] | None = None
    """Device mask; None or ``"auto"`` lets placement choose."""
    placement: Placement | None = None
    """A placement already chosen; when given it is checked as is instead of re-planned."""


def _norm_digest(d: str) -> str:
    d = d.strip().lower()
    return d[len("sha256:") :] if d.startswith("sha256:") else d


def _gpu_checks(spec: PreflightSpec, snapshot: GpuSnapshot, model_bytes: int) -> list[Problem]:
    problems: list[Problem] = []
    by_uuid: dict[str, Device] = {d.uuid: d for d in snapshot_devices(snapshot)}
    chosen: list[Device] = []

    if spec.placement is not None:
        for uuid in spec.placement.uuids:
            dev = by_uuid.get(uuid)
            if dev is None:
                problems.append(
                    Problem(
                        code="unknown_device",
                        message=f"placement names {uuid}, which is not in the current GPU snapshot",
                        device=uuid,
                    )
                )
            else:
                chosen.append(dev)
        budgets = spec.placement.budgets
        for i, dev in enumerate(chosen):
            if i < len(budgets) and budgets[i] + spec.headroom > dev.memory_free:
                problems.append(
                    Problem(
                        code="insufficient_vram",
                        message=(
                            f"{dev.label} ({dev.uuid}) needs {budgets[i]} B + headroom "
                            f"{spec.headroom} B but has {dev.memory_free} B free "
                            f"({format_bytes(budgets[i] + spec.headroom)} > "
                            f"{format_bytes(dev.memory_free)})"
                        ),
                        device=dev.uuid,
                    )
                )
    else:
        try:
            placed = place(
                spec.mask,
                snapshot,
                model_bytes,
                spec.context_bytes,
                spec.policy,
                spec.headroom,
            )
        except MaskError as exc:
            problems.append(exc.to_problem())
        except PlanError as exc:
            problems.extend(exc.to_problems())
        else:
            chosen = [by_uuid[u] for u in placed.uuids]

    if spec.min_compute_capability is not None:
        need = spec.min_compute_capability
        for dev in chosen:
            if dev.compute_capability < need:
                problems.append(
                    Problem(
                        code="compute_capability_too_low",
                        message=(
                            f"{dev.label} ({dev.name}) has compute capability "
                            f"{dev.compute_capability[0]}.{dev.compute_capability[1]}; the engine "
                            f"needs at least {need[0]}.{need[1]}"
                        ),
                        device=dev.uuid,
                    )
                )
    if spec.require_mig is not None:
        for dev in chosen:
            is_mig = dev.kind == "mig"
            if is_mig != spec.require_mig:
                want = "a MIG instance" if spec.require_mig else "a whole GPU (MIG instances not allowed)"
                have = "a MIG instance" if is_mig else "a whole GPU"
                problems.append(
                    Problem(
                        code="mig_mismatch",
                        message=f"{dev.label} is {have}; the pool requires {want}",
                        device=dev.uuid,
                    )
                )
    return problems


def preflight(spec: PreflightSpec, snapshot: GpuSnapshot | None, host: HostFacts) -> list[Problem]:
    """Every problem that stops ``spec`` from starting on this host now; ``[]`` means go.

    Order is stable: GPU availability, engine binary, model file, digest, port, then placement
    (mask/plan codes), compute capability, MIG mode, VRAM. GPU-dependent checks are skipped when
    there is no usable GPU (the ``gpu_unavailable`` problem says so).
    """
    problems: list[Problem] = []

    gpu_ok = snapshot is not None and len(snapshot.gpus) > 0
    if not gpu_ok:
        if snapshot is None:
            why = "no GPU snapshot could be taken"
            if host.gpu_problem is not None:
                why += f" ({host.gpu_problem.code}: {host.gpu_problem.message})"
        else:
            why = f"the GPU snapshot from {snapshot.source} lists no NVIDIA GPU"
        problems.append(
            Problem(
                code="gpu_unavailable",
                message=f"{GPU_ONLY_PREFIX} {why}; engines never fall back to CPU, preload refused",
            )
        )

    exe = host.executables.get(spec.engine_binary)
    if exe is None or exe.path is None:
        problems.append(
            Problem(
                code="engine_missing",
                message=f"engine binary {spec.engine_binary!r} not found (not a file, not on PATH)",
            )
        )
    elif not exe.executable:
        problems.append(
            Problem(
                code="engine_not_executable",
                message=f"engine binary {spec.engine_binary!r} at {exe.path} is not executable",
            )
        )

    model_size: int | None = None
    model_usable = spec.model_path is None
    hashed: str | None = None
    if spec.model_path is not None:
        fact = host.files.get(spec.model_path)
        if fact is None or not fact.exists:
            problems.append(Problem(code="model_missing", message=f"model {spec.model_path!r} does not exist"))
        elif not fact.readable:
            problems.append(
                Problem(
                    code="model_unreadable",
                    message=f"model {spec.model_path!r} exists but this daemon cannot read it",
                )
            )
        else:
            model_usable = True
            model_size = fact.size
            hashed = fact.sha256

    # A missing or unreadable model already has its problem; a digest verdict would add noise.
    if spec.expected_digest is not None and model_usable:
        actual = spec.model_digest if spec.model_digest is not None else hashed
        what = f"model {spec.model_path!r}" if spec.model_path is not None else "model"
        if actual is None:
            problems.append(
                Problem(
                    code="digest_unverified",
                    message=(
                        f"{what} should have digest {spec.expected_digest} but no digest is known "
                        "(not hashed: a directory, or over the hashing size cap)"
                    ),
                )
            )
        elif _norm_digest(actual) != _norm_digest(spec.expected_digest):
            problems.append(
                Problem(
                    code="digest_mismatch",
                    message=(f"{what} has digest sha256:{_norm_digest(actual)}, expected {spec.expected_digest}"),
                )
            )

    if spec.port is not None and spec.port not in host.free_ports:
        problems.append(
            Problem(
                code="port_in_use",
                message=f"port {spec.port} is not free (bind failed, or it was not checked)",
            )
        )

    if gpu_ok:
        assert snapshot is not None
        model_bytes = spec.model_bytes if spec.model_bytes is not None else (model_size or 0)
        problems.extend(_gpu_checks(spec, snapshot, model_bytes))
    return problems


def problem_codes(problems: Sequence[Problem]) -> list[str]:
    """The codes of ``problems``, in order (handy for rejection summaries and tests)."""
    return [p.code for p in problems]
