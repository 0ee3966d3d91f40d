"""``place()``: mask + snapshot + sizes → the ``Placement`` a preload records. Pure.

The lifecycle machine calls this at preload and again before every restart, against the snapshot
of that moment, so a restart never reuses a stale split.
"""

from __future__ import annotations

from collections.abc import Sequence

from pool_managerd.contract.messages import GpuSnapshot, Placement
from pool_managerd.placement.devicemasks import Device, DeviceMask, resolve_mask, snapshot_devices
from pool_managerd.placement.hetero_split import PlanError, Policy, parse_policy, plan_split, to_placement
from pool_managerd.placement.units import format_bytes

AUTO = "auto"


def _check_size(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PlanError("bad_size", f"{what} must be a non-negative integer of bytes, got {value!r}")


def auto_mask(snapshot: GpuSnapshot, need: int, headroom: int, policy: Policy) -> tuple[DeviceMask, list[str]]:
    """Pick devices when no mask is given; returns the mask and why it was chosen.

    The single device (a GPU not in MIG mode, or a MIG instance) with the most free memory that
    holds ``need + headroom``; ties go to the lower NVML index. If none does (or the policy names
    more than one ratio), every GPU not in MIG mode, in index order.
    """
    # A device marked unhealthy by a fault is never picked (ctl gpu-clear puts it back).
    devices = tuple(d for d in snapshot_devices(snapshot) if d.healthy)
    whole = [d for d in devices if d.kind == "gpu" and not d.mig_mode]
    singles: list[Device] = [d for d in devices if (d.kind == "gpu" and not d.mig_mode) or d.kind == "mig"]
    wants_many = policy.ratios is not None and len(policy.ratios) != 1
    if not wants_many:
        fitting = [(pos, d) for pos, d in enumerate(singles) if need + headroom <= d.memory_free]
        if fitting:
            _, best = max(fitting, key=lambda pd: (pd[1].memory_free, -pd[0]))
            return DeviceMask(tokens=(AUTO,), devices=(best,)), [
                f"mask auto: {best.label} ({best.name}) has the most free memory "
                f"({format_bytes(best.memory_free)}) of the devices that hold "
                f"{format_bytes(need)} + headroom {format_bytes(headroom)}"
            ]
    if not whole:
        raise PlanError(
            "no_devices",
            "mask auto: no healthy GPU outside MIG mode to split over"
            + ("" if wants_many else ", and no single device holds the model"),
        )
    reason = (
        f"policy {policy} names {len(policy.ratios or ())} ratios"
        if wants_many
        else f"no single device holds {format_bytes(need)} + headroom {format_bytes(headroom)}"
    )
    return DeviceMask(tokens=(AUTO,), devices=tuple(whole)), [
        f"mask auto: {reason}; splitting over all {len(whole)} GPU(s) not in MIG mode"
    ]


def place(
    mask: str | Sequence[str] | None,
    snapshot: GpuSnapshot,
    model_bytes: int,
    context_bytes: int = 0,
    policy: str | Sequence[float] | Policy = "free",
    headroom: int = 0,
) -> Placement:
    """Validate ``mask`` against ``snapshot``, plan the split, and return the wire ``Placement``.

    ``mask`` None or ``"auto"`` picks devices (see :func:`auto_mask`). Raises
    :class:`~pool_managerd.placement.devicemasks.MaskError` or
    :class:`~pool_managerd.placement.hetero_split.PlanError`; both have ``.code``, ``.message``
    and a way to become wire ``Problem`` values. ``Placement.simulated`` copies the snapshot's.
    """
    _check_size("model_bytes", model_bytes)
    _check_size("context_bytes", context_bytes)
    _check_size("headroom", headroom)
    pol = parse_policy(policy)
    prefix: list[str] = []
    if mask is None or mask == AUTO:
        dm, prefix = auto_mask(snapshot, model_bytes + context_bytes, headroom, pol)
    else:
        dm = resolve_mask(mask, snapshot)
    split = plan_split(model_bytes, context_bytes, dm.devices, pol, headroom)
    return to_placement(split, dm, simulated=snapshot.simulated, explanation_prefix=prefix)
