"""The ``pool-managerd`` command. Each subcommand lives in its own module of this package,
imported lazily so that ``pool-managerd --help`` and quick tools stay fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "schemas": ("pool_managerd.cli.schemas", "generate schemas/ from the wire contract and the table"),
    "plan": ("pool_managerd.cli.plan", "dry-run a placement: validate a mask and print the split plan"),
    "run": ("pool_managerd.cli.run", "run the daemon (embedded NATS when no URL is configured)"),
    "ctl": ("pool_managerd.cli.ctl", "send a command to a pool or node and print the reply"),
    "watch": ("pool_managerd.cli.watch", "live table of every pool, fed by the KV bucket and the event stream"),
    "dashboard": ("pool_managerd.cli.dashboard", "serve the web dashboard (a NATS websocket client) and print its URL"),
    "demo": ("pool_managerd.cli.demo", "the scripted tour: embedded NATS, simulated GPUs, fake engines"),
    "fleet-demo": ("pool_managerd.cli.fleet_demo", "two daemons on a 3-node NATS cluster: owner killed, takeover"),
    "replay": ("pool_managerd.cli.replay", "rebuild pool states from the event log, check its invariants"),
    "export": ("pool_managerd.cli.replay", "write the event stream as JSONL, replayable offline"),
    "nats-config": ("pool_managerd.cli.nats_config", "print the nats-server users and permissions (deploy/)"),
    "sim-fault": (
        "pool_managerd.cli.sim_fault",
        "inject a GPU fault (Xid, ECC, off the bus) into a simulated inventory",
    ),
}
"""name → (module exposing ``add_arguments(parser)`` and ``run(args) -> int``, help)."""

_ENTRY_NAMES: dict[str, tuple[str, str]] = {"export": ("add_export_arguments", "run_export")}
"""Subcommands whose module is shared with another: the names of their two functions there
(``export`` reads the stream exactly as ``replay`` does, so both live in one module)."""


class _Subcommand(NamedTuple):
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _load(name: str) -> _Subcommand:
    module = importlib.import_module(SUBCOMMANDS[name][0])
    add, run = _ENTRY_NAMES.get(name, ("add_arguments", "run"))
    return _Subcommand(getattr(module, add), getattr(module, run))


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
