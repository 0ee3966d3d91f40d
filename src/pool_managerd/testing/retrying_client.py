"""A client that retries a command until the daemon answers it, as the fault benchmarks' clients do.

Each attempt sends the same bytes (the same ``command_id``), so a retry after a lost reply is
answered from the daemon's reply cache, never applied twice; ``unavailable`` and ``overloaded``
refusals are retried like silence.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from pool_managerd.contract.messages import REPLY_DECODER, Accepted, Rejected, StatusReply

__all__ = ["RETRY_CODES", "request_until_answered"]

RETRY_CODES = ("unavailable", "overloaded")
"""Refusals that say "not now", not "no": the command is sent again."""


async def request_until_answered(
    nc: Any,
    pool: str,
    verb: str,
    payload: dict[str, Any],
    *,
    within_s: float,
    attempt_s: float = 1.0,
    on_retry: Callable[[], None] | None = None,
) -> Accepted | Rejected | StatusReply:
    """Send ``verb`` to ``pool`` on the default prefix until answered (``on_retry`` is called
    before each attempt after the first); TimeoutError once ``within_s`` passed unanswered."""
    data = json.dumps(payload).encode()
    deadline = time.monotonic() + within_s
    first = True
    while True:
        if not first and on_retry is not None:
            on_retry()
        first = False
        try:
            msg = await nc.request(f"poold.cmd.{pool}.{verb}", data, timeout=attempt_s)
            reply = REPLY_DECODER.decode(msg.data)
            assert isinstance(reply, Accepted | Rejected | StatusReply), reply
            if not (isinstance(reply, Rejected) and reply.code in RETRY_CODES):
                return reply
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{verb} {payload} unanswered after {within_s} s")
        await asyncio.sleep(0.05)  # ok: a client's retry interval
