"""Placement: which GPUs a pool's engine gets and how a model is split over them. Pure.

``place(mask, snapshot, model_bytes, context_bytes, policy, headroom)`` is the one call the
lifecycle machine needs; the pieces (mask resolution, split planning, byte sizes) are public too.
"""

from pool_managerd.placement.devicemasks import (
    MASK_ERROR_CODES,
    Device,
    DeviceMask,
    MaskError,
    MaskToken,
    mask_placement,
    parse_mask,
    resolve_mask,
    snapshot_devices,
)
from pool_managerd.placement.hetero_split import (
    PLAN_ERROR_CODES,
    POLICY_NAMES,
    DeviceShare,
    PlanError,
    Policy,
    SplitPlan,
    parse_policy,
    plan_split,
    to_placement,
)
from pool_managerd.placement.place import AUTO, auto_mask, place
from pool_managerd.placement.units import SizeError, format_bytes, parse_bytes

__all__ = [
    "AUTO",
    "MASK_ERROR_CODES",
    "PLAN_ERROR_CODES",
    "POLICY_NAMES",
    "Device",
    "DeviceMask",
    "DeviceShare",
    "MaskError",
    "MaskToken",
    "PlanError",
    "Policy",
    "SizeError",
    "SplitPlan",
    "auto_mask",
    "format_bytes",
    "mask_placement",
    "parse_bytes",
    "parse_mask",
    "parse_policy",
    "place",
    "plan_split",
    "resolve_mask",
    "snapshot_devices",
    "to_placement",
]
