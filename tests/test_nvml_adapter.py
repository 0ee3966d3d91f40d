"""The NVML adapter against a pynvml stand-in replaying the H200 recording, and its failures."""

from __future__ import annotations

import copy
import sys

import pytest

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.nvml import (
    NVML_PROBLEM_CODES,
    GpuUnavailable,
    NvmlReader,
    normalize_pci_bus_id,
    read_nvml_snapshot,
)
from pool_managerd.contract.errors import PoolManagerError
from support.gpu import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    FakePynvml,
    load_json,
    smi_rows,
)

MiB = 1024 * 1024


def test_replay_matches_nvidia_smi() -> None:
    snap = read_nvml_snapshot(FakePynvml(), clock=lambda: 1234.5)
    (row,) = smi_rows()
    (gpu,) = snap.gpus
    assert snap.simulated is False
    assert snap.source == "nvml"
    assert snap.taken_at == 1234.5
    assert snap.driver_version == "580.159.04"
    assert snap.cuda_driver_version == "13.0"
    assert gpu.index == int(row["index"])
    assert gpu.uuid == row["uuid"]
    assert gpu.name == row["name"]
    # nvidia-smi rounds to the nearest MiB.
    assert round(gpu.memory_total / MiB) == int(row["memory.total [MiB]"].split()[0])
    assert round(gpu.memory_free / MiB) == int(row["memory.free [MiB]"].split()[0])
    # nvidia-smi shows v2 "used" (0 MiB on the idle H200): the driver's reservation is separate.
    assert round(gpu.memory_used / MiB) == int(row["memory.used [MiB]"].split()[0])
    assert round(gpu.memory_reserved / MiB) == 615
    assert f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}" == row["compute_cap"]
    assert gpu.pci_bus_id == "0000:00:06.0" == normalize_pci_bus_id(row["pci.bus_id"])
    assert gpu.mig_mode is (row["mig.mode.current"] == "Enabled")
    assert gpu.mig_instances == []
    assert gpu.processes == []


def test_v1_fallback_counts_reserved_as_used() -> None:
    snap = read_nvml_snapshot(FakePynvml(v2=False))
    (gpu,) = snap.gpus
    assert gpu.memory_reserved == 0
    assert gpu.memory_used == 644939776  # ~615 MiB reserved by the driver, inside v1 "used"
    assert gpu.memory_free == 150109880320


def test_alloc_child_process_is_reported() -> None:
    rec = load_json("nvml.json")
    snap = read_nvml_snapshot(FakePynvml(scenario="alloc_child"))
    (gpu,) = snap.gpus
    (proc,) = gpu.processes
    assert proc.pid == rec["alloc_child"]["pid"] == 422
    assert proc.used_memory == 4838129664  # 4 GiB tensor + CUDA context
    assert gpu.memory_free == rec["alloc_child"]["mem"]["free"]


def test_init_once_and_shutdown_on_close() -> None:
    fake = FakePynvml()
    reader = NvmlReader(fake)
    first = reader.snapshot()
    second = reader.snapshot()
    assert first.gpus == second.gpus
    assert fake.calls["nvmlInit"] == 1
    reader.close()
    assert fake.calls["nvmlShutdown"] == 1
    reader.close()
    assert fake.calls["nvmlShutdown"] == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "nvml_library_not_found"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "nvml_driver_not_loaded"),
        (NVML_ERROR_NO_PERMISSION, "nvml_no_permission"),
        (NVML_ERROR_GPU_IS_LOST, "nvml_error"),
    ],
)
def test_init_failures_are_typed(error: int, code: str) -> None:
    fake = FakePynvml(init_error=error)
    with pytest.raises(GpuUnavailable) as info:
        read_nvml_snapshot(fake)
    exc = info.value
    assert isinstance(exc, PoolManagerError)
    assert exc.code == "gpu_unavailable"
    assert exc.problem.code == code
    assert exc.problem.message.startswith("NVML init failed")
    assert "nvmlShutdown" not in fake.calls


def test_failure_mid_query_names_the_device() -> None:
    with pytest.raises(GpuUnavailable) as info:
        read_nvml_snapshot(FakePynvml(fail={"nvmlDeviceGetMemoryInfo": NVML_ERROR_GPU_IS_LOST}))
    assert info.value.problem.code == "nvml_error"
    assert info.value.problem.device == "index 0"
    assert "GPU 0" in info.value.problem.message


def test_permission_denied_mid_query() -> None:
    with pytest.raises(GpuUnavailable) as info:
        read_nvml_snapshot(FakePynvml(fail={"nvmlDeviceGetCount": NVML_ERROR_NO_PERMISSION}))
    assert info.value.problem.code == "nvml_no_permission"


def test_non_nvml_exception_is_still_typed() -> None:
    class Broken(FakePynvml):
        def nvmlDeviceGetName(self, handle: object) -> str:
            raise RuntimeError("boom")

    with pytest.raises(GpuUnavailable) as info:
        read_nvml_snapshot(Broken())
    assert info.value.problem.code == "nvml_error"
    assert "boom" in info.value.problem.message


def test_unsupported_features_are_not_errors() -> None:
    fake = FakePynvml(
        fail={
            "nvmlDeviceGetMigMode": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetComputeRunningProcesses": NVML_ERROR_NOT_SUPPORTED,
            "nvmlSystemGetCudaDriverVersion": NVML_ERROR_NOT_SUPPORTED,
        }
    )
    (gpu,) = read_nvml_snapshot(fake).gpus
    assert gpu.mig_mode is False
    assert gpu.processes == []


def test_module_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(GpuUnavailable) as info:
        read_nvml_snapshot()
    assert info.value.problem.code == "nvml_module_missing"
    assert "nvidia-ml-py" in info.value.problem.message


def test_real_pynvml_never_crashes() -> None:
    """The real module: a snapshot on a GPU host, a typed problem elsewhere (this CI: no driver)."""
    pytest.importorskip("pynvml")
    try:
        snap = read_nvml_snapshot()
    except GpuUnavailable as exc:
        assert exc.problem.code in NVML_PROBLEM_CODES
    else:
        assert snap.simulated is False
        assert all(g.uuid.startswith("GPU-") for g in snap.gpus)


def test_mig_instances_are_read() -> None:
    rec = load_json("nvml.json")
    dev = rec["devices"][0]
    dev["MigMode"] = [1, 1]
    dev["MaxMigDeviceCount"] = 7
    dev["MigDevices"] = {
        "0": {
            "UUID": "MIG-11111111-2222-4333-8444-555555555555",
            "Name": "NVIDIA H200 MIG 3g.71gb",
            "MemoryInfo": {"total": 71 * 1024 * MiB, "free": 70 * 1024 * MiB, "used": 1024 * MiB},
        },
        "2": {
            "UUID": "MIG-66666666-2222-4333-8444-555555555555",
            "Name": "NVIDIA H200 MIG 1g.18gb",
            "MemoryInfo": {"total": 18 * 1024 * MiB, "free": 18 * 1024 * MiB, "used": 0},
        },
    }
    (gpu,) = read_nvml_snapshot(FakePynvml(copy.deepcopy(rec))).gpus
    assert gpu.mig_mode is True
    assert [(m.index, m.profile, m.uuid[:12]) for m in gpu.mig_instances] == [
        (0, "3g.71gb", "MIG-11111111"),
        (2, "1g.18gb", "MIG-66666666"),
    ]
    assert all(m.parent_uuid == gpu.uuid for m in gpu.mig_instances)
    assert gpu.mig_instances[0].memory_free == 70 * 1024 * MiB


@pytest.mark.parametrize(
    ("raw", "cuda"),
    [
        ("00000000:00:06.0", "0000:00:06.0"),
        (b"00000000:4C:00.0", "0000:4c:00.0"),
        ("0000:0b:00.0", "0000:0b:00.0"),
        ("00000001:81:1F.7", "0001:81:1f.7"),
        ("garbage", "garbage"),
    ],
)
def test_normalize_pci_bus_id(raw: str | bytes, cuda: str) -> None:
    assert normalize_pci_bus_id(raw) == cuda


def test_gpu_source_nvml_uses_the_adapter() -> None:
    snap = load_gpu_source("nvml", nvml_module=FakePynvml(), clock=lambda: 7.0)
    assert snap.source == "nvml" and snap.simulated is False and snap.taken_at == 7.0
