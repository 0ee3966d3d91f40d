"""``pool-managerd plan``: validate a device mask and print the split plan, without starting anything.

Examples::

    pool-managerd plan --gpus sim:hetero-24g-48g --mask 0,1 --model-bytes 40GiB --context-bytes 4GiB
    pool-managerd plan --gpus nvml --mask GPU-61deac7a --model-bytes 8GiB --json

Exit 0 with the plan; exit 2 with the reason (``{"error": {"code", "message"}}`` with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgspec

from pool_managerd.adapters.gpu_profiles import GpuSourceError, list_profiles, load_gpu_source
from pool_managerd.adapters.nvml import GpuUnavailable
from pool_managerd.cli.format import table
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import GpuSnapshot, Placement
from pool_managerd.placement import (
    POLICY_NAMES,
    format_bytes,
    parse_bytes,
    place,
    snapshot_devices,
)

EXIT_OK = 0
EXIT_INVALID = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``plan`` options."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument(
        "--gpus",
        default="nvml",
        metavar="SOURCE",
        help="GPU inventory: nvml (live), sim:<profile> (one of: "
        + ", ".join(list_profiles())
        + "), or a GpuSnapshot JSON file (default: nvml)",
    )
    parser.add_argument(
        "--mask",
        default=None,
        help="device mask: 0,1 | GPU0,GPU1 | GPU-<uuid or unique prefix> | MIG-<uuid> | all | auto (default: auto)",
    )
    parser.add_argument(
        "--model-bytes", required=True, metavar="SIZE", help="model weight bytes: 123456, 8GiB, 500MiB, 20G"
    )
    parser.add_argument(
        "--context-bytes", default="0", metavar="SIZE", help="KV cache/context overhead bytes (default 0)"
    )
    parser.add_argument("--policy", default="free", help=f"split policy: {' | '.join(POLICY_NAMES)} (default: free)")
    parser.add_argument(
        "--headroom-bytes", default="0", metavar="SIZE", help="bytes to leave free on every device (default 0)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan (or the error) as JSON")


def _render(snapshot: GpuSnapshot, placement: Placement, model: int, context: int, headroom: int) -> str:
    devices = {d.uuid: d for d in snapshot_devices(snapshot)}
    sim = " (SIMULATED)" if snapshot.simulated else ""
    lines = [
        f"GPU source: {snapshot.source}{sim}",
        f"need:       {format_bytes(model + context)} = model {format_bytes(model)} + context "
        f"{format_bytes(context)}; headroom {format_bytes(headroom)} per device",
        f"policy:     {placement.policy}",
        "",
    ]
    rows = [["#", "device", "name", "uuid", "free", "ratio", "budget", "spare"]]
    for i, (uuid, ratio, budget) in enumerate(zip(placement.uuids, placement.ratios, placement.budgets, strict=True)):
        d = devices[uuid]
        rows.append(
            [
                str(i),
                d.label,
                d.name,
                uuid,
                format_bytes(d.memory_free),
                f"{ratio:.4f}",
                format_bytes(budget),
                format_bytes(d.memory_free - headroom - budget),
            ]
        )
    lines += table(rows, right=frozenset({0, 4, 5, 6, 7}))
    tp = str(placement.tp_size) if placement.tp_size is not None else "(n/a: policy is not equal)"
    lines += [
        "",
        f"CUDA_VISIBLE_DEVICES={placement.cuda_visible_devices}",
        f"llama.cpp --tensor-split: {placement.tensor_split or '(none: one device)'}",
        f"vLLM --tensor-parallel-size: {tp}",
        "",
        "why:",
        *(f"  - {line}" for line in placement.explanation),
    ]
    return "\n".join(lines)


def _plan_json(snapshot: GpuSnapshot, placement: Placement, model: int, context: int, headroom: int) -> dict[str, Any]:
    devices = {d.uuid: d for d in snapshot_devices(snapshot)}
    return {
        "source": snapshot.source,
        "simulated": snapshot.simulated,
        "model_bytes": model,
        "context_bytes": context,
        "need_bytes": model + context,
        "headroom_bytes": headroom,
        "devices": [
            {
                "uuid": u,
                "label": devices[u].label,
                "name": devices[u].name,
                "memory_total": devices[u].memory_total,
                "memory_free": devices[u].memory_free,
                "compute_capability": list(devices[u].compute_capability),
                "ratio": r,
                "budget": b,
            }
            for u, r, b in zip(placement.uuids, placement.ratios, placement.budgets, strict=True)
        ],
        "placement": msgspec.to_builtins(placement),
    }


def _fail(args: argparse.Namespace, code: str, message: str) -> int:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"pool-managerd plan: error [{code}]: {message}", file=sys.stderr)
    return EXIT_INVALID


def run(args: argparse.Namespace) -> int:
    """Run ``pool-managerd plan``; returns the exit status."""
    try:
        model = parse_bytes(args.model_bytes)
        context = parse_bytes(args.context_bytes)
        headroom = parse_bytes(args.headroom_bytes)
        snapshot = load_gpu_source(args.gpus)
        placement = place(args.mask, snapshot, model, context, args.policy, headroom)
    except GpuUnavailable as exc:
        return _fail(args, exc.problem.code, exc.problem.message)
    except (GpuSourceError, PoolManagerError) as exc:
        return _fail(args, exc.code, exc.message)
    if args.json:
        print(json.dumps(_plan_json(snapshot, placement, model, context, headroom), indent=2))
    else:
        print(_render(snapshot, placement, model, context, headroom))
    return EXIT_OK
