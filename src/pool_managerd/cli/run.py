"""``pool-managerd run --config FILE``: the daemon.

Exit status: 0 after SIGTERM/SIGINT; 1 when the NATS connection closes for good; 2 for a setup
problem: an invalid configuration, no NATS connection at start, or a nats-server below the
supported version (at start, or reached by a reconnect)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pool_managerd.config import ConfigError, load_config
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.nats_version import NatsServerTooOld
from pool_managerd.runtime import heap  # stdlib only: cheap to import with the CLI

if TYPE_CHECKING:
    from pool_managerd.runtime.daemon import Daemon


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML or YAML file (POOL_MANAGERD_* env vars override it)")
    parser.add_argument("--log-format", choices=["json", "text"], default="json")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pool-managerd: invalid configuration:\n{exc.message}", file=sys.stderr)
        return 2
    from pool_managerd.adapters.embedded_nats import NatsServerError
    from pool_managerd.adapters.nats_connect import ConnectFailed
    from pool_managerd.adapters.replication import ReplicasUnavailable
    from pool_managerd.runtime import logs, profiling
    from pool_managerd.runtime.daemon import Daemon
    from pool_managerd.runtime.metrics import MetricsAddressUnusable

    logs.setup(config.log_level, json_logs=args.log_format == "json")
    profiling.install_from_env()
    heap.tune()
    daemon = Daemon(config)
    try:
        return asyncio.run(_serve(daemon))
    except (NatsServerTooOld, ConnectFailed, MetricsAddressUnusable, ReplicasUnavailable) as exc:
        # A server below the floor, wrong credentials, refused TLS, no server within
        # startup_timeout_s, a metrics address in use, replicas the server cannot hold: setup
        # problems found before any pool was touched, like an invalid configuration, so one line
        # and the same exit status.
        print(f"pool-managerd: {exc.message}", file=sys.stderr)
        return 2
    except NatsServerError as exc:
        print(f"pool-managerd: embedded nats-server: {exc}", file=sys.stderr)
        return 2
    except PoolManagerError as exc:
        print(f"pool-managerd: {exc.message}", file=sys.stderr)
        return 1


async def _serve(daemon: Daemon) -> int:
    """Run ``daemon`` until it stops; once it serves, the heap its start-up built is frozen
    (see ``runtime/heap.py``)."""
    tuner = heap.Heap(asyncio.get_running_loop())
    tuner.install()
    serving = asyncio.ensure_future(daemon.ready.wait())
    serving.add_done_callback(lambda task: None if task.cancelled() else tuner.freeze())
    try:
        return await daemon.run_until_stopped()
    finally:
        serving.cancel()
        tuner.uninstall()
