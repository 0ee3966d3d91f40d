"""A shortened run of the cluster faults (``bench/fleet_faults.py``, ``make fleet-faults``): a
3-node nats-server cluster with 3 replicas, two daemons as processes given all three URLs, a
retrying lease/release load, and each of the three servers killed -9 once and restarted."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from support.scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fleet_faults.py"


def _load() -> ModuleType:
    return load_script(BENCH, "poold_fleet_faults")


@pytest.mark.timeout(240)
async def test_killing_each_server_of_the_cluster_loses_nothing(tmp_path: Path) -> None:
    fleet = _load()
    result = await fleet.fleet_kills(tmp_path, load_s=0.5, clients_per_pool=1)
    print(fleet.report(result))
    assert fleet.problems(result) == []
    # Every server was killed once, work was accepted throughout, and clients had to retry.
    assert [k["server"] for k in result["kills"]] == ["poold-0", "poold-1", "poold-2"]
    assert result["accepted"] > 0 and result["events"] >= result["accepted"]
    # Each daemon sat on some server that was killed, so each moved to a survivor at least once.
    assert result["daemons_moved"] == ["node-a", "node-b"]
