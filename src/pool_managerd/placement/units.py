"""Byte sizes as people write them (``8GiB``, ``500MiB``, ``20G``) and as plans print them. Pure."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from pool_managerd.contract.errors import PoolManagerError

KiB = 1024
MiB = 1024**2
GiB = 1024**3

# Same convention as Kubernetes quantities: K/M/G/T (and KB/MB/...) are powers of 10,
# Ki/Mi/Gi/Ti (and KiB/MiB/...) powers of 2. Units are case-insensitive.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)")


class SizeError(PoolManagerError):
    """A byte size that cannot be parsed or is negative."""

    code = "bad_size"


def parse_bytes(text: str | int) -> int:
    """``"8GiB"`` → 8589934592. Plain integers pass through; fractions round down to the byte.

    K/M/G/T and KB/MB/GB/TB are decimal (``20G`` = 20·10⁹); Ki/Mi/Gi/Ti and KiB/MiB/GiB/TiB are
    binary. Raises :class:`SizeError` (code ``bad_size``) for anything else, negatives included.
    """
    if isinstance(text, bool):
        raise SizeError(f"size must be a number of bytes, not {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.fullmatch(text.strip())
    if not m or m.group(2).lower() not in _UNITS:
        raise SizeError(
            f"cannot read size {text!r}: write bytes (e.g. 1073741824) or a number with a unit (500MiB, 8GiB, 20G)"
        )
    try:
        value = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only plain decimals
        raise SizeError(f"cannot read size {text!r}") from exc
    return int(value)


def format_bytes(n: int) -> str:
    """Binary units with two decimals, for humans: ``format_bytes(25769803776) == "24.00 GiB"``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"
