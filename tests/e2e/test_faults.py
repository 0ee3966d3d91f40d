"""A shortened run of the fault suite (``bench/faults.py``, ``make faults``): a few NATS restarts
under load, a daemon SIGKILLed at each spawn fault point, and a crash storm, each through a real
nats-server, the daemon as a process and real fake engines, with every invariant asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("poold_faults", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
async def test_a_short_fault_run_breaks_no_invariant(tmp_path: Path) -> None:
    faults = _load()
    result = await faults.run(tmp_path, nats_restarts_n=2, daemon_kills_n=3)
    print(faults.report(result))
    assert faults.problems(result) == []
    n, d, c = result["nats"], result["daemon"], result["storm"]
    # The faults did happen, and the work went on through them.
    assert n["restarts"] == 2 and len(n["recovery_s"]) == 2 and n["accepted"] > 0
    assert d["points"] == sorted(["spawn:after_fork", "spawn:after_record", "spawn:after_release"])
    assert len(d["ready_s"]) == 3
    assert c["crashes"] >= 2 and c["breaker"]
