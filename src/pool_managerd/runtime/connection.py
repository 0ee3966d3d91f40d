"""What the daemon learns of its NATS connection: the server's version and URL, and a flush
that survives a cancellation."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from pool_managerd.contract.nats_version import ServerVersion


def reported_version(nc: NATS) -> ServerVersion | None:
    """The version in the connected server's INFO, or None when it gives none we can read."""
    reported = nc.connected_server_version
    try:
        version = ServerVersion(int(reported.major), int(reported.minor), int(reported.patch),
                                str(reported.prerelease or ""))  # fmt: skip
    except (ValueError, TypeError):
        return None
    # nats-py's stand-in for "no INFO version yet".
    return None if version.release == (0, 0, 0) and version.prerelease == "unknown" else version


def safe_url(nc: NATS) -> str | None:
    """The connected server as scheme://host:port: never the credentials a URL may carry."""
    url = nc.connected_url
    if url is None or url.hostname is None:
        return None
    return f"{url.scheme}://{url.hostname}:{url.port}" if url.port else f"{url.scheme}://{url.hostname}"


async def flush_through_cancel(nc: NATS) -> None:
    """``nc.flush()`` that a cancellation (a stop during start-up) cannot break.

    Cancelled mid-flight, nats-py's flush leaves its cancelled PONG future queued; the PONG then
    raises ``InvalidStateError`` inside the client's read loop, which stops reading, and every
    later ack, reply and KV write on the connection times out. Shielded, the flush finishes on its
    own (bounded by nats-py's flush timeout) while the caller is cancelled at once."""
    flush = asyncio.ensure_future(nc.flush())
    # Retrieved here, so a flush that fails after its caller left is not an unhandled error.
    flush.add_done_callback(lambda done: done.cancelled() or done.exception())
    await asyncio.shield(flush)
