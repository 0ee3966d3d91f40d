"""``pool-managerd plan`` run as a real command, plus the byte-size parser it uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.contract.messages import encode
from pool_managerd.placement import SizeError, format_bytes, parse_bytes, place

GiB = 1024**3
HETERO = load_gpu_source("sim:hetero-24g-48g")
SMALL, BIG = (g.uuid for g in HETERO.gpus)


def run_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pool_managerd", "plan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_table_output() -> None:
    r = run_plan(
        "--gpus", "sim:hetero-24g-48g", "--mask", "0,1", "--model-bytes", "40GiB",
        "--context-bytes", "4GiB", "--headroom-bytes", "1GiB",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "GPU source: sim:hetero-24g-48g (SIMULATED)" in out
    assert f"CUDA_VISIBLE_DEVICES={SMALL},{BIG}" in out
    assert "llama.cpp --tensor-split: 0.326962,0.673038" in out
    assert "NVIDIA GeForce RTX 4090" in out and "NVIDIA RTX A6000" in out
    assert "why:" in out and "policy free" in out
    assert r.stderr == ""


def test_json_output_is_the_placement() -> None:
    r = run_plan(
        "--gpus", "sim:hetero-24g-48g", "--mask", "GPU1,GPU0", "--model-bytes", "30GiB",
        "--policy", "equal", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    expected = place("GPU1,GPU0", HETERO, 30 * GiB, 0, "equal", 0)
    assert doc["placement"] == msgspec.to_builtins(expected)
    assert doc["placement"]["uuids"] == [BIG, SMALL]
    assert doc["placement"]["tp_size"] == 2 and doc["placement"]["tensor_split"] == "0.5,0.5"
    assert [d["budget"] for d in doc["devices"]] == [15 * GiB, 15 * GiB]
    assert doc["simulated"] is True and doc["need_bytes"] == 30 * GiB


def test_auto_mask_and_file_source(tmp_path: Path) -> None:
    path = tmp_path / "inv.json"
    path.write_bytes(encode(HETERO))
    r = run_plan("--gpus", str(path), "--model-bytes", "10G", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == str(path) and doc["placement"]["uuids"] == [BIG]
    assert doc["placement"]["explanation"][0].startswith("mask auto:")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--gpus", "sim:h200-x1", "--mask", "0,0"], "duplicate_device"),
        (["--gpus", "sim:h200-x1", "--mask", "0,1"], "index_out_of_range"),
        (["--gpus", "sim:nope"], "unknown_gpu_profile"),
        (["--gpus", "sim:hetero-24g-48g", "--mask", "0,1", "--policy", "ratios:0.9,0.3"], "bad_ratios"),
        (["--gpus", "sim:hetero-24g-48g", "--mask", "0,1", "--model-bytes", "80GiB"], "insufficient_vram"),
        (["--gpus", "sim:hetero-24g-48g", "--model-bytes", "8XB"], "bad_size"),
    ],
)
def test_invalid_input_exits_2_with_a_json_error(args: list[str], code: str) -> None:
    if "--model-bytes" not in args:
        args = [*args, "--model-bytes", "1GiB"]
    r = run_plan(*args, "--json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}
    assert doc["error"]["code"] == code and doc["error"]["message"]


def test_invalid_input_without_json_is_one_line_on_stderr() -> None:
    r = run_plan("--gpus", "sim:h200-x1", "--mask", "GPU-nope", "--model-bytes", "1GiB")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown_device" in lines[0] and "'GPU-nope'" in lines[0]


def test_nvml_source_never_crashes() -> None:
    r = run_plan("--gpus", "nvml", "--model-bytes", "1GiB", "--json")
    assert r.returncode in (0, 2), r.stderr
    if r.returncode == 2:  # no NVIDIA driver here: a typed NVML problem
        assert json.loads(r.stdout)["error"]["code"].startswith("nvml_")


# -- byte sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("123", 123),
        (8, 8),
        ("8GiB", 8 * GiB),
        ("8gib", 8 * GiB),
        ("8Gi", 8 * GiB),
        ("500MiB", 500 * 1024**2),
        ("20G", 20 * 10**9),
        ("20GB", 20 * 10**9),
        ("1.5GiB", 3 * GiB // 2),
        ("2TiB", 2 * 1024**4),
        ("4k", 4000),
        ("10B", 10),
    ],
)
def test_parse_bytes(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["-1", -1, "8XB", "", "GiB", "1e9", "1,000", True])
def test_parse_bytes_rejects(text: str | int) -> None:
    with pytest.raises(SizeError) as info:
        parse_bytes(text)
    assert info.value.code == "bad_size"


def test_format_bytes() -> None:
    assert format_bytes(24 * GiB) == "24.00 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(-2048) == "-2.00 KiB"
