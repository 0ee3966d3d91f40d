"""Fault points: named places where the daemon can be made to die on purpose.

``POOL_MANAGERD_FAULTS=spawn:after_fork,...`` makes the process SIGKILL itself when it reaches
one of the named points, so the fault suite and the recovery tests can hit a window of a few
microseconds every time instead of by luck. Unset (the default), a fault point costs one
environment lookup. The points:

* ``spawn:after_fork``: the engine's process exists (held at its gate), nothing is recorded;
* ``spawn:after_record``: the spawn record names it, the log does not yet;
* ``spawn:after_release``: the log names it and it has been let run, before it is probed.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "POOL_MANAGERD_FAULTS"
POINTS = frozenset({"spawn:after_fork", "spawn:after_record", "spawn:after_release"})

log = logging.getLogger(__name__)


def fault_point(name: str) -> None:
    """SIGKILL this process now if ``name`` is armed in ``$POOL_MANAGERD_FAULTS``."""
    armed = os.environ.get(ENV)
    if armed and name in armed.split(","):
        log.critical("fault point %s armed: SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)
