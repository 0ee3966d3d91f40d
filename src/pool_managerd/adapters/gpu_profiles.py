"""Where a GPU snapshot comes from: a shipped simulated profile, a JSON file, or NVML.

``load_gpu_source("sim:hetero-24g-48g")``, ``load_gpu_source("/path/inventory.json")`` or
``load_gpu_source("nvml")``. Profiles and files hold a ``GpuSnapshot`` as JSON (the
``gpu_snapshot`` schema). Anything not read live from NVML is marked ``simulated=True`` whatever
the file says: a recorded inventory is not this host's GPUs now, and every snapshot and event
derived from it must say so.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import GPU_SNAPSHOT_DECODER, GpuSnapshot

SIM_PREFIX = "sim:"
_PROFILE_PACKAGE = "pool_managerd.adapters"
_PROFILE_DIR = "gpu_profile_data"
"""The shipped profiles: package data beside this module, their one reader."""


class GpuSourceError(PoolManagerError):
    """A GPU source spec that names nothing loadable. ``code``: ``unknown_gpu_profile`` or
    ``bad_gpu_source``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def list_profiles() -> list[str]:
    """Names of the shipped simulated profiles, sorted (use as ``sim:<name>``)."""
    folder = resources.files(_PROFILE_PACKAGE).joinpath(_PROFILE_DIR)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def _decode(data: bytes, where: str) -> GpuSnapshot:
    try:
        snap = GPU_SNAPSHOT_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise GpuSourceError("bad_gpu_source", f"{where} is not a GPU snapshot: {exc}") from None
    seen: set[str] = set()
    for gpu in snap.gpus:
        for uuid in (gpu.uuid, *(m.uuid for m in gpu.mig_instances)):
            if uuid in seen:
                raise GpuSourceError("bad_gpu_source", f"{where}: UUID {uuid} appears twice")
            seen.add(uuid)
    return snap


def load_profile(name: str) -> GpuSnapshot:
    """A shipped profile by name; raises ``unknown_gpu_profile`` listing the known ones."""
    known = list_profiles()
    if name not in known:
        raise GpuSourceError(
            "unknown_gpu_profile",
            f"unknown GPU profile {name!r}; known profiles: {', '.join('sim:' + k for k in known)}",
        )
    data = resources.files(_PROFILE_PACKAGE).joinpath(_PROFILE_DIR, f"{name}.json").read_bytes()
    snap = _decode(data, f"profile {name!r}")
    return msgspec.structs.replace(snap, simulated=True, source=f"{SIM_PREFIX}{name}")


def load_gpu_source(
    spec: str,
    *,
    nvml_module: Any | None = None,
    clock: Callable[[], float] | None = None,
) -> GpuSnapshot:
    """``sim:<profile>``, a JSON file path, or ``nvml`` → a ``GpuSnapshot``.

    Raises :class:`GpuSourceError` for unknown profiles and unreadable or malformed files, and
    ``adapters.nvml.GpuUnavailable`` when NVML cannot be read (``nvml_module`` replaces the
    ``pynvml`` module, for tests).
    """
    if spec == "nvml":
        from pool_managerd.adapters.nvml import read_nvml_snapshot

        return read_nvml_snapshot(nvml_module) if clock is None else read_nvml_snapshot(nvml_module, clock)
    if spec.startswith(SIM_PREFIX):
        return load_profile(spec[len(SIM_PREFIX) :])
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as exc:
        known = ", ".join("sim:" + k for k in list_profiles())
        raise GpuSourceError(
            "bad_gpu_source",
            f"cannot read GPU source {spec!r} ({exc.strerror or exc}); use nvml, a JSON file, or one of {known}",
        ) from None
    snap = _decode(data, f"file {spec!r}")
    return msgspec.structs.replace(snap, simulated=True, source=str(path))
