"""How long a test waits for something that should happen, in one place.

Each is a deadline, not a delay: a test waits on an event and fails only when the deadline passes,
so a generous figure costs nothing when things work and keeps a loaded 2-core CI machine from
failing a test that is merely slow. Timing figures belong in ``bench/``, never here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

ENGINE_S = 20.0
"""An engine subprocess starts, becomes ready, stops or exits."""

POOL_S = 15.0
"""A running daemon answers, or one of its pools reaches a state."""

CLI_S = 30.0
"""A ``pool-managerd`` subprocess runs to its end."""

CLI_ACCOUNTS_S = 60.0
"""A ``pool-managerd`` subprocess against a nats-server with accounts and permissions runs to
its end (Python start-up on a loaded machine included)."""

STARTUP_TIMEOUT_S = 3.0
"""The ``nats.startup_timeout_s`` a test configures when the daemon must give up connecting."""

EXIT_SLACK_S = 15.0
"""Beyond :data:`STARTUP_TIMEOUT_S`, until the daemon that gave up has exited: Python start-up
and imports come before the connect, and on a loaded 2-core machine they alone can take seconds.
What matters is that the daemon exits at all (it used to retry forever)."""

MANY_ENGINES_S = 60.0
"""A thousand-odd processes start, are watched, or are gone (``adapters/test_many_engines.py``)."""

LEAK_S = 5.0
"""The processes a test started are gone after it (see :func:`support.procs.leak_guard`)."""


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = POOL_S) -> None:
    """Wait for ``check()`` to hold, polling a cheap read; fails naming ``what`` at the deadline."""

    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.02)  # ok: polls a cheap read; the caller's deadline bounds it

    try:
        await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")
