"""``pool-managerd export``: the event stream as JSONL (see :mod:`pool_managerd.replay_cli`)."""

from __future__ import annotations

import argparse

from pool_managerd.replay_cli import add_export_arguments, run_export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_export_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_export(args)
