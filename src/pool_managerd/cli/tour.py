"""Not a command: what the two scripted tours, ``demo`` and ``fleet-demo``, share.

A tour narrates steps, notes what did not hold, pauses between steps when someone watches at a
terminal, and ends with one line that says whether every step held; its command takes the same
``--interactive`` / ``--non-interactive`` switch and runs the tour with quiet daemon logs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any


class Narrator:
    """The voice of a tour: step headings, failures (kept for the exit status), pauses."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"   !! {text}", flush=True)

    async def pause(self) -> None:
        if self.interactive:
            # input() blocks: in a thread, so the tour's event printer keeps running meanwhile.
            await asyncio.get_running_loop().run_in_executor(None, input, "   (press Enter to continue) ")

    def finish(self, name: str, note: str = "") -> int:
        """Print the tour's last line and return its exit status (1 when a step did not hold)."""
        verdict = "complete" + note if not self.failures else f"FAILED: {'; '.join(self.failures)}"
        print(f"\n{name} {verdict}", flush=True)
        return 1 if self.failures else 0


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """``--interactive`` / ``--non-interactive``; neither: interactive only at a terminal."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--non-interactive", dest="interactive", action="store_false",
                      help="no pauses (the default when stdin is not a terminal)")  # fmt: skip
    mode.add_argument("--interactive", dest="interactive", action="store_true")
    parser.set_defaults(interactive=None)


def run_tour(args: argparse.Namespace, main: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    """Run ``main(args)`` to its exit status, with only the daemon's warnings logged (the tour's
    own lines are what a watcher reads)."""
    if args.interactive is None:
        args.interactive = sys.stdin.isatty()
    from pool_managerd.runtime import logs

    logs.setup("warning", json_logs=False)
    return asyncio.run(main(args))
