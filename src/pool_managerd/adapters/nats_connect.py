"""The first connection to NATS, bounded in time and honest about why it failed.

nats-py retries the first connect as often as it may reconnect later: with unlimited
reconnects (what a daemon wants once it is connected) a wrong password or a dead address keeps
it retrying forever, and the reason only reaches the error callback. :func:`first_connect`
gives the first connection a deadline, ends it at once when the server refuses the credentials
or the TLS handshake (retrying cannot help), and raises :class:`ConnectFailed` with one
readable sentence. The connection it returns keeps the caller's options, unlimited reconnects
included; the caller's callbacks start receiving once it is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from pool_managerd.contract.errors import PoolManagerError

__all__ = ["ConnectFailed", "first_connect", "is_permission_violation"]

log = logging.getLogger(__name__)

_AUTH_MARKERS = ("authorization violation", "user authentication expired", "user authentication revoked")


class ConnectFailed(PoolManagerError):
    """No first connection: ``refused`` (credentials or TLS; retrying will not help) or no server
    answered within the deadline."""

    code = "unavailable"

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


def is_permission_violation(exc: BaseException) -> bool:
    """True for the server's asynchronous "Permissions Violation for Publish/Subscription" errors."""
    return "permissions violation" in str(exc).lower()


def _refusal(exc: BaseException) -> str | None:
    """Why the server (or its TLS) refuses us for good, or None for a retryable failure."""
    if isinstance(exc, nats.errors.AuthorizationError):
        return "the server refused the credentials (Authorization Violation)"
    text = str(exc).lower()
    if isinstance(exc, nats.errors.Error) and any(marker in text for marker in _AUTH_MARKERS):
        return f"the server refused the credentials ({str(exc).removeprefix('nats: ').strip(chr(39))})"
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return f"TLS failed: {exc.reason or exc}" if isinstance(exc.reason, str) else f"TLS failed: {exc}"
    return None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    return str(exc) or type(exc).__name__


async def first_connect(opts: dict[str, Any], *, timeout: float, who: str, log_retries: bool = True) -> NATS:
    """Connect with ``opts`` (``nats.connect`` keywords) within ``timeout`` seconds.

    Raises :class:`ConnectFailed` when the credentials or TLS are refused (at once) or when no
    connection is made in time; ``who`` names the target in the message (``nats://h:4222``,
    ``user 'daemon' at ...``); ``log_retries`` logs one warning when the first attempt fails.
    Cancelling the caller cancels the attempt and closes the client.
    """
    caller_error_cb: Callable[[Exception], Awaitable[None]] | None = opts.get("error_cb")
    passthrough = {name: opts.get(name) for name in ("disconnected_cb", "closed_cb")}
    connected = False
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    last: list[BaseException] = []
    warned = False

    async def on_error(exc: Exception) -> None:
        nonlocal warned
        if connected:
            if caller_error_cb is not None:
                await caller_error_cb(exc)
            return
        last[:] = [exc]
        why = _refusal(exc)
        if why is not None and not refused.done():
            refused.set_result(why)
        elif log_retries and not warned:
            # One line, not one per attempt: the retry loop may run for the whole timeout.
            warned = True
            log.warning("NATS %s not reachable yet (%s); retrying for up to %g s", who, _describe(exc), timeout)

    def gated(name: str) -> Callable[[], Awaitable[None]] | None:
        cb: Callable[[], Awaitable[None]] | None = passthrough[name]
        if cb is None:
            return None

        async def call() -> None:
            if connected and cb is not None:
                await cb()

        return call

    nc = NATS()
    connect_opts = {**opts, "error_cb": on_error}
    for name, cb in passthrough.items():
        if cb is not None:
            connect_opts[name] = gated(name)
    attempt = asyncio.ensure_future(nc.connect(**connect_opts))
    ok = False
    try:
        waits: set[asyncio.Future[Any]] = {attempt, refused}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if attempt in done and attempt.exception() is None:
            connected = ok = True
            return nc
        if refused.done():
            raise ConnectFailed(f"cannot connect to NATS {who}: {refused.result()}", refused=True)
        if attempt.done():
            exc = attempt.exception()
            why = _refusal(exc) if exc is not None else None
            if why is not None:
                raise ConnectFailed(f"cannot connect to NATS {who}: {why}", refused=True)
            raise ConnectFailed(f"cannot reach NATS {who}: {_describe(last[0] if last else exc)}", refused=False)
        raise ConnectFailed(
            f"cannot reach NATS {who} within {timeout:g} s (last error: {_describe(last[0] if last else None)})",
            refused=False,
        )
    finally:
        if not ok:
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            with contextlib.suppress(Exception):
                await nc.close()
