"""The ``pool-managerd`` command. Each subcommand lives in its own module, imported lazily so
that ``pool-managerd --help`` and quick tools stay fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "schemas": ("pool_managerd.schemagen", "generate schemas/ from the wire contract and the table"),
    "plan": ("pool_managerd.plan_cli", "dry-run a placement: validate a mask and print the split plan"),
    "run": ("pool_managerd.run_cli", "run the daemon (embedded NATS when no URL is configured)"),
    "ctl": ("pool_managerd.ctl_cli", "send a command to a pool or node and print the reply"),
    "watch": ("pool_managerd.watch_cli", "live table of every pool, fed by the KV bucket and the event stream"),
    "dashboard": ("pool_managerd.dashboard_cli", "serve the web dashboard (a NATS websocket client) and print its URL"),
    "demo": ("pool_managerd.demo", "the scripted tour: embedded NATS, simulated GPUs, fake engines"),
    "fleet-demo": ("pool_managerd.fleet_demo", "two daemons on a 3-node NATS cluster: preload, owner killed, takeover"),
    "replay": ("pool_managerd.replay_cli", "rebuild pool states from the event log, check its invariants"),
    "export": ("pool_managerd.export_cli", "write the event stream as JSONL, replayable offline"),
    "nats-config": ("pool_managerd.nats_config_cli", "print the nats-server users and permissions (deploy/)"),
}
"""name → (module exposing ``add_arguments(parser)`` and ``run(args) -> int``, help)."""


class _Subcommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Subcommand:
    return cast(_Subcommand, importlib.import_module(SUBCOMMANDS[name][0]))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pool-managerd", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # Only the chosen subcommand's module is imported; the others show their help line only.
        if name == wanted:
            _load(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pool-managerd`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    if not args.command:
        parser.print_help()
        return 2
    return _load(args.command).run(args)


if __name__ == "__main__":
    raise SystemExit(main())
