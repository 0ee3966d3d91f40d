"""A shortened run of the fault suite (``bench/faults.py``, ``make faults``): a few NATS restarts
under load, a daemon SIGKILLed at each spawn fault point, and a crash storm, each through a real
nats-server, the daemon as a process and real fake engines, with every invariant asserted."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from support.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"


def _load() -> ModuleType:
    return load_script(BENCH, "poold_faults")


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
