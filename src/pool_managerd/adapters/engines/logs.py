"""Rotating an engine's log file at spawn time."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["rotate_log"]


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` when it is at least ``max_bytes`` long: ``path`` → ``path.1`` → ... →
    ``path.<keep>``; the oldest beyond ``keep`` is deleted (``keep=0`` just deletes ``path``).
    Returns whether it rotated. Done at spawn time only: a running engine's log grows unbounded.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < max_bytes:
        return False
    if keep <= 0:
        path.unlink(missing_ok=True)
        return True
    Path(f"{path}.{keep}").unlink(missing_ok=True)
    for i in range(keep - 1, 0, -1):
        src = Path(f"{path}.{i}")
        if src.exists():
            os.replace(src, f"{path}.{i + 1}")
    os.replace(path, f"{path}.1")
    return True
