"""Heterogeneous split planning and ``place()``: formula, policies, refusals, properties."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.adapters.gpu_profiles import load_gpu_source
from pool_managerd.contract.messages import GpuSnapshot
from pool_managerd.placement import (
    PLAN_ERROR_CODES,
    MaskError,
    PlanError,
    Policy,
    parse_policy,
    place,
    plan_split,
    resolve_mask,
    to_placement,
)

GiB = 1024**3
MiB = 1024**2
HETERO = load_gpu_source("sim:hetero-24g-48g")
A100 = load_gpu_source("sim:a100-80g-x4-mig")
H200 = load_gpu_source("sim:h200-x1")
SMALL, BIG = resolve_mask("0,1", HETERO).devices


@dataclass(frozen=True)
class Dev:
    uuid: str
    memory_total: int
    memory_free: int


# -- the formula on the hetero profile -------------------------------------------------------


def test_free_policy_is_proportional_to_free_minus_headroom() -> None:
    headroom = 1 * GiB
    p = plan_split(40 * GiB, 4 * GiB, [SMALL, BIG], "free", headroom)
    u_small, u_big = SMALL.memory_free - headroom, BIG.memory_free - headroom
    assert p.ratios == pytest.approx((u_small / (u_small + u_big), u_big / (u_small + u_big)), abs=1e-12)
    need = 44 * GiB
    assert p.budgets == tuple(math.ceil(need * u / (u_small + u_big)) for u in (u_small, u_big))
    assert p.need_bytes == need
    assert p.tensor_split == ",".join(f"{r:.6g}" for r in p.ratios)
    assert p.tp_size is None
    assert p.policy == "free"
    assert all(s.spare == s.memory_free - headroom - s.budget for s in p.shares)
    assert p.shares[0].label == "GPU0"
    text = "\n".join(p.explanation)
    assert "policy free" in text and "--tensor-split" in text and "fits" in text


def test_total_policy() -> None:
    p = plan_split(30 * GiB, 0, [SMALL, BIG], "total")
    t = SMALL.memory_total + BIG.memory_total
    assert p.ratios == pytest.approx((SMALL.memory_total / t, BIG.memory_total / t), abs=1e-12)


def test_equal_policy_gives_vllm_tp_size() -> None:
    p = plan_split(30 * GiB, 2 * GiB, [SMALL, BIG], "equal")
    assert p.ratios == (0.5, 0.5)
    assert p.budgets == (16 * GiB, 16 * GiB)
    assert p.tp_size == 2
    assert p.tensor_split == "0.5,0.5"
    assert any("tensor-parallel-size 2" in line for line in p.explanation)


def test_explicit_ratios_string_and_list_agree() -> None:
    a = plan_split(20 * GiB, 0, [SMALL, BIG], "ratios:0.25,0.75")
    b = plan_split(20 * GiB, 0, [SMALL, BIG], [0.25, 0.75])
    assert a == b
    assert a.ratios == (0.25, 0.75) and a.budgets == (5 * GiB, 15 * GiB)
    assert a.policy == "ratios:0.25,0.75"
    assert parse_policy(a.policy) == Policy(name="ratios", ratios=(0.25, 0.75))


def test_ratios_within_tolerance_are_normalised() -> None:
    p = plan_split(10 * GiB, 0, [SMALL, BIG], "ratios:0.3333333,0.6666666")
    assert abs(sum(p.ratios) - 1) <= 1e-12


def test_mask_order_is_split_order() -> None:
    p = plan_split(30 * GiB, 0, [BIG, SMALL], "free")
    q = plan_split(30 * GiB, 0, [SMALL, BIG], "free")
    assert p.tensor_split == ",".join(reversed(q.tensor_split.split(",")))  # type: ignore[union-attr]


def test_single_device_means_no_split() -> None:
    p = plan_split(10 * GiB, 1 * GiB, [BIG], "free")
    assert p.ratios == (1.0,) and p.budgets == (11 * GiB,) and p.tensor_split is None and p.tp_size is None
    assert plan_split(10 * GiB, 0, [BIG], "equal").tp_size == 1
    assert plan_split(10 * GiB, 0, [BIG], "ratios:1").tensor_split is None


def test_plan_is_deterministic() -> None:
    assert plan_split(33 * GiB, 3 * GiB, [SMALL, BIG], "free", 512 * MiB) == plan_split(
        33 * GiB, 3 * GiB, [SMALL, BIG], "free", 512 * MiB
    )


def test_to_dict_is_json_ready() -> None:
    d = plan_split(10 * GiB, 0, [SMALL, BIG]).to_dict()
    assert d["devices"][1]["uuid"] == BIG.uuid and d["need_bytes"] == 10 * GiB


# -- refusals: every PlanError code ----------------------------------------------------------


def test_insufficient_vram_names_device_and_numbers() -> None:
    with pytest.raises(PlanError) as info:
        plan_split(46 * GiB, 0, [SMALL, BIG], "equal", 1 * GiB)
    e = info.value
    assert e.code == "insufficient_vram"
    assert e.device == SMALL.uuid
    assert SMALL.uuid in e.message and str(SMALL.memory_free) in e.message and str(23 * GiB) in e.message
    assert [p.device for p in e.to_problems()] == [SMALL.uuid]
    assert all(p.code == "insufficient_vram" for p in e.to_problems())


def test_insufficient_vram_lists_every_short_device() -> None:
    with pytest.raises(PlanError) as info:
        plan_split(80 * GiB, 0, [SMALL, BIG], "free")
    assert [p.device for p in info.value.problems] == [SMALL.uuid, BIG.uuid]


def test_headroom_alone_can_refuse() -> None:
    with pytest.raises(PlanError) as info:
        plan_split(0, 0, [SMALL], "free", SMALL.memory_free + 1)
    assert info.value.code == "insufficient_vram"


@pytest.mark.parametrize(
    "policy",
    [
        "ratios:0.6,0.3,0.1",  # count mismatch
        "ratios:0.6",
        [0.6, 0.5],  # sum
        "ratios:0.7,0.31",
        "ratios:1.2,-0.2",  # <= 0
        "ratios:1,0",
        "ratios:a,b",
        "ratios:",
        "ratios:nan,0.5",
        "ratios:inf,0",
        [True, False],
        [],
    ],
)
def test_bad_ratios(policy: str | list[float]) -> None:
    with pytest.raises(PlanError) as info:
        plan_split(1 * GiB, 0, [SMALL, BIG], policy)
    assert info.value.code == "bad_ratios"


@pytest.mark.parametrize("policy", ["fastest", "", "FREE", "ratio:0.5,0.5"])
def test_bad_policy(policy: str) -> None:
    with pytest.raises(PlanError) as info:
        plan_split(1 * GiB, 0, [SMALL, BIG], policy)
    assert info.value.code == "bad_policy"
    assert "free" in info.value.message


@pytest.mark.parametrize(
    ("model", "context", "headroom"), [(-1, 0, 0), (0, -5, 0), (0, 0, -1), (True, 0, 0), (1.5, 0, 0)]
)
def test_bad_size(model: int, context: int, headroom: int) -> None:
    with pytest.raises(PlanError) as info:
        plan_split(model, context, [SMALL], "free", headroom)
    assert info.value.code == "bad_size"
    with pytest.raises(PlanError) as info:
        place("0", HETERO, model, context, "free", headroom)
    assert info.value.code == "bad_size"


def test_no_devices() -> None:
    with pytest.raises(PlanError) as info:
        plan_split(1, 0, [], "free")
    assert info.value.code == "no_devices"


def test_every_plan_code_is_tested() -> None:
    assert set(PLAN_ERROR_CODES) == {"insufficient_vram", "bad_ratios", "bad_policy", "bad_size", "no_devices"}


def test_all_zero_weights_fall_back_to_equal() -> None:
    full = [Dev("GPU-a", 10, 0), Dev("GPU-b", 10, 0)]
    p = plan_split(0, 0, full, "free")
    assert p.ratios == (0.5, 0.5)
    assert any("falling back to equal" in line for line in p.explanation)
    with pytest.raises(PlanError):
        plan_split(1, 0, full, "free")


# -- place(): the lifecycle's one call -------------------------------------------------------


def test_place_with_mask() -> None:
    p = place("1,0", HETERO, 30 * GiB, 2 * GiB, "free", 1 * GiB)
    assert p.uuids == [BIG.uuid, SMALL.uuid] and p.mask == p.uuids
    assert p.cuda_visible_devices == f"{BIG.uuid},{SMALL.uuid}"
    assert p.simulated is True and p.policy == "free"
    assert len(p.budgets) == 2 and p.tensor_split is not None
    assert p.explanation[0].startswith("need ")


def test_place_auto_picks_the_roomiest_single_gpu() -> None:
    p = place(None, HETERO, 10 * GiB)
    assert p.uuids == [BIG.uuid] and p.tensor_split is None
    assert p.explanation[0].startswith("mask auto: GPU1")
    assert place("auto", HETERO, 10 * GiB) == p


def test_place_auto_ties_go_to_the_lower_index() -> None:
    assert place(None, A100, 75 * GiB).uuids == [A100.gpus[0].uuid]


def test_place_auto_splits_when_nothing_fits_alone() -> None:
    p = place(None, HETERO, 60 * GiB)
    assert p.uuids == [SMALL.uuid, BIG.uuid]
    assert "no single device holds" in p.explanation[0]
    q = place(None, A100, 200 * GiB)
    assert q.uuids == [g.uuid for g in A100.gpus[:3]]  # the MIG-mode GPU is left out


def test_place_auto_with_several_ratios_uses_all_gpus() -> None:
    p = place(None, HETERO, 1 * GiB, 0, "ratios:0.5,0.5")
    assert p.uuids == [SMALL.uuid, BIG.uuid] and p.ratios == [0.5, 0.5]


def test_place_auto_can_pick_a_mig_instance() -> None:
    only_mig = GpuSnapshot(simulated=True, source="t", gpus=[A100.gpus[3]])
    p = place(None, only_mig, 30 * GiB)
    assert p.uuids == [A100.gpus[3].mig_instances[0].uuid]
    with pytest.raises(PlanError) as info:
        place(None, only_mig, 50 * GiB)
    assert info.value.code == "no_devices"


def test_place_auto_refuses_when_even_all_gpus_are_short() -> None:
    with pytest.raises(PlanError) as info:
        place(None, H200, 200 * GiB)
    assert info.value.code == "insufficient_vram"


def test_place_raises_mask_errors() -> None:
    with pytest.raises(MaskError) as info:
        place("0,1", H200, 1 * GiB)
    assert info.value.code == "index_out_of_range"


def test_to_placement_checks_the_mask_matches() -> None:
    p = plan_split(1 * GiB, 0, [SMALL, BIG])
    with pytest.raises(ValueError, match="different devices"):
        to_placement(p, resolve_mask("1,0", HETERO))
    assert to_placement(p).mask == [SMALL.uuid, BIG.uuid]


# -- properties ------------------------------------------------------------------------------

SIZE = st.integers(0, 2**41)


@st.composite
def devices(draw: st.DrawFn, min_size: int = 1) -> list[Dev]:
    n = draw(st.integers(min_size, 6))
    out = []
    for i in range(n):
        total = draw(st.integers(1, 2**38))
        free = draw(st.integers(0, total))
        out.append(Dev(f"GPU-{i:04d}", total, free))
    return out


@st.composite
def policies(draw: st.DrawFn, n: int) -> str | list[float]:
    kind = draw(st.sampled_from(["free", "total", "equal", "ratios"]))
    if kind != "ratios":
        return kind
    weights = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    return [w / sum(weights) for w in weights]


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Dev], str | list[float], int, int, int]:
    """Mostly needs that fit the free memory (so the plan's shape gets checked), sometimes any."""
    devs = draw(devices())
    policy = draw(policies(len(devs)))
    if draw(st.integers(0, 9)) == 0:
        return devs, policy, draw(SIZE), draw(SIZE), draw(st.integers(0, 2**32))
    headroom = draw(st.integers(0, min(d.memory_free for d in devs)))
    need = draw(st.integers(0, sum(d.memory_free - headroom for d in devs)))
    context = draw(st.integers(0, need))
    return devs, policy, need - context, context, headroom


def _try(devs: list[Dev], policy: str | list[float], model: int, context: int, headroom: int):  # type: ignore[no-untyped-def]
    try:
        return plan_split(model, context, devs, policy, headroom)
    except PlanError as e:
        assert e.code == "insufficient_vram"
        return e.code


@settings(max_examples=250, deadline=None)
@given(cases())
def test_ratios_sum_to_one(case: tuple[list[Dev], str | list[float], int, int, int]) -> None:
    devs, policy, model, context, headroom = case
    p = _try(devs, policy, model, context, headroom)  # smaller needs: mostly successes
    if isinstance(p, str):
        return
    assert abs(sum(p.ratios) - 1.0) <= 1e-9
    assert len(p.ratios) == len(devs) and all(r >= 0 for r in p.ratios)


@settings(max_examples=250, deadline=None)
@given(cases())
def test_no_budget_exceeds_free_minus_headroom(case: tuple[list[Dev], str | list[float], int, int, int]) -> None:
    devs, policy, model, context, headroom = case
    p = _try(devs, policy, model, context, headroom)
    if isinstance(p, str):
        return
    for d, b in zip(devs, p.budgets, strict=True):
        assert 0 <= b <= d.memory_free - headroom
    # budgets are rounded up: they cover the need, by less than a byte per device
    assert 0 <= sum(p.budgets) - p.need_bytes < len(devs)


@settings(max_examples=250, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_permuting_the_mask_permutes_the_plan(
    case: tuple[list[Dev], str | list[float], int, int, int], rnd: object
) -> None:
    devs, policy, model, context, headroom = case
    order = list(range(len(devs)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    permuted_policy = [policy[i] for i in order] if isinstance(policy, list) else policy
    a = _try(devs, policy, model, context, headroom)
    b = _try([devs[i] for i in order], permuted_policy, model, context, headroom)
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert b.shares == tuple(a.shares[i] for i in order)
    assert b.tensor_split == (None if a.tensor_split is None else ",".join(a.tensor_split.split(",")[i] for i in order))


@settings(max_examples=250, deadline=None)
@given(devices(), st.data(), st.integers(1, 2**36))
def test_more_free_memory_never_lowers_a_share(devs: list[Dev], data: st.DataObject, delta: int) -> None:
    # Draw a case that fits (headroom within every device, need within the sum), then grow one device.
    headroom = data.draw(st.integers(0, min(d.memory_free for d in devs)))
    need = data.draw(st.integers(0, sum(d.memory_free - headroom for d in devs)))
    k = data.draw(st.integers(0, len(devs) - 1))
    grown = list(devs)
    grown[k] = Dev(devs[k].uuid, devs[k].memory_total + delta, devs[k].memory_free + delta)
    before = plan_split(need, 0, devs, "free", headroom)
    after = plan_split(need, 0, grown, "free", headroom)  # more memory never turns a fit into a refusal
    assert after.ratios[k] >= before.ratios[k]
    assert after.budgets[k] >= before.budgets[k]


@settings(max_examples=250, deadline=None)
@given(devices(), SIZE, st.integers(0, 2**36))
def test_free_policy_fits_exactly_when_the_sum_fits(devs: list[Dev], need: int, headroom: int) -> None:
    """The free policy refuses only when it must: total usable memory short, or a device that
    cannot even keep its headroom."""
    need //= 16
    usable = sum(max(0, d.memory_free - headroom) for d in devs)
    must_fit = need <= usable and all(d.memory_free >= headroom for d in devs)
    assert (not isinstance(_try(devs, "free", need, 0, headroom), str)) == must_fit
