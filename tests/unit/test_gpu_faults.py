"""GPU fault classes (pure), the fault watchers' parsing (the simulated driver's file, NVML's
event set through a stand-in module), the simulated driver's per-process memory, and the fake
engine's allocation knobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pool_managerd.adapters import sim_gpus
from pool_managerd.adapters.gpu_faults import GpuFaultFact, NvmlFaultWatcher, SimFaultWatcher, parse_fault_line
from pool_managerd.adapters.gpu_profiles import load_profile
from pool_managerd.adapters.sim_gpus import SimGpuState, proc_path
from pool_managerd.core.gpu_faults import APPLICATION_XIDS, DRAIN_XIDS, STOP_XIDS, affected, classify
from pool_managerd.testing import fake_engine

HETERO = load_profile("hetero-24g-48g")
GPU0, GPU1 = (g.uuid for g in HETERO.gpus)


# --- classes --------------------------------------------------------------------------------


@pytest.mark.parametrize("xid", sorted(APPLICATION_XIDS))
def test_application_xids_leave_the_device_healthy_and_the_pools_alone(xid: int) -> None:
    d = classify("xid", xid)
    assert (d.fault_class, d.unhealthy, d.action) == ("application", False, "none")


@pytest.mark.parametrize("xid", sorted(DRAIN_XIDS))
def test_drain_xids_mark_the_device_and_drain(xid: int) -> None:
    d = classify("xid", xid)
    assert (d.fault_class, d.unhealthy, d.action) == ("drain", True, "drain")


@pytest.mark.parametrize("xid", sorted(STOP_XIDS))
def test_stop_xids_mark_the_device_and_stop(xid: int) -> None:
    d = classify("xid", xid)
    assert (d.fault_class, d.unhealthy, d.action) == ("stop", True, "stop")
    assert d.description.startswith(f"Xid {xid}: ")


@pytest.mark.parametrize("kind", ["ecc_dbe", "fell_off_bus", "handle_lost"])
def test_device_loss_and_double_bit_ecc_stop(kind: Any) -> None:
    assert classify(kind).action == "stop"


def test_an_unlisted_xid_drains_rather_than_cutting_requests_short() -> None:
    d = classify("xid", 4242)
    assert (d.fault_class, d.action) == ("drain", "drain") and "unlisted" in d.description


def test_affected_names_exactly_the_pools_on_the_device() -> None:
    placements = {"a": [GPU0], "b": [GPU1], "c": [GPU0, GPU1]}
    assert affected(placements, GPU1) == ["b", "c"]
    assert affected(placements, "GPU-none") == []


# --- the simulated driver ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fact"),
    [
        (b'{"uuid": "GPU-1", "xid": 79}', ("GPU-1", "xid", 79)),
        (b'{"uuid": "GPU-1", "kind": "ecc_dbe"}', ("GPU-1", "ecc_dbe", None)),
        (b'{"uuid": "GPU-1", "kind": "ecc_dbe", "xid": 5}', ("GPU-1", "ecc_dbe", None)),
    ],
)
def test_fault_lines_parse(line: bytes, fact: tuple[str, str, int | None]) -> None:
    got = parse_fault_line(line)
    assert got is not None and (got.uuid, got.kind, got.xid) == fact


@pytest.mark.parametrize(
    "line",
    [b"not json", b"[]", b'{"xid": 79}', b'{"uuid": "GPU-1"}', b'{"uuid": "GPU-1", "xid": true}',
     b'{"uuid": "GPU-1", "kind": "meltdown"}', b'{"uuid": "GPU-1", "xid": 79, "pad": "' + b"x" * 5000 + b'"}'],
)  # fmt: skip
def test_malformed_fault_lines_are_skipped(line: bytes) -> None:
    assert parse_fault_line(line) is None


def test_the_sim_fault_watcher_reads_only_whole_lines_appended_after_it_started(tmp_path: Path) -> None:
    path = tmp_path / "faults.jsonl"
    path.write_text('{"uuid": "GPU-old", "xid": 79}\n')
    seen: list[GpuFaultFact] = []
    watcher = SimFaultWatcher(path, seen.append)
    with path.open("a") as f:
        f.write('{"uuid": "GPU-new", "xid": 48}\n{"uuid": "GPU-half", ')
    watcher.poll()
    assert [(f.uuid, f.xid) for f in seen] == [("GPU-new", 48)]
    with path.open("a") as f:
        f.write('"xid": 74}\n')
    watcher.poll()
    assert [(f.uuid, f.xid) for f in seen] == [("GPU-new", 48), ("GPU-half", 74)]


@pytest.mark.adapter  # runs a process: dearer than its folder
def test_the_simulated_driver_lists_live_processes_and_drops_dead_ones(tmp_path: Path) -> None:
    state = SimGpuState(HETERO, tmp_path)
    assert json.loads((tmp_path / "gpus.json").read_text())["uuids"] == [GPU0, GPU1]
    me = os.getpid()
    proc_path(tmp_path, me).write_text(json.dumps({"pid": me, "alloc": {GPU1: 1000, "GPU-unknown": 5}}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    proc_path(tmp_path, dead.pid).write_text(json.dumps({"pid": dead.pid, "alloc": {GPU0: 7}}))
    (tmp_path / "procs" / "123.json").write_text("{broken")
    (tmp_path / "procs" / f"{me + 1}.json").write_text(json.dumps({"pid": me, "alloc": {GPU0: 9}}))  # pid mismatch
    snap = state.snapshot()
    by = {g.uuid: g for g in snap.gpus}
    assert [(p.pid, p.used_memory) for p in by[GPU1].processes] == [(me, 1000)]
    assert by[GPU1].memory_free == HETERO.gpus[1].memory_free - 1000
    assert by[GPU0].processes == [] and by[GPU0].memory_free == HETERO.gpus[0].memory_free
    assert not proc_path(tmp_path, dead.pid).exists()  # a killed process leaves NVML's list


def test_the_fake_engine_speaks_the_simulated_drivers_interface() -> None:
    assert fake_engine._SIM_GPU_DIR_ENV == sim_gpus.SIM_GPU_DIR_ENV
    assert fake_engine._SIM_GPU_BUDGETS_ENV == sim_gpus.SIM_GPU_BUDGETS_ENV


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("budget", {"GPU-a": 100, "GPU-b": 200}),
        ("none", {}),
        ("wrong-device", {"GPU-c": 300}),
        ("first-only", {"GPU-a": 100}),
        ("under", {"GPU-a": 10, "GPU-b": 20}),
    ],
)
def test_fake_engine_allocation_modes(mode: str, want: dict[str, int]) -> None:
    budgets = {"GPU-a": 100, "GPU-b": 200}
    got = fake_engine.gpu_allocation(mode, ["GPU-a", "GPU-b"], budgets, ["GPU-a", "GPU-b", "GPU-c"], None)
    assert got == want


# --- NVML's event set, through a stand-in module -------------------------------------------------


class _NvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class EventNvml:
    """The event API calls the watcher makes, answering from a queue of scripted outcomes."""

    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_GPU_IS_LOST = 15
    nvmlEventTypeXidCriticalError = 8
    nvmlEventTypeDoubleBitEccError = 2

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.registered: list[tuple[str, int]] = []
        self.lost: set[int] = set()
        self.shut = False

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlEventSetFree(self, es: str) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return [GPU0, GPU1][h]

    def nvmlDeviceGetSupportedEventTypes(self, h: int) -> int:
        return 8 | 2 | 1

    def nvmlDeviceRegisterEvents(self, h: int, mask: int, es: str) -> None:
        self.registered.append((self.nvmlDeviceGetUUID(h), mask))

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        if h in self.lost:
            raise _NvmlError(15)
        return SimpleNamespace(busId="0")

    def nvmlEventSetWait_v2(self, es: str, ms: int) -> SimpleNamespace:
        step = self.script.pop(0) if self.script else _NvmlError(10)
        if isinstance(step, Exception):
            raise step
        return step


def test_the_nvml_watcher_turns_events_into_facts() -> None:
    nv = EventNvml([
        _NvmlError(10),
        SimpleNamespace(eventType=8, eventData=48, device=1),
        SimpleNamespace(eventType=2, eventData=0, device=0),
    ])  # fmt: skip
    seen: list[GpuFaultFact] = []
    watcher = NvmlFaultWatcher(seen.append, module=nv, wait_ms=1)
    events = watcher.open()
    assert nv.registered == [(GPU0, 10), (GPU1, 10)]  # Xid and DBE, as supported
    for _ in range(3):
        watcher.wait_once(events)
    assert [(f.uuid, f.kind, f.xid) for f in seen] == [(GPU1, "xid", 48), (GPU0, "ecc_dbe", None)]


def test_a_lost_gpu_is_found_and_reported_once_and_the_thread_ends_when_all_are_gone() -> None:
    nv = EventNvml([_NvmlError(15), _NvmlError(15)])
    nv.lost = {1}
    seen: list[GpuFaultFact] = []
    done = threading.Event()

    def sink(fact: GpuFaultFact) -> None:
        seen.append(fact)
        if len(seen) == 2:
            done.set()

    watcher = NvmlFaultWatcher(sink, module=nv, wait_ms=1)
    events = watcher.open()
    watcher.wait_once(events)
    watcher.wait_once(events)
    assert [(f.uuid, f.kind, f.xid) for f in seen] == [(GPU1, "fell_off_bus", 79)]
    nv.lost = {0, 1}
    nv.script = [_NvmlError(15)]
    watcher.start()
    assert done.wait(5.0)
    watcher.stop()
    assert [(f.uuid, f.kind) for f in seen] == [(GPU1, "fell_off_bus"), (GPU0, "fell_off_bus")]
    assert nv.shut


def test_sim_fault_appends_one_checked_line_to_a_simulated_driver_only(tmp_path: Path, capsys: Any) -> None:
    from pool_managerd.cli.main import main

    assert main(["sim-fault", GPU1, "--xid", "79", "--run-dir", str(tmp_path)]) == 2  # no driver there
    assert "no simulated driver" in capsys.readouterr().err
    SimGpuState(HETERO, tmp_path / "sim-gpu")
    assert main(["sim-fault", GPU1, "--run-dir", str(tmp_path)]) == 2  # an xid fault needs its Xid
    assert main(["sim-fault", GPU1, "--xid", "79", "--run-dir", str(tmp_path)]) == 0
    assert main(["sim-fault", GPU0, "--kind", "ecc_dbe", "--run-dir", str(tmp_path)]) == 0
    lines = (tmp_path / "sim-gpu" / "faults.jsonl").read_bytes().splitlines()
    facts = [parse_fault_line(line) for line in lines]
    assert [(f.uuid, f.kind, f.xid) for f in facts if f] == [(GPU1, "xid", 79), (GPU0, "ecc_dbe", None)]
