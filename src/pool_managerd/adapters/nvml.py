"""NVML adapter: the live GPU inventory as a ``GpuSnapshot``, or a typed reason why not.

Uses the ``pynvml`` module of the ``nvidia-ml-py`` distribution, imported lazily so the package
works without it (the ``pynvml`` distribution is deprecated). Facts this module is built on,
recorded on an H200 (driver 580.159.04):

* ``nvmlInit`` costs ~11 ms, per-device calls 1-9 µs: initialise once, poll freely.
* v1 memory ``used`` includes ~615 MiB reserved by the driver; v2 reports it as ``reserved``.
  v2 is used when the library has it.
* NVML's PCI bus id is ``00000000:00:06.0``; CUDA's is ``0000:00:06.0``. Snapshots carry CUDA's.
* NVML ignores ``CUDA_VISIBLE_DEVICES``; its index is not the CUDA ordinal. Key by UUID.

Failures never crash the caller: they raise :class:`GpuUnavailable`, which carries a wire
``Problem`` with code ``nvml_module_missing``, ``nvml_library_not_found``,
``nvml_driver_not_loaded``, ``nvml_no_permission`` or ``nvml_error``.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import Gpu, GpuProcess, GpuSnapshot, MigInstance, Problem

NVML_PROBLEM_CODES: tuple[str, ...] = (
    "nvml_module_missing",
    "nvml_library_not_found",
    "nvml_driver_not_loaded",
    "nvml_no_permission",
    "nvml_error",
)

# NVML return codes (nvml.h); read from the module when it has them, these are the fallbacks.
_NVML_ERROR_NOT_SUPPORTED = 3
_NVML_ERROR_NO_PERMISSION = 4
_NVML_ERROR_NOT_FOUND = 6
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_FUNCTION_NOT_FOUND = 13
_NVML_DEVICE_MIG_ENABLE = 1


class GpuUnavailable(PoolManagerError):
    """No GPU snapshot could be taken. ``problem`` says why, with a specific ``nvml_*`` code."""

    code = "gpu_unavailable"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def normalize_pci_bus_id(bus_id: str | bytes) -> str:
    """NVML's ``00000000:00:06.0`` → CUDA's ``0000:00:06.0`` (lower case, 4-digit domain).

    Already-normalised ids pass through; anything unparseable is only lower-cased.
    """
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    text = text.strip().lower()
    try:
        domain, bus, devfn = text.split(":")
        dev, fn = devfn.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{int(fn, 16):x}"
    except ValueError:
        return text


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


class NvmlReader:
    """Takes GPU snapshots through NVML, initialising the library once.

    ``module`` is a pynvml-compatible module (tests pass a stand-in); by default ``pynvml`` is
    imported on first use. ``clock`` stamps ``taken_at``. Use as a context manager, or call
    :meth:`close` to shut NVML down.
    """

    def __init__(self, module: Any | None = None, clock: Callable[[], float] = time.time) -> None:
        self._module = module
        self._clock = clock
        self._initialised = False

    # -- error mapping ---------------------------------------------------------------------

    def _code(self, name: str, fallback: int) -> int:
        value = getattr(self._module, name, fallback)
        return value if isinstance(value, int) else fallback

    def _is_nvml_error(self, exc: BaseException) -> bool:
        base = getattr(self._module, "NVMLError", None)
        return isinstance(base, type) and isinstance(exc, base)

    def _err_value(self, exc: BaseException) -> int | None:
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None

    def _problem(self, exc: BaseException, doing: str, device: str | None = None) -> GpuUnavailable:
        value = self._err_value(exc)
        if value == self._code("NVML_ERROR_LIBRARY_NOT_FOUND", _NVML_ERROR_LIBRARY_NOT_FOUND):
            code, hint = "nvml_library_not_found", "libnvidia-ml.so.1 not found: is the NVIDIA driver installed?"
        elif value == self._code("NVML_ERROR_DRIVER_NOT_LOADED", _NVML_ERROR_DRIVER_NOT_LOADED):
            code, hint = "nvml_driver_not_loaded", "the NVIDIA kernel driver is not loaded"
        elif value == self._code("NVML_ERROR_NO_PERMISSION", _NVML_ERROR_NO_PERMISSION):
            code, hint = "nvml_no_permission", "no permission to query the GPUs (device nodes, cgroup?)"
        else:
            code, hint = "nvml_error", f"{type(exc).__name__}"
        return GpuUnavailable(Problem(code=code, message=f"NVML {doing} failed: {hint} ({exc})", device=device))

    def _optional(self, exc: BaseException) -> bool:
        """Errors that mean 'this GPU does not have that feature', not 'NVML is broken'."""
        return self._is_nvml_error(exc) and self._err_value(exc) in (
            self._code("NVML_ERROR_NOT_SUPPORTED", _NVML_ERROR_NOT_SUPPORTED),
            self._code("NVML_ERROR_FUNCTION_NOT_FOUND", _NVML_ERROR_FUNCTION_NOT_FOUND),
            self._code("NVML_ERROR_NOT_FOUND", _NVML_ERROR_NOT_FOUND),
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def _nv(self) -> Any:
        """The loaded module (only used after :meth:`open` succeeded)."""
        return self._module

    def _load(self) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError as exc:
                raise GpuUnavailable(
                    Problem(
                        code="nvml_module_missing",
                        message=(
                            f"the pynvml module is not installed ({exc}); install the "
                            "nvidia-ml-py distribution (pip install 'pool-managerd[gpu]')"
                        ),
                    )
                ) from None
        return self._module

    def open(self) -> None:
        """Initialise NVML if not done yet. Raises :class:`GpuUnavailable`."""
        nv = self._load()
        if self._initialised:
            return
        try:
            nv.nvmlInit()
        except Exception as exc:
            if self._is_nvml_error(exc):
                raise self._problem(exc, "init") from None
            raise GpuUnavailable(
                Problem(code="nvml_error", message=f"NVML init failed: {type(exc).__name__}: {exc}")
            ) from None
        self._initialised = True

    def close(self) -> None:
        """Shut NVML down (errors ignored: there is nothing useful to do about them)."""
        if self._initialised and self._module is not None:
            self._initialised = False
            with contextlib.suppress(Exception):
                self._module.nvmlShutdown()

    def __enter__(self) -> NvmlReader:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def _memory(self, handle: Any) -> tuple[int, int, int, int]:
        """(total, free, used, reserved), v2 when available."""
        nv = self._nv
        v2 = getattr(nv, "nvmlMemory_v2", None)
        if v2 is not None:
            try:
                m = nv.nvmlDeviceGetMemoryInfo(handle, version=v2)
                return int(m.total), int(m.free), int(m.used), int(getattr(m, "reserved", 0))
            except Exception as exc:
                # Older drivers lack nvmlDeviceGetMemoryInfo_v2; anything else is a real failure.
                if not self._optional(exc):
                    raise
        m = nv.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), int(m.free), int(m.used), 0

    def _mig_mode(self, handle: Any) -> bool:
        try:
            current, _pending = self._nv.nvmlDeviceGetMigMode(handle)
        except Exception as exc:
            if self._optional(exc):
                return False
            raise
        return int(current) == self._code("NVML_DEVICE_MIG_ENABLE", _NVML_DEVICE_MIG_ENABLE)

    def _processes(self, handle: Any) -> list[GpuProcess]:
        try:
            procs = self._nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception as exc:
            if self._optional(exc):
                return []
            raise
        out: list[GpuProcess] = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            # NVML reports "not available" (None in pynvml) inside some containers.
            out.append(GpuProcess(pid=int(p.pid), used_memory=int(used) if used is not None else 0))
        return out

    def _mig_instances(self, handle: Any, parent_uuid: str) -> list[MigInstance]:
        nv = self._nv
        count = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
        out: list[MigInstance] = []
        for i in range(count):
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
            except Exception as exc:
                if self._optional(exc):
                    continue  # an empty slot
                raise
            name = _text(nv.nvmlDeviceGetName(mig))
            total, free, used, _reserved = self._memory(mig)
            out.append(
                MigInstance(
                    uuid=_text(nv.nvmlDeviceGetUUID(mig)),
                    parent_uuid=parent_uuid,
                    index=i,
                    # "NVIDIA A100-SXM4-80GB MIG 3g.40gb" → "3g.40gb"
                    profile=name.rsplit("MIG ", 1)[-1] if "MIG " in name else name,
                    memory_total=total,
                    memory_free=free,
                    memory_used=used,
                )
            )
        return out

    def _gpu(self, index: int) -> Gpu:
        nv = self._nv
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nv.nvmlDeviceGetUUID(handle))
        total, free, used, reserved = self._memory(handle)
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
        mig_mode = self._mig_mode(handle)
        return Gpu(
            index=index,
            uuid=uuid,
            name=_text(nv.nvmlDeviceGetName(handle)),
            pci_bus_id=normalize_pci_bus_id(nv.nvmlDeviceGetPciInfo(handle).busId),
            compute_capability=(int(major), int(minor)),
            memory_total=total,
            memory_free=free,
            memory_used=used,
            memory_reserved=reserved,
            mig_mode=mig_mode,
            mig_instances=self._mig_instances(handle, uuid) if mig_mode else [],
            processes=self._processes(handle),
        )

    def snapshot(self) -> GpuSnapshot:
        """The GPUs now. Initialises NVML on first use. Raises :class:`GpuUnavailable`."""
        self.open()
        nv = self._nv
        step = "query"
        index: int | None = None
        try:
            step = "driver version"
            driver = _text(nv.nvmlSystemGetDriverVersion())
            cuda: str | None
            try:
                cuda = _cuda_version(int(nv.nvmlSystemGetCudaDriverVersion()))
            except Exception as exc:
                if not self._optional(exc):
                    raise
                cuda = None
            step = "device count"
            count = int(nv.nvmlDeviceGetCount())
            gpus: list[Gpu] = []
            for index in range(count):
                step = f"query of GPU {index}"
                gpus.append(self._gpu(index))
        except GpuUnavailable:
            raise
        except Exception as exc:
            device = f"index {index}" if index is not None else None
            if self._is_nvml_error(exc):
                raise self._problem(exc, step, device) from None
            raise GpuUnavailable(
                Problem(
                    code="nvml_error",
                    message=f"NVML {step} failed: {type(exc).__name__}: {exc}",
                    device=device,
                )
            ) from None
        return GpuSnapshot(
            simulated=False,
            source="nvml",
            taken_at=self._clock(),
            driver_version=driver,
            cuda_driver_version=cuda,
            gpus=gpus,
        )


def read_nvml_snapshot(module: Any | None = None, clock: Callable[[], float] = time.time) -> GpuSnapshot:
    """One-shot snapshot: init, read, shut down. Long-lived callers keep an :class:`NvmlReader`."""
    with NvmlReader(module, clock) as reader:
        return reader.snapshot()
