"""Preflight (pure) and the host-facts gatherer that feeds it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import stat
from pathlib import Path

import msgspec
import pytest

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.adapters.host_facts import (
    file_fact,
    find_executable,
    gather_host_facts,
    port_is_free,
    sha256_file,
)
from pool_managerd.contract.messages import GpuSnapshot, Problem
from pool_managerd.placement import place
from pool_managerd.validation.preflight import (
    GPU_ONLY_PREFIX,
    PREFLIGHT_CODES,
    ExecutableFact,
    FileFact,
    HostFacts,
    PreflightSpec,
    preflight,
    problem_codes,
)

GiB = 1024**3
HETERO = load_gpu_source("sim:hetero-24g-48g")
A100 = load_gpu_source("sim:a100-80g-x4-mig")
MIG0 = A100.gpus[3].mig_instances[0].uuid
DIGEST = "ab" * 32

SPEC = PreflightSpec(
    engine_binary="llama-server",
    model_path="/models/m.gguf",
    expected_digest=f"sha256:{DIGEST}",
    min_compute_capability=(8, 0),
    require_mig=False,
    port=8081,
    model_bytes=20 * GiB,
    context_bytes=2 * GiB,
    headroom=1 * GiB,
    mask="0,1",
)
FACTS = HostFacts(
    executables={"llama-server": ExecutableFact(path="/usr/bin/llama-server", executable=True)},
    files={"/models/m.gguf": FileFact(exists=True, readable=True, size=20 * GiB, sha256=DIGEST)},
    free_ports=frozenset({8081}),
)


def codes(spec: PreflightSpec = SPEC, snap: GpuSnapshot | None = HETERO, facts: HostFacts = FACTS) -> list[str]:
    return problem_codes(preflight(spec, snap, facts))


def spec(**kw: object) -> PreflightSpec:
    return dataclasses.replace(SPEC, **kw)  # type: ignore[arg-type]


def facts(**kw: object) -> HostFacts:
    return dataclasses.replace(FACTS, **kw)  # type: ignore[arg-type]


def test_all_good_means_no_problems() -> None:
    assert preflight(SPEC, HETERO, FACTS) == []


# -- GPU-only --------------------------------------------------------------------------------


def test_no_snapshot_is_gpu_only_refusal() -> None:
    gpu_problem = Problem(code="nvml_driver_not_loaded", message="NVML init failed: driver not loaded")
    problems = preflight(SPEC, None, facts(gpu_problem=gpu_problem))
    assert problem_codes(problems) == ["gpu_unavailable"]
    msg = problems[0].message
    assert msg.startswith("GPU-only enforcement:") and msg.startswith(GPU_ONLY_PREFIX)
    assert "nvml_driver_not_loaded" in msg and "never fall back to CPU" in msg


def test_empty_snapshot_is_gpu_only_refusal() -> None:
    empty = GpuSnapshot(simulated=False, source="nvml")
    problems = preflight(SPEC, empty, FACTS)
    assert problem_codes(problems) == ["gpu_unavailable"]
    assert problems[0].message.startswith("GPU-only enforcement:")


def test_without_gpu_the_other_checks_still_run() -> None:
    assert codes(snap=None, facts=facts(executables={}, free_ports=frozenset())) == [
        "gpu_unavailable",
        "engine_missing",
        "port_in_use",
    ]


# -- GPU checks ------------------------------------------------------------------------------


def test_compute_capability_too_low() -> None:
    problems = preflight(spec(min_compute_capability=(8, 7)), HETERO, FACTS)
    assert problem_codes(problems) == ["compute_capability_too_low"]
    assert problems[0].device == HETERO.gpus[1].uuid and "8.6" in problems[0].message
    assert codes(spec(min_compute_capability=(9, 0))) == ["compute_capability_too_low"] * 2
    assert codes(spec(min_compute_capability=(8, 6))) == []


def test_mig_mismatch() -> None:
    assert codes(spec(mask=MIG0, require_mig=False), A100) == ["mig_mismatch"]
    assert codes(spec(mask="0", require_mig=True), A100) == ["mig_mismatch"]
    assert codes(spec(mask=MIG0, require_mig=True), A100) == []
    assert codes(spec(mask=MIG0, require_mig=None), A100) == []


def test_insufficient_vram_from_the_plan() -> None:
    problems = preflight(spec(model_bytes=80 * GiB), HETERO, FACTS)
    assert problem_codes(problems) == ["insufficient_vram", "insufficient_vram"]
    assert {p.device for p in problems} == {g.uuid for g in HETERO.gpus}


def test_model_size_defaults_to_the_file_size() -> None:
    big = facts(files={"/models/m.gguf": FileFact(exists=True, readable=True, size=100 * GiB, sha256=DIGEST)})
    assert codes(spec(model_bytes=None), HETERO, big) == ["insufficient_vram", "insufficient_vram"]
    assert codes(spec(model_bytes=None)) == []


def test_given_placement_is_checked_against_the_current_snapshot() -> None:
    placement = place("0,1", HETERO, 40 * GiB, 0, "free", 0)
    assert codes(spec(placement=placement, headroom=0)) == []
    # memory was taken since: GPU1 now has 10 GiB free
    busy = msgspec.structs.replace(
        HETERO, gpus=[HETERO.gpus[0], msgspec.structs.replace(HETERO.gpus[1], memory_free=10 * GiB)]
    )
    problems = preflight(spec(placement=placement, headroom=0), busy, FACTS)
    assert problem_codes(problems) == ["insufficient_vram"]
    assert problems[0].device == HETERO.gpus[1].uuid


def test_placement_on_a_vanished_device() -> None:
    placement = place("0", HETERO, 1 * GiB)
    assert codes(spec(placement=placement), load_gpu_source("sim:h200-x1")) == ["unknown_device"]


def test_mask_problems_keep_their_codes() -> None:
    assert codes(spec(mask="0,0")) == ["duplicate_device"]
    assert codes(spec(mask=("1", "GPU-nope"))) == ["unknown_device"]
    assert codes(spec(mask=None, model_bytes=1 * GiB)) == []  # auto placement


# -- engine, model, digest, port -------------------------------------------------------------


def test_engine_missing() -> None:
    assert codes(facts=facts(executables={})) == ["engine_missing"]
    assert codes(facts=facts(executables={"llama-server": ExecutableFact(path=None)})) == ["engine_missing"]


def test_engine_not_executable() -> None:
    fact = ExecutableFact(path="/opt/llama-server", executable=False)
    problems = preflight(SPEC, HETERO, facts(executables={"llama-server": fact}))
    assert problem_codes(problems) == ["engine_not_executable"]
    assert "/opt/llama-server" in problems[0].message


def test_model_missing() -> None:
    assert codes(facts=facts(files={})) == ["model_missing"]
    assert codes(facts=facts(files={"/models/m.gguf": FileFact(exists=False)})) == ["model_missing"]


def test_model_unreadable() -> None:
    assert codes(facts=facts(files={"/models/m.gguf": FileFact(exists=True, readable=False)})) == ["model_unreadable"]


def test_no_model_path_skips_model_checks() -> None:
    assert codes(spec(model_path=None, expected_digest=None), facts=facts(files={})) == []


@pytest.mark.parametrize("expected", [DIGEST, f"sha256:{DIGEST}", f"SHA256:{DIGEST.upper()}"])
def test_digest_spellings_match(expected: str) -> None:
    assert codes(spec(expected_digest=expected)) == []


def test_digest_mismatch() -> None:
    problems = preflight(spec(expected_digest="sha256:" + "cd" * 32), HETERO, FACTS)
    assert problem_codes(problems) == ["digest_mismatch"]
    assert DIGEST in problems[0].message


def test_known_model_digest_overrides_the_file_hash() -> None:
    assert codes(spec(model_digest="cd" * 32)) == ["digest_mismatch"]
    unhashed = facts(files={"/models/m.gguf": FileFact(exists=True, readable=True, size=1, sha256=None)})
    assert codes(spec(model_digest=DIGEST), facts=unhashed) == []


def test_digest_unverified_when_not_hashed() -> None:
    unhashed = facts(files={"/models/m.gguf": FileFact(exists=True, readable=True, size=1, sha256=None)})
    assert codes(facts=unhashed) == ["digest_unverified"]
    assert codes(spec(expected_digest=None), facts=unhashed) == []


def test_port_in_use() -> None:
    assert codes(facts=facts(free_ports=frozenset())) == ["port_in_use"]
    assert codes(spec(port=None), facts=facts(free_ports=frozenset())) == []


def test_problems_come_in_a_stable_order() -> None:
    everything_wrong = spec(min_compute_capability=(9, 0), port=1, model_bytes=80 * GiB)
    broken = facts(executables={}, files={"/models/m.gguf": FileFact(exists=True, readable=False)})
    assert codes(everything_wrong, HETERO, broken) == [
        "engine_missing",
        "model_unreadable",
        "port_in_use",
        "insufficient_vram",
        "insufficient_vram",
    ]
    assert codes(spec(min_compute_capability=(9, 0), port=1), HETERO, broken) == [
        "engine_missing",
        "model_unreadable",
        "port_in_use",
        "compute_capability_too_low",
        "compute_capability_too_low",
    ]


def test_every_preflight_code_is_tested() -> None:
    tested = {
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
    }
    assert tested == set(PREFLIGHT_CODES)


# -- the shell side: gather_host_facts -------------------------------------------------------


def test_find_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "engine"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("data")
    plain.chmod(0o644)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_executable("engine") == ExecutableFact(path=str(exe.resolve()), executable=True)
    assert find_executable(str(exe)) == ExecutableFact(path=str(exe.resolve()), executable=True)
    assert find_executable("plain") == ExecutableFact(path=str(plain.resolve()), executable=False)
    assert find_executable(str(plain)).executable is False
    assert find_executable("nope") == ExecutableFact(path=None)
    assert find_executable(str(tmp_path / "nope")) == ExecutableFact(path=None)
    assert find_executable(str(tmp_path)).executable is False  # a directory


def test_file_facts_and_hashing(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 3_000_000)
    want = hashlib.sha256(model.read_bytes()).hexdigest()
    assert sha256_file(model) == want
    assert sha256_file(model, cap=1000) is None
    assert file_fact(str(model), want_hash=True) == FileFact(exists=True, readable=True, size=3_000_000, sha256=want)
    assert file_fact(str(model)).sha256 is None
    assert file_fact(str(tmp_path / "none")) == FileFact(exists=False)
    d = file_fact(str(tmp_path), want_hash=True)
    assert d.is_dir and d.readable and d.sha256 is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("x")
    f.chmod(0)
    assert file_fact(str(f)) == FileFact(exists=True, readable=False, size=1, sha256=None)
    f.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_port_is_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_is_free("127.0.0.1", port) is False
    assert port_is_free("127.0.0.1", 0) is False
    assert port_is_free("127.0.0.1", 70000) is False


def test_gathered_facts_feed_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    monkeypatch.setenv("PATH", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        host = gather_host_facts(
            executables=["llama-server"], files=[str(model)], hash_files=[str(model)], ports=[taken]
        )
    assert taken not in host.free_ports
    good = PreflightSpec(
        engine_binary="llama-server",
        model_path=str(model),
        expected_digest="sha256:" + hashlib.sha256(b"weights").hexdigest(),
        model_bytes=1 * GiB,
    )
    assert preflight(good, HETERO, host) == []
    assert problem_codes(preflight(dataclasses.replace(good, port=taken), HETERO, host)) == ["port_in_use"]
