"""``pool-managerd nats-config``: print the nats-server users and permissions (the shipped
``deploy/nats-server.conf``); passwords come from ``$POOLD_<ROLE>_PASSWORD`` when the server starts."""

from __future__ import annotations

import argparse
import sys

from pool_managerd.accounts import server_config
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.subjects import DEFAULT_PREFIX, Subjects


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"subject prefix (default: {DEFAULT_PREFIX})")


def run(args: argparse.Namespace) -> int:
    try:
        Subjects(args.prefix)
    except PoolManagerError as exc:
        print(f"pool-managerd nats-config: error: {exc.message}", file=sys.stderr)
        return 2
    sys.stdout.write(server_config(prefix=args.prefix))
    return 0
