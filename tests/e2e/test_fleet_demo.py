"""``pool-managerd fleet-demo`` runs to completion non-interactively (what ``make fleet-demo`` and
CI run): a 3-node cluster with the shipped users, two daemon processes, the owner killed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pool_managerd.cli.fleet_demo import takeover_supported


@pytest.mark.timeout(180)
def test_fleet_demo_runs_to_completion_non_interactively(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pool_managerd", "fleet-demo", "--non-interactive", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-3000:]
    assert "fleet demo complete" in out
    # Both hosts started on the cluster and the preload reached ready on the owner.
    for node in ("node-a", "node-b"):
        assert re.search(rf"{node}\s+node\s+#\d+\s+daemon_started", out), node
    assert "chat is ready on node-a" in out
    assert "2 node(s), 2 live" in out  # the fleet table before the kill
    assert "replay exit status 0" in out
    final = out[out.rindex("== The fleet now") :]
    assert "node-a  stale" in final and "node-b  live" in final
    if takeover_supported():
        # The standby claimed the pool with the next epoch and started its own engine.
        assert re.search(r"node-b\s+chat\s+#\d+\s+pool_claimed\s+node=node-b epoch=2 previous_node=node-a", out)
        assert "chat is ready on node-b" in out
        assert "chat   node-b  ready" in final
    else:
        assert "Standby takeover: SKIPPED" in out and "(skipped: takeover)" in out
    # Every node of the cluster enforced the shipped accounts, and nothing the demo did was refused.
    assert (run_dir / "auth" / "daemon.json").is_file()
    for index in range(3):
        conf = (run_dir / "nats" / f"poold-{index}" / "nats-server.conf").read_text()
        assert "authorization" in conf
        log = (run_dir / f"poold-{index}.log").read_text()
        assert "Violation" not in log, log[-3000:]
