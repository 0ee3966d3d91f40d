"""GPU faults: what each kind of critical GPU event means for the pools on that GPU. Pure.

The classes follow NVIDIA's Xid catalogue (docs.nvidia.com/deploy/xid-errors): an Xid names
what the driver saw, and its "action" column says whether the application, the GPU or the
node needs attention. Three classes:

* ``application``: the GPU is fine, one application misbehaved (13 graphics engine exception,
  31 memory page fault, 43 GPU stopped processing, 45 preemptive cleanup). The device stays
  healthy and no pool is touched: the engine that faulted exits or stops answering, and
  supervision restarts it like any crash.
* ``drain``: the device still works but must be reset or inspected soon (63 row remapping
  pending, 74 NVLink error, 92 high single-bit ECC rate, 94 contained ECC error). The device
  is marked unhealthy and the pools on it are drained within the deadline, so the requests in
  flight finish; nothing new is placed on it.
* ``stop``: the device's results can no longer be trusted, or it is gone (48 double-bit ECC,
  64 row remapping failure, 79 fell off the bus, 95 uncontained ECC error, 119 GSP RPC timeout,
  120 GSP error, a lost handle, a double-bit ECC event). The device is marked unhealthy and the
  pools on it are stopped at once.

An Xid not listed is treated as ``drain``: NVML reports only critical Xids, and a device that
raised one we do not know is kept out of new placements without cutting its requests short.
An unhealthy device stays so until it recovers (a restarted daemon keeps it unhealthy: the
fault is a node event) and an operator clears it (``pool-managerd ctl gpu-clear <uuid>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["xid", "ecc_dbe", "fell_off_bus", "handle_lost"]
FaultClass = Literal["application", "drain", "stop"]
FaultAction = Literal["none", "drain", "stop"]

FAULT_KINDS: tuple[FaultKind, ...] = ("xid", "ecc_dbe", "fell_off_bus", "handle_lost")

APPLICATION_XIDS = frozenset({13, 31, 43, 45})
DRAIN_XIDS = frozenset({63, 74, 92, 94})
STOP_XIDS = frozenset({48, 64, 79, 95, 119, 120})

XID_NAMES: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    63: "row remapping pending",
    64: "row remapping failure",
    74: "NVLink error",
    79: "GPU fell off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

DEFAULT_DRAIN_DEADLINE_S = 30.0


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What a fault does: its class, whether the device becomes unhealthy, the pool action."""

    fault_class: FaultClass
    unhealthy: bool
    action: FaultAction
    description: str


def classify(kind: FaultKind, xid: int | None = None) -> FaultDecision:
    """The decision for one fault (see the module docstring)."""
    if kind == "ecc_dbe":
        return FaultDecision("stop", True, "stop", "double-bit ECC error")
    if kind == "fell_off_bus":
        return FaultDecision("stop", True, "stop", "GPU fell off the bus")
    if kind == "handle_lost":
        return FaultDecision("stop", True, "stop", "GPU handle lost")
    name = XID_NAMES.get(xid or 0, "unlisted Xid")
    what = f"Xid {xid}: {name}"
    if xid in APPLICATION_XIDS:
        return FaultDecision("application", False, "none", what)
    if xid in STOP_XIDS:
        return FaultDecision("stop", True, "stop", what)
    return FaultDecision("drain", True, "drain", what)


def affected(placements: dict[str, list[str]], uuid: str) -> list[str]:
    """The pools whose placement (pool → GPU UUIDs) includes ``uuid``, sorted."""
    return sorted(pool for pool, uuids in placements.items() if uuid in uuids)
