"""Every bound on what the daemon accepts from the wire, in one place.

``messages.py`` turns these into msgspec ``Meta`` constraints (so ``schemas/`` carries them);
:func:`json_problem` is the check every subscription the daemon decodes runs first, before any
decoder sees the bytes: a payload too large or nested too deep is refused with a clear message,
never a ``RecursionError``. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Final

MAX_PAYLOAD_BYTES: Final = 64 * 1024
"""Largest command (or health report, or KV value read back) accepted."""
MAX_SNAPSHOT_BYTES: Final = 1024 * 1024
"""Largest KV pool snapshot read back (NATS's default max payload)."""
MAX_JSON_DEPTH: Final = 32
"""Deepest nesting of arrays and objects in any accepted message (the deepest real one is 5)."""

MAX_COMMAND_ID: Final = 128
MAX_LEASE_ID: Final = 128
MAX_HOLDER: Final = 128
"""Longest lease holder: with :data:`MAX_SLOTS` leases a ``status`` reply stays far under 1 MB."""
MAX_MODEL: Final = 512
MAX_MASK: Final = 512
"""Longest device mask string; a list mask has at most :data:`MAX_MASK_ITEMS` tokens."""
MAX_MASK_ITEMS: Final = 64
MAX_MASK_TOKEN: Final = 128
MAX_POLICY: Final = 256
MAX_OVERRIDES: Final = 16
"""Most override values one reload may set."""
MAX_OVERRIDE_NAME: Final = 64
MAX_OVERRIDE_TEXT: Final = 256
MAX_REASON: Final = 1024
"""Longest free text (a health report's ``error``, a reason)."""
MAX_SOURCE: Final = 64
MAX_SLOTS: Final = 1024
"""Most slots (hence leases) a pool may have."""
MAX_TTL_S: Final = 7 * 24 * 3600.0
"""Longest lease TTL the wire accepts at all; a pool's ``max_lease_ttl_s`` bounds it further."""
MAX_WAIT_S: Final = 24 * 3600.0
"""Longest drain deadline or stop grace period."""
MAX_TIMESTAMP: Final = 1e11
"""A health report's ``ts`` (Unix seconds) beyond this is junk (year 5138)."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in ``data``, brackets inside strings not counted.

    Not a JSON parser: it only bounds how deep a decoder would recurse, so a malformed text
    gets the decoder's own clear error afterwards."""
    brackets = _STRING.sub(b"", data).translate(None, _BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def json_problem(data: bytes, limit_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[str, str] | None:
    """``(code, message)`` when ``data`` must not reach a decoder: ``payload_too_large`` past
    ``limit_bytes``, ``bad_request`` nested deeper than :data:`MAX_JSON_DEPTH`. None: go ahead."""
    if len(data) > limit_bytes:
        return "payload_too_large", f"payload of {len(data)} bytes exceeds {limit_bytes}"
    # Fewer openers than the limit cannot nest past it: the common case costs two counts.
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and json_depth(data) > MAX_JSON_DEPTH:
        return "bad_request", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return None


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters: an error message may quote what was sent (an
    unknown field's name), and a reply must not grow with it."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
