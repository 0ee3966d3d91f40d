"""Shipped simulated GPU profiles and the ``load_gpu_source`` loader."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from pool_managerd.adapters.gpu_profiles import GpuSourceError, list_profiles, load_gpu_source
from pool_managerd.adapters.nvml import read_nvml_snapshot
from pool_managerd.contract.messages import encode
from support.gpu import FakePynvml

GiB = 1024**3


def test_three_profiles_ship() -> None:
    assert {"h200-x1", "hetero-24g-48g", "a100-80g-x4-mig"} <= set(list_profiles())


@pytest.mark.parametrize("name", ["h200-x1", "hetero-24g-48g", "a100-80g-x4-mig"])
def test_profiles_are_simulated_and_consistent(name: str) -> None:
    snap = load_gpu_source(f"sim:{name}")
    assert snap.simulated is True
    assert snap.source == f"sim:{name}"
    assert [g.index for g in snap.gpus] == list(range(len(snap.gpus)))
    for gpu in snap.gpus:
        assert gpu.uuid.startswith("GPU-")
        assert gpu.memory_free + gpu.memory_used + gpu.memory_reserved == gpu.memory_total
        assert gpu.pci_bus_id == gpu.pci_bus_id.lower() and len(gpu.pci_bus_id) == len("0000:00:06.0")
        assert sum(m.memory_total for m in gpu.mig_instances) <= gpu.memory_total
        for m in gpu.mig_instances:
            assert m.uuid.startswith("MIG-") and m.parent_uuid == gpu.uuid
            assert m.memory_free + m.memory_used == m.memory_total


def test_h200_profile_is_the_recording() -> None:
    """The profile is what the NVML adapter reads from the recorded H200, minus live-ness."""
    prof = load_gpu_source("sim:h200-x1")
    live = read_nvml_snapshot(FakePynvml())
    assert prof.gpus == live.gpus
    assert (prof.driver_version, prof.cuda_driver_version) == (live.driver_version, live.cuda_driver_version)


def test_hetero_profile_shape() -> None:
    small, big = load_gpu_source("sim:hetero-24g-48g").gpus
    assert 23 * GiB < small.memory_total <= 24 * GiB
    assert 47 * GiB < big.memory_total <= 48 * GiB
    assert small.compute_capability == (8, 9) and big.compute_capability == (8, 6)


def test_a100_mig_profile_shape() -> None:
    gpus = load_gpu_source("sim:a100-80g-x4-mig").gpus
    assert len(gpus) == 4 and all(g.compute_capability == (8, 0) for g in gpus)
    mig = [g for g in gpus if g.mig_mode]
    assert len(mig) == 1 and len(mig[0].mig_instances) >= 3
    assert len({m.uuid for m in mig[0].mig_instances}) == len(mig[0].mig_instances)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(GpuSourceError) as info:
        load_gpu_source("sim:dgx-9000")
    assert info.value.code == "unknown_gpu_profile"
    for name in list_profiles():
        assert f"sim:{name}" in info.value.message


def test_file_source_is_forced_simulated(tmp_path: Path) -> None:
    snap = msgspec.structs.replace(read_nvml_snapshot(FakePynvml()), simulated=False)
    path = tmp_path / "inventory.json"
    path.write_bytes(encode(snap))
    loaded = load_gpu_source(str(path))
    assert loaded.simulated is True
    assert loaded.source == str(path)
    assert loaded.gpus == snap.gpus


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GpuSourceError) as info:
        load_gpu_source(str(tmp_path / "nope.json"))
    assert info.value.code == "bad_gpu_source"
    assert "sim:h200-x1" in info.value.message


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"simulated": True}),  # no source
        json.dumps({"simulated": True, "source": "x", "gpus": [{"index": 0}]}),
    ],
)
def test_malformed_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GpuSourceError) as info:
        load_gpu_source(str(path))
    assert info.value.code == "bad_gpu_source"


def test_duplicate_uuid_in_file(tmp_path: Path) -> None:
    snap = load_gpu_source("sim:hetero-24g-48g")
    gpus = [snap.gpus[0], msgspec.structs.replace(snap.gpus[1], uuid=snap.gpus[0].uuid)]
    path = tmp_path / "dup.json"
    path.write_bytes(encode(msgspec.structs.replace(snap, gpus=gpus)))
    with pytest.raises(GpuSourceError) as info:
        load_gpu_source(str(path))
    assert info.value.code == "bad_gpu_source"
    assert "appears twice" in info.value.message
