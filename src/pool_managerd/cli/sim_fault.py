"""``pool-managerd sim-fault``: inject a GPU fault into a simulated inventory's driver.

Appends one line to ``<run_dir>/sim-gpu/faults.jsonl``, which the daemon running on that run dir
with a simulated inventory reads as NVML's event set would deliver the fault (see
``adapters/sim_gpus.py``). Only a simulated driver reads the file: a daemon on ``gpus = "nvml"``
never does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pool_managerd.adapters.gpu_faults import parse_fault_line
from pool_managerd.core.gpu_faults import FAULT_KINDS, classify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "inject a GPU fault into the simulated driver of a daemon's run dir"
    parser.add_argument("uuid", help="the simulated GPU's UUID (GPU-...)")
    parser.add_argument("--run-dir", type=Path, default=Path("run"), help="the daemon's run_dir (default: run)")
    parser.add_argument("--xid", type=int, help="an Xid (e.g. 79: fell off the bus, 48: double-bit ECC, 13: app)")
    parser.add_argument("--kind", choices=FAULT_KINDS, default=None, help="instead of an Xid (default: xid)")


def run(args: argparse.Namespace) -> int:
    kind = args.kind or "xid"
    doc: dict[str, object] = {"uuid": args.uuid, "kind": kind}
    if kind == "xid":
        doc["xid"] = args.xid
    line = json.dumps(doc).encode()
    fact = parse_fault_line(line)
    if fact is None:
        print("pool-managerd sim-fault: error: give a GPU UUID and --xid N (or --kind)", file=sys.stderr)
        return 2
    folder = args.run_dir / "sim-gpu"
    if not (folder / "gpus.json").is_file():
        print(f"pool-managerd sim-fault: error: {folder} is no simulated driver (is a daemon with a simulated "
              "inventory using this run dir?)", file=sys.stderr)  # fmt: skip
        return 2
    with (folder / "faults.jsonl").open("ab") as f:
        f.write(line + b"\n")
    decision = classify(fact.kind, fact.xid)
    print(f"{fact.uuid}: {decision.description} ({decision.fault_class}: {decision.action} its pools)")
    return 0
