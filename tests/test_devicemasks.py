"""Device masks: syntax, resolution against snapshots, every error code, CUDA's truncation cases."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.contract.messages import Gpu, GpuSnapshot
from pool_managerd.placement import (
    MASK_ERROR_CODES,
    Device,
    MaskError,
    mask_placement,
    parse_mask,
    resolve_mask,
    snapshot_devices,
)
from support.gpu import load_json

H200 = load_gpu_source("sim:h200-x1")
HETERO = load_gpu_source("sim:hetero-24g-48g")
A100 = load_gpu_source("sim:a100-80g-x4-mig")
H200_UUID = "GPU-61deac7a-becd-5525-b8e1-312c9b0a037e"
A100_UUIDS = [g.uuid for g in A100.gpus]
MIGS = [m.uuid for m in A100.gpus[3].mig_instances]
SICK = msgspec.structs.replace(HETERO, gpus=[HETERO.gpus[0], msgspec.structs.replace(HETERO.gpus[1], healthy=False)])
SICK_MIG = msgspec.structs.replace(A100, gpus=[*A100.gpus[:3], msgspec.structs.replace(A100.gpus[3], healthy=False)])


def err(mask: object, snapshot: GpuSnapshot = H200) -> MaskError:
    with pytest.raises(MaskError) as info:
        resolve_mask(mask, snapshot)  # type: ignore[arg-type]
    return info.value


# -- accepted forms --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ("0", [0]),
        ("1,0", [1, 0]),
        ("GPU0,GPU1", [0, 1]),
        ("gpu1", [1]),
        (["1", "GPU0"], [1, 0]),
        ("all", [0, 1]),
        (["all"], [0, 1]),
        ("GPU-4090c0de-0000-4000-8000-000000000024", [0]),
        ("GPU-a6", [1]),
        ("GPU-4,GPU-a", [0, 1]),
        ("01", [1]),
    ],
)
def test_accepted_forms(mask: str | list[str], expected: list[int]) -> None:
    dm = resolve_mask(mask, HETERO)
    assert dm.uuids == tuple(HETERO.gpus[i].uuid for i in expected)


def test_mask_order_is_cuda_order() -> None:
    dm = resolve_mask("1,0", HETERO)
    assert dm.to_cuda_visible_devices() == f"{HETERO.gpus[1].uuid},{HETERO.gpus[0].uuid}"
    assert dm.canonical == dm.uuids
    assert dm.canonical_str() == dm.to_cuda_visible_devices()
    assert dm.tokens == ("1", "0")
    assert [d.label for d in dm.devices] == ["GPU1", "GPU0"]


def test_all_skips_gpus_in_mig_mode() -> None:
    assert resolve_mask("all", A100).uuids == tuple(A100_UUIDS[:3])


def test_single_mig_instance() -> None:
    dm = resolve_mask(MIGS[1], A100)
    (dev,) = dm.devices
    assert dev.kind == "mig" and dev.parent_uuid == A100_UUIDS[3] and dev.profile == "2g.20gb"
    assert dev.label == "GPU3/MIG1"
    assert dm.has_mig
    assert dm.to_cuda_visible_devices() == MIGS[1]


def test_mig_instance_with_other_gpus() -> None:
    dm = resolve_mask(["0", "MIG-3b"], A100)
    assert dm.uuids == (A100_UUIDS[0], MIGS[3])


def test_mask_placement_fields() -> None:
    p = mask_placement(resolve_mask("GPU1,0", HETERO), simulated=True)
    assert p.mask == p.uuids == [HETERO.gpus[1].uuid, HETERO.gpus[0].uuid]
    assert p.cuda_visible_devices == ",".join(p.uuids)
    assert p.simulated is True and p.budgets == [] and p.tensor_split is None


def test_snapshot_devices_lists_gpus_then_their_instances() -> None:
    labels = [d.label for d in snapshot_devices(A100)]
    assert labels == ["GPU0", "GPU1", "GPU2", "GPU3", "GPU3/MIG0", "GPU3/MIG1", "GPU3/MIG2", "GPU3/MIG3"]


# -- every error code ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "code", "token", "position", "snapshot"),
    [
        ("", "empty_mask", None, None, H200),
        ([], "empty_mask", None, None, H200),
        ("0,,1", "empty_entry", "", 1, HETERO),
        ("0,", "empty_entry", "", 1, H200),
        (",0", "empty_entry", "", 0, H200),
        (["0", ""], "empty_entry", "", 1, HETERO),
        ("0, 1", "whitespace", " 1", 1, HETERO),
        (" 0", "whitespace", " 0", 0, H200),
        ("0\n", "whitespace", "0\n", 0, H200),
        (" ", "whitespace", " ", 0, H200),
        ("abc", "bad_token", "abc", 0, H200),
        ("0x1", "bad_token", "0x1", 0, H200),
        ("1.5", "bad_token", "1.5", 0, H200),
        ("+1", "bad_token", "+1", 0, H200),
        ("GPU-", "bad_token", "GPU-", 0, H200),
        ("gpu-61deac7a", "bad_token", "gpu-61deac7a", 0, H200),
        ("0,all", "bad_token", "all", 1, H200),
        (["0,1"], "bad_token", "0,1", 0, HETERO),
        ([0], "bad_token", None, 0, H200),
        ("-1", "negative_index", "-1", 0, H200),
        ("0,-2", "negative_index", "-2", 1, HETERO),
        ("1", "index_out_of_range", "1", 0, H200),
        ("0,1", "index_out_of_range", "1", 1, H200),
        ("GPU7", "index_out_of_range", "GPU7", 0, A100),
        ("GPU-nope", "unknown_device", "GPU-nope", 0, H200),
        ("GPU-61deac7a-becd-5525-b8e1-312c9b0a037f", "unknown_device", None, 0, H200),
        ("MIG-ffff", "unknown_device", "MIG-ffff", 0, A100),
        ("MIG-3a000000", "ambiguous_prefix", "MIG-3a000000", 0, A100),
        ("GPU-a100", "ambiguous_prefix", "GPU-a100", 0, A100),
        ("0,0", "duplicate_device", "0", 1, H200),
        ("0,GPU0", "duplicate_device", "GPU0", 1, H200),
        (f"GPU-61deac7a,{H200_UUID}", "duplicate_device", H200_UUID, 1, H200),
        (f"{MIGS[0]},3", "mig_with_parent", "3", 1, A100),
        (f"GPU3,{MIGS[2]}", "mig_with_parent", MIGS[2], 1, A100),
        ("3", "mig_enabled_gpu", "3", 0, A100),
        (f"{MIGS[0]},{MIGS[1]}", "mig_multiple", MIGS[1], 1, A100),
        ("1", "gpu_unhealthy", "1", 0, SICK),
        ("0,1", "gpu_unhealthy", "1", 1, SICK),
        (MIGS[0], "gpu_unhealthy", MIGS[0], 0, SICK_MIG),
    ],
)
def test_error_codes(mask: object, code: str, token: str | None, position: int | None, snapshot: GpuSnapshot) -> None:
    e = err(mask, snapshot)
    assert e.code == code
    assert code in MASK_ERROR_CODES
    if token is not None:
        assert e.token == token
        assert repr(token) in e.message
    assert e.position == position
    if position is not None:
        assert f"position {position}" in e.message
    problem = e.to_problem()
    assert (problem.code, problem.message) == (code, e.message)


def test_every_code_is_tested() -> None:
    # Keep this list and the parametrized table above in step.
    tested = {
        "empty_mask",
        "empty_entry",
        "whitespace",
        "bad_token",
        "negative_index",
        "index_out_of_range",
        "unknown_device",
        "ambiguous_prefix",
        "duplicate_device",
        "mig_with_parent",
        "mig_enabled_gpu",
        "mig_multiple",
        "gpu_unhealthy",
    }
    assert tested == set(MASK_ERROR_CODES)


def test_all_and_auto_leave_an_unhealthy_gpu_out() -> None:
    assert resolve_mask("all", SICK).uuids == (HETERO.gpus[0].uuid,)


def test_all_with_no_usable_gpu() -> None:
    only_mig = GpuSnapshot(simulated=True, source="t", gpus=[A100.gpus[3]])
    assert err("all", only_mig).code == "unknown_device"
    assert err("all", GpuSnapshot(simulated=True, source="t")).code == "unknown_device"


def test_duplicate_names_both_positions_and_device() -> None:
    e = err("0,GPU-61deac7a", H200)
    assert "'0' at position 0" in e.message and e.device == H200_UUID


def test_ambiguous_prefix_lists_candidates() -> None:
    e = err("GPU-a1000000-0000-4000-8000-00000000000", A100)
    assert all(u in e.message for u in A100_UUIDS)


# -- the real CUDA truncation cases ----------------------------------------------------------

CUDA = load_json("cuda_visible_devices.json")["results"]
EXPECTED_CODES = {
    "1": "index_out_of_range",
    "0,1": "index_out_of_range",
    "0,0": "duplicate_device",
    "GPU-nope": "unknown_device",
    "": "empty_mask",
    "-1": "negative_index",
}


@pytest.mark.parametrize("mask", sorted(CUDA))
def test_cuda_recording(mask: str) -> None:
    """Where CUDA saw fewer devices than the mask names (silent truncation), we refuse with a
    typed error; where it saw them all, we resolve to the same number of devices."""
    entries = mask.split(",") if mask else []
    cuda_count = int(CUDA[mask]["count"])
    if entries and cuda_count == len(entries):
        dm = resolve_mask(mask, H200)
        assert len(dm.devices) == cuda_count
        assert dm.to_cuda_visible_devices() == H200_UUID
    else:
        assert err(mask, H200).code == EXPECTED_CODES[mask]


def test_cuda_truncation_cases_are_all_covered() -> None:
    truncated = {m for m, r in CUDA.items() if int(r["count"]) < len(m.split(",")) or m == ""}
    assert truncated == set(EXPECTED_CODES)
    assert {"0,1", "0,0", "1", "GPU-nope"} <= truncated


# -- properties ------------------------------------------------------------------------------

A100_DEVICES = snapshot_devices(A100)


def _shortest_unique_prefix(dev: Device, devices: tuple[Device, ...]) -> str:
    others = [d.uuid for d in devices if d.kind == dev.kind and d.uuid != dev.uuid]
    for n in range(5, len(dev.uuid) + 1):
        if not any(o.startswith(dev.uuid[:n]) for o in others):
            return dev.uuid[:n]
    return dev.uuid


def _spellings(dev: Device, devices: tuple[Device, ...]) -> list[str]:
    out = [dev.uuid, _shortest_unique_prefix(dev, devices)]
    if dev.kind == "gpu":
        out += [str(dev.index), f"GPU{dev.index}"]
    return out


@st.composite
def valid_a100_masks(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """A valid mask over the A100 profile, each entry spelt any accepted way: (tokens, uuids)."""
    whole = [d for d in A100_DEVICES if d.kind == "gpu" and not d.mig_mode]
    migs = [d for d in A100_DEVICES if d.kind == "mig"]
    chosen = draw(st.lists(st.sampled_from(whole), unique_by=lambda d: d.uuid, max_size=3))
    if draw(st.booleans()) or not chosen:
        chosen.append(draw(st.sampled_from(migs)))
    chosen = draw(st.permutations(chosen))
    tokens = [draw(st.sampled_from(_spellings(d, A100_DEVICES))) for d in chosen]
    return tokens, [d.uuid for d in chosen]


@settings(max_examples=250, deadline=None)
@given(valid_a100_masks())
def test_masks_round_trip(case: tuple[list[str], list[str]]) -> None:
    tokens, uuids = case
    dm = resolve_mask(tokens, A100)
    assert list(dm.uuids) == uuids
    again = resolve_mask(dm.canonical_str(), A100)
    assert again.devices == dm.devices
    assert resolve_mask(list(dm.canonical), A100).devices == dm.devices
    assert resolve_mask(",".join(tokens), A100).devices == dm.devices


@settings(max_examples=250, deadline=None)
@given(valid_a100_masks(), st.randoms(use_true_random=False))
def test_permuting_the_mask_permutes_the_devices(case: tuple[list[str], list[str]], rnd: object) -> None:
    tokens, _ = case
    order = list(range(len(tokens)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    a = resolve_mask(tokens, A100)
    b = resolve_mask([tokens[i] for i in order], A100)
    assert list(b.uuids) == [a.uuids[i] for i in order]


def _synthetic(n: int) -> GpuSnapshot:
    return GpuSnapshot(
        simulated=True,
        source="t",
        gpus=[
            Gpu(
                index=i,
                uuid=f"GPU-{i:08x}-0000-4000-8000-{i:012x}",
                name="T",
                pci_bus_id=f"0000:{i:02x}:00.0",
                compute_capability=(8, 0),
                memory_total=1 << 30,
                memory_free=1 << 30,
                memory_used=0,
            )
            for i in range(n)
        ],
    )


@settings(max_examples=250, deadline=None)
@given(st.integers(0, 6), st.lists(st.integers(-3, 8), min_size=1, max_size=6))
def test_index_masks_never_truncate(n_gpus: int, indices: list[int]) -> None:
    """Generalises CUDA's recorded cases: a mask either names every entry's GPU exactly once or
    is refused; it is never silently shortened."""
    snap = _synthetic(n_gpus)
    mask = ",".join(map(str, indices))
    valid = all(0 <= i < n_gpus for i in indices) and len(set(indices)) == len(indices)
    if valid:
        assert [d.index for d in resolve_mask(mask, snap).devices] == indices
    else:
        code = err(mask, snap).code
        assert code in {"negative_index", "index_out_of_range", "duplicate_device"}


@settings(max_examples=250, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(st.text(max_size=12), max_size=4)))
def test_any_input_is_a_mask_or_a_typed_error(mask: str | list[str]) -> None:
    try:
        dm = resolve_mask(mask, A100)
    except MaskError as e:
        assert e.code in MASK_ERROR_CODES
    else:
        assert dm.devices and len(set(dm.uuids)) == len(dm.uuids)


def test_parse_mask_is_syntax_only() -> None:
    toks = parse_mask("7,GPU-x,MIG-y,GPU3")
    assert [(t.kind, t.index, t.position) for t in toks] == [
        ("index", 7, 0),
        ("gpu_uuid", None, 1),
        ("mig_uuid", None, 2),
        ("index", 3, 3),
    ]
