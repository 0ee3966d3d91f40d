"""``pool-managerd run --config FILE``: the daemon.

Exit status: 0 after SIGTERM/SIGINT, 1 when NATS is unreachable at start or closed for good,
2 for an invalid configuration or a nats-server below the supported version (at start, or
reached by a reconnect)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pool_managerd.config import ConfigError, load_config
from pool_managerd.core.errors import PoolManagerError
from pool_managerd.nats_version import NatsServerTooOld


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML or YAML file (POOL_MANAGERD_* env vars override it)")
    parser.add_argument("--log-format", choices=["json", "text"], default="json")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pool-managerd: invalid configuration:\n{exc.message}", file=sys.stderr)
        return 2
    from pool_managerd.runtime import logs
    from pool_managerd.runtime.daemon import Daemon

    logs.setup(config.log_level, json_logs=args.log_format == "json")
    daemon = Daemon(config)
    try:
        return asyncio.run(daemon.run_until_stopped())
    except NatsServerTooOld as exc:
        # One line, and before any pool was touched: like a bad configuration, it needs an operator.
        print(f"pool-managerd: {exc.message}", file=sys.stderr)
        return 2
    except PoolManagerError as exc:
        print(f"pool-managerd: {exc.message}", file=sys.stderr)
        return 1
