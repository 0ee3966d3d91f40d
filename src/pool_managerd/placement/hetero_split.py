"""Split one model over several (possibly different) GPUs, or refuse and say why. Pure.

The formula, exactly:

* ``need = model_bytes + context_bytes``. The context (KV cache, compute buffers) is split in the
  same proportion as the weights: llama.cpp's ``--tensor-split`` assigns whole layers, and each
  layer carries its own slice of the KV cache; vLLM's tensor parallelism shards both equally.
* Each device gets a weight ``w_i`` from the policy:

  - ``free``: ``max(0, free_i - headroom)``, the memory it can actually give (so the plan fits
    whenever the sum fits);
  - ``total``: ``total_i``;
  - ``equal``: 1 each (what vLLM tensor parallelism needs);
  - ``ratios:a,b,...`` or a list: the given ratios, one per device in mask order, each > 0,
    summing to 1 within 1e-6.

  If every weight is 0 the shares fall back to equal (and the fit check then refuses).
* ``ratio_i = w_i / Σw`` in exact rational arithmetic, so the plan does not depend on the order
  the devices are listed in (permuting the mask permutes the plan) and ratios sum to 1.
* ``budget_i = ceil(ratio_i * need)`` bytes: rounded up, so the budgets cover the need.
* Refuse (``insufficient_vram``) when ``budget_i + headroom > free_i`` for any device.

``--tensor-split`` is the ratios in mask order; one device means no split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import Placement, Problem
from pool_managerd.placement.units import format_bytes

if TYPE_CHECKING:
    from pool_managerd.placement.devicemasks import DeviceMask

PLAN_ERROR_CODES: tuple[str, ...] = (
    "insufficient_vram",
    "bad_ratios",
    "bad_policy",
    "bad_size",
    "no_devices",
)
"""Every code a :class:`PlanError` can carry. Stable: clients may switch on them."""

PolicyName = Literal["free", "total", "equal", "ratios"]
POLICY_NAMES: tuple[str, ...] = ("free", "total", "equal", "ratios:<r1>,<r2>,...")
RATIO_SUM_TOLERANCE = 1e-6


class PlanError(PoolManagerError):
    """A split that cannot be made. ``code`` is one of :data:`PLAN_ERROR_CODES`.

    ``problems`` lists one :class:`~pool_managerd.contract.messages.Problem` per offending device for
    ``insufficient_vram`` (and one for the whole plan otherwise).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        device: str | None = None,
        problems: Sequence[Problem] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.device = device
        self.problems: tuple[Problem, ...] = tuple(problems) or (Problem(code=code, message=message, device=device),)

    def to_problems(self) -> list[Problem]:
        """This error as wire ``Problem`` values."""
        return list(self.problems)


class MemoryDevice(Protocol):
    """What the planner needs to know of a device (``devicemasks.Device`` has it)."""

    @property
    def uuid(self) -> str: ...
    @property
    def memory_total(self) -> int: ...
    @property
    def memory_free(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed split policy. ``str(policy)`` is its canonical spelling."""

    name: PolicyName
    ratios: tuple[float, ...] | None = None

    def __str__(self) -> str:
        if self.name == "ratios" and self.ratios is not None:
            return "ratios:" + ",".join(repr(r) for r in self.ratios)
        return self.name


@dataclass(frozen=True, slots=True)
class DeviceShare:
    """One device's part of a plan."""

    uuid: str
    label: str
    memory_total: int
    memory_free: int
    ratio: float
    budget: int
    """Bytes this device is planned to hold: ``ceil(ratio * need)``."""
    spare: int
    """``free - headroom - budget``; negative only in a refused plan."""


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """A split of ``need = model_bytes + context_bytes`` over devices in mask order."""

    policy: str
    model_bytes: int
    context_bytes: int
    headroom: int
    shares: tuple[DeviceShare, ...]
    tensor_split: str | None
    """llama.cpp ``--tensor-split``: proportions in mask order; None for a single device."""
    tp_size: int | None
    """vLLM ``--tensor-parallel-size`` when the policy is ``equal``; None otherwise."""
    explanation: tuple[str, ...]

    @property
    def need_bytes(self) -> int:
        """Model plus context bytes: what the budgets cover."""
        return self.model_bytes + self.context_bytes

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each device's ratio, in mask order; they sum to 1."""
        return tuple(s.ratio for s in self.shares)

    @property
    def budgets(self) -> tuple[int, ...]:
        """Each device's byte budget, in mask order."""
        return tuple(s.budget for s in self.shares)

    @property
    def uuids(self) -> tuple[str, ...]:
        """Device UUIDs in mask order."""
        return tuple(s.uuid for s in self.shares)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "policy": self.policy,
            "model_bytes": self.model_bytes,
            "context_bytes": self.context_bytes,
            "need_bytes": self.need_bytes,
            "headroom_bytes": self.headroom,
            "devices": [
                {
                    "uuid": s.uuid,
                    "label": s.label,
                    "memory_total": s.memory_total,
                    "memory_free": s.memory_free,
                    "ratio": s.ratio,
                    "budget": s.budget,
                    "spare": s.spare,
                }
                for s in self.shares
            ],
            "tensor_split": self.tensor_split,
            "tp_size": self.tp_size,
            "explanation": list(self.explanation),
        }


# --------------------------------------------------------------------------------------------
# Policy parsing
# --------------------------------------------------------------------------------------------


def _check_ratio_values(values: Sequence[float], shown: str) -> tuple[float, ...]:
    if not values:
        raise PlanError("bad_ratios", f"policy {shown!r} gives no ratios")
    for v in values:
        if not math.isfinite(v) or v <= 0:
            raise PlanError("bad_ratios", f"policy {shown!r}: every ratio must be > 0, got {v:g}")
    total = sum((Fraction(v) for v in values), Fraction(0))
    if abs(total - 1) > Fraction(RATIO_SUM_TOLERANCE):
        raise PlanError(
            "bad_ratios",
            f"policy {shown!r}: ratios sum to {float(total):.9g}, not 1 (tolerance {RATIO_SUM_TOLERANCE:g})",
        )
    return tuple(float(v) for v in values)


def parse_policy(policy: str | Sequence[float] | Policy) -> Policy:
    """``"free"``, ``"total"``, ``"equal"``, ``"ratios:0.6,0.4"`` or ``[0.6, 0.4]`` → :class:`Policy`.

    Raises :class:`PlanError` ``bad_policy`` for an unknown name and ``bad_ratios`` for ratios
    that are not numbers, not > 0 or do not sum to 1 within 1e-6. The count is checked by
    :func:`plan_split`, which knows the devices.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        if policy in ("free", "total", "equal"):
            return Policy(name=policy)  # type: ignore[arg-type]
        if policy.startswith("ratios:"):
            parts = policy[len("ratios:") :].split(",")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise PlanError(
                    "bad_ratios",
                    f"policy {policy!r}: ratios must be numbers, e.g. ratios:0.6,0.4",
                ) from None
            return Policy(name="ratios", ratios=_check_ratio_values(values, policy))
        raise PlanError(
            "bad_policy",
            f"unknown split policy {policy!r}; use one of {', '.join(POLICY_NAMES)}",
        )
    values_list: list[float] = []
    for v in policy:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PlanError("bad_ratios", f"ratios must be numbers, got {v!r}")
        values_list.append(float(v))
    return Policy(name="ratios", ratios=_check_ratio_values(values_list, repr(list(policy))))


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _label(dev: MemoryDevice) -> str:
    label = getattr(dev, "label", None)
    return label if isinstance(label, str) and label else dev.uuid[:12]


def _fmt_ratio(r: float) -> str:
    return f"{r:.6g}"


def plan_split(
    model_bytes: int,
    context_bytes: int,
    devices: Sequence[MemoryDevice],
    policy: str | Sequence[float] | Policy = "free",
    headroom: int = 0,
) -> SplitPlan:
    """Split ``model_bytes + context_bytes`` over ``devices`` (resolved, in mask order).

    ``headroom`` is bytes to leave free on every device (CUDA context, fragmentation). See the
    module docstring for the exact formula. Deterministic; raises :class:`PlanError`
    (``bad_size``, ``bad_policy``, ``bad_ratios``, ``no_devices``, ``insufficient_vram``).
    """
    for what, value in (("model_bytes", model_bytes), ("context_bytes", context_bytes), ("headroom", headroom)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PlanError("bad_size", f"{what} must be a non-negative integer of bytes, got {value!r}")
    pol = parse_policy(policy)
    if not devices:
        raise PlanError("no_devices", "cannot plan a split over no devices")
    n = len(devices)
    need = model_bytes + context_bytes
    why: list[str] = [
        f"need {format_bytes(need)} = model {format_bytes(model_bytes)} + context/KV "
        f"{format_bytes(context_bytes)}; context is split in the same proportion as the weights",
    ]

    weights: list[Fraction]
    if pol.name == "free":
        weights = [Fraction(max(0, d.memory_free - headroom)) for d in devices]
        basis = ", ".join(f"{_label(d)} {format_bytes(max(0, d.memory_free - headroom))}" for d in devices)
        why.append(f"policy free: shares proportional to free VRAM minus headroom {format_bytes(headroom)} ({basis})")
    elif pol.name == "total":
        weights = [Fraction(d.memory_total) for d in devices]
        basis = ", ".join(f"{_label(d)} {format_bytes(d.memory_total)}" for d in devices)
        why.append(f"policy total: shares proportional to total VRAM ({basis})")
    elif pol.name == "equal":
        weights = [Fraction(1)] * n
        why.append(f"policy equal: each of the {n} device(s) gets 1/{n}")
    else:
        assert pol.ratios is not None
        if len(pol.ratios) != n:
            raise PlanError(
                "bad_ratios",
                f"policy {pol}: {len(pol.ratios)} ratio(s) for {n} device(s); give one per mask entry, in mask order",
            )
        weights = [Fraction(r) for r in pol.ratios]
        why.append(f"policy {pol}: ratios as given, in mask order")

    total_w = sum(weights, Fraction(0))
    if total_w == 0:
        weights = [Fraction(1)] * n
        total_w = Fraction(n)
        why.append("every device has zero weight under this policy; falling back to equal shares")
    exact = [w / total_w for w in weights]
    budgets = [math.ceil(r * need) for r in exact]
    shares = tuple(
        DeviceShare(
            uuid=d.uuid,
            label=_label(d),
            memory_total=d.memory_total,
            memory_free=d.memory_free,
            ratio=float(r),
            budget=b,
            spare=d.memory_free - headroom - b,
        )
        for d, r, b in zip(devices, exact, budgets, strict=True)
    )

    short: list[Problem] = []
    for s in shares:
        verdict = "fits" if s.spare >= 0 else "DOES NOT FIT"
        why.append(
            f"{s.label} ({s.uuid}): ratio {_fmt_ratio(s.ratio)} -> budget {format_bytes(s.budget)}"
            f" + headroom {format_bytes(headroom)} of {format_bytes(s.memory_free)} free: {verdict}"
        )
        if s.spare < 0:
            short.append(
                Problem(
                    code="insufficient_vram",
                    message=(
                        f"{s.label} ({s.uuid}) needs {s.budget} B + headroom {headroom} B = "
                        f"{s.budget + headroom} B but has {s.memory_free} B free "
                        f"({format_bytes(s.budget + headroom)} > {format_bytes(s.memory_free)})"
                    ),
                    device=s.uuid,
                )
            )
    if short:
        raise PlanError(
            "insufficient_vram",
            f"insufficient VRAM for {format_bytes(need)} with policy {pol}: " + "; ".join(p.message for p in short),
            device=short[0].device,
            problems=short,
        )

    if n == 1:
        tensor_split = None
        why.append("one device: no tensor split")
    else:
        tensor_split = ",".join(_fmt_ratio(s.ratio) for s in shares)
        why.append(f"llama.cpp --tensor-split {tensor_split} (proportions in mask order)")
    if pol.name == "equal":
        tp_size: int | None = n
        why.append(
            f"vLLM --tensor-parallel-size {n}: equal shares; the model's attention heads must be divisible by {n}"
        )
    else:
        tp_size = None
        if n > 1:
            why.append("vLLM tensor parallelism needs equal shares: use policy equal for vLLM")
    return SplitPlan(
        policy=str(pol),
        model_bytes=model_bytes,
        context_bytes=context_bytes,
        headroom=headroom,
        shares=shares,
        tensor_split=tensor_split,
        tp_size=tp_size,
        explanation=tuple(why),
    )


def to_placement(
    split: SplitPlan,
    mask: DeviceMask | None = None,
    *,
    simulated: bool = False,
    explanation_prefix: Sequence[str] = (),
) -> Placement:
    """The wire ``Placement`` for a plan. ``mask`` supplies the canonical tokens; without it the
    plan's UUIDs are used (they are the canonical tokens anyway)."""
    uuids = list(split.uuids)
    if mask is not None and list(mask.uuids) != uuids:
        raise ValueError("mask and plan name different devices")
    tokens = list(mask.canonical) if mask is not None else uuids
    return Placement(
        mask=tokens,
        uuids=uuids,
        cuda_visible_devices=",".join(uuids),
        budgets=list(split.budgets),
        ratios=list(split.ratios),
        policy=split.policy,
        tensor_split=split.tensor_split,
        tp_size=split.tp_size,
        explanation=[*explanation_prefix, *split.explanation],
        simulated=simulated,
    )
