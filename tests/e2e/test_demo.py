"""The demo runs to completion non-interactively: embedded NATS, simulated GPUs, fake engines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_to_completion_non_interactively(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A prefix other than the default: the tour must follow the configuration, not "poold.".
    demo = ["demo", "--non-interactive", "--run-dir", str(run_dir), "--prefix", "tour"]
    result = subprocess.run(
        [sys.executable, "-m", "pool_managerd", *demo],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "demo complete" in out
    # The tour's milestones, each an event that really arrived over NATS.
    assert "--tensor-split" in out  # big-70b was split over both simulated GPUs
    assert "rejected draining" in out  # a lease during the drain was refused with its reason
    assert "leases reached 0" in out  # the drain completed when the lease was released
    assert "embed now serves bge-large-v2" in out  # the reload took
    assert "engine_exited   ready -> restarting" in out  # the crash was noticed and supervised
    assert out.count("engine_ready    preloading -> ready") >= 5
    # The embedded server enforced the shipped accounts, and the tour needed nothing they refuse.
    assert (run_dir / "auth" / "admin.json").is_file()
    server_log = (run_dir / "nats.log").read_text()
    server_conf = (run_dir / "nats" / "nats-server.conf").read_text()
    assert "authorization" in server_conf and '"tour.cmd.' in server_conf and '"poold.' not in server_conf
    assert "Violation" not in server_log, server_log[-3000:]
    # The web dashboard was served against the embedded server's websocket listener.
    assert "dashboard: http://127.0.0.1:" in out
    assert "embedded NATS websocket at ws://127.0.0.1:" in out
