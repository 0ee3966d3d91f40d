"""An opt-in profiler for a running daemon: SIGUSR1 starts ``cProfile``, the next SIGUSR1 stops it
and writes the profile.

Off unless ``POOL_MANAGERD_PROFILE`` names a directory (the benchmarks set it; an operator can
too, to see where an idle daemon's CPU goes). Each start/stop pair writes ``profile-<n>.prof``
(for ``pstats``/snakeviz) and ``profile-<n>.txt`` (the top functions by own and cumulative
time) there. Profiling a window rather than the whole run keeps start-up and preload out of an
idle-state profile, and costs nothing while it is off. With ``POOL_MANAGERD_PROFILE_FROM_START=1``
the first window opens at start-up (a restart's recovery), and the first SIGUSR1 closes it. A
window still open when the process exits is written then (SIGUSR1 before SIGTERM profiles the
shutdown).
"""

from __future__ import annotations

import atexit
import cProfile
import io
import logging
import os
import pstats
import signal
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

ENV = "POOL_MANAGERD_PROFILE"
FROM_START_ENV = "POOL_MANAGERD_PROFILE_FROM_START"


class _Toggle:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.profile: cProfile.Profile | None = None
        self.count = 0

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        if self.profile is None:
            self.profile = cProfile.Profile()
            self.profile.enable()
            return
        self.close()

    def close(self) -> None:
        """End the open window, if any, and write it."""
        if self.profile is None:
            return
        profile, self.profile = self.profile, None
        profile.disable()
        self.count += 1
        base = self.out / f"profile-{self.count}"
        profile.dump_stats(f"{base}.prof")
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        Path(f"{base}.txt").write_text(text.getvalue())


def install_from_env() -> bool:
    """Install the SIGUSR1 toggle when ``POOL_MANAGERD_PROFILE`` is set; returns whether it was."""
    where = os.environ.get(ENV)
    if not where:
        return False
    out = Path(where)
    out.mkdir(parents=True, exist_ok=True)
    toggle = _Toggle(out)
    if os.environ.get(FROM_START_ENV) == "1":
        toggle(signal.SIGUSR1, None)
    signal.signal(signal.SIGUSR1, toggle)
    atexit.register(toggle.close)
    log.warning("profiling on SIGUSR1 into %s", out)
    return True
