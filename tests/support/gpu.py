"""GPU test helpers: where the recorded fixtures live, and a pynvml stand-in that replays them.

Tests import it as ``support.gpu``. The fixtures are
recordings from real hardware in ``tests/fixtures/gpu/<host>/`` (see the README there).
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

GPU_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"
H200 = GPU_FIXTURES / "h200-x1"


def load_json(name: str, host: Path = H200) -> Any:
    return json.loads((host / name).read_text())


def smi_rows(host: Path = H200) -> list[dict[str, str]]:
    """``nvidia-smi --query-gpu ... --format=csv`` rows, keys and values stripped."""
    with (host / "nvidia-smi-query.csv").open() as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        return [dict(zip(header, (v.strip() for v in row), strict=True)) for row in reader if row]


# NVML return codes (nvml.h), as pynvml names them.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15


class NVMLError(Exception):
    """Like pynvml's: carries the NVML return code in ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"NVML error {self.value}"


class FakePynvml:
    """Replays a ``nvml.json`` recording through the pynvml functions the adapter calls.

    ``scenario``: ``idle`` (the device records) or ``alloc_child`` (a child held a 4 GiB tensor).
    ``v2=False`` makes memory v2 unavailable (old driver). ``init_error`` makes ``nvmlInit`` fail
    with that code; ``fail`` maps a function name to a code it raises. Devices may carry
    ``MigMode``, ``MaxMigDeviceCount`` and ``MigDevices`` ({slot: {UUID, Name, MemoryInfo}}).
    """

    NVMLError = NVMLError
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_DEVICE_MIG_ENABLE = 1
    nvmlMemory_v2 = 0x02000028

    def __init__(
        self,
        recording: dict[str, Any] | None = None,
        *,
        scenario: str = "idle",
        v2: bool = True,
        init_error: int | None = None,
        fail: dict[str, int] | None = None,
    ) -> None:
        self.rec = copy.deepcopy(recording if recording is not None else load_json("nvml.json"))
        self.scenario = scenario
        self.v2 = v2
        self.init_error = init_error
        self.fail = fail or {}
        self.calls: dict[str, int] = {}
        self.initialised = False

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name != "nvmlInit" and name != "nvmlShutdown" and not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if name in self.fail:
            raise NVMLError(self.fail[name])

    def _dev(self, handle: Any) -> dict[str, Any]:
        if isinstance(handle, tuple):
            parent, slot = handle
            return self.rec["devices"][parent]["MigDevices"][str(slot)]
        return self.rec["devices"][handle]

    # -- system ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return self.rec["driver_version"]

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call("nvmlSystemGetCudaDriverVersion")
        return int(self.rec["cuda_driver_version"])

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return int(self.rec["count"])

    # -- devices ---------------------------------------------------------------------------

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._call("nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._call("nvmlDeviceGetUUID")
        return self._dev(handle)["UUID"]

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._call("nvmlDeviceGetName")
        return self._dev(handle)["Name"]

    def nvmlDeviceGetPciInfo(self, handle: Any) -> SimpleNamespace:
        self._call("nvmlDeviceGetPciInfo")
        # ctypes char arrays come back as bytes from the real module.
        return SimpleNamespace(busId=self._dev(handle)["PciInfo"]["busId"].encode())

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        self._call("nvmlDeviceGetCudaComputeCapability")
        major, minor = self._dev(handle)["CudaComputeCapability"]
        return (major, minor)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo")
        dev = self._dev(handle)
        if self.scenario == "alloc_child" and not isinstance(handle, tuple):
            v1 = dict(self.rec["alloc_child"]["mem"])
        else:
            v1 = dict(dev["MemoryInfo"])
        if not version:
            return SimpleNamespace(**v1)
        if not self.v2:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        reserved = dev.get("MemoryInfo_v2", {}).get("reserved", 0)
        return SimpleNamespace(
            version=version, total=v1["total"], free=v1["free"], used=v1["used"] - reserved, reserved=reserved
        )

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        self._call("nvmlDeviceGetMigMode")
        return list(self._dev(handle)["MigMode"])

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        self._call("nvmlDeviceGetMaxMigDeviceCount")
        return int(self._dev(handle)["MaxMigDeviceCount"])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> tuple[int, int]:
        self._call("nvmlDeviceGetMigDeviceHandleByIndex")
        if str(index) not in self._dev(handle).get("MigDevices", {}):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return (handle, index)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        self._call("nvmlDeviceGetComputeRunningProcesses")
        if self.scenario == "alloc_child":
            procs = self.rec["alloc_child"]["procs"]
        else:
            procs = self._dev(handle)["ComputeRunningProcesses_idle"]
        return [SimpleNamespace(**p) for p in procs]
