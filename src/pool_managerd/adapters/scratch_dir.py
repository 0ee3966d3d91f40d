"""A directory an object works in: the one its caller gave, or a temporary one it owns.

The embedded nats-server and the test cluster both take an optional store directory; without
one they make a temporary directory and remove it when closed, and a given one is never removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ScratchDir"]


class ScratchDir:
    """``path``: the given directory, or a new temporary one (named ``prefix…``) that only
    :meth:`cleanup` removes; cleaning up twice, or a given directory, does nothing."""

    def __init__(self, given: str | os.PathLike[str] | None, prefix: str) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if given is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
            self.path = Path(self._tmp.name)
        else:
            self.path = Path(given)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
