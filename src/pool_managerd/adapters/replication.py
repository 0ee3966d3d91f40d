"""Replicated JetStream storage: whether the server can hold ``nats.replicas`` copies.

``nats.replicas`` applies to every stream and bucket the daemon creates: the event stream, the
pool snapshot bucket, and any further stream or bucket (the audit stream, the ownership bucket)
that takes its replica count from :func:`stream_replicas`. A single server cannot hold more
than one copy; asking it for three would fail on the first stream create with a server error
that names no setting, so the daemon checks at connect and exits 2 with a sentence that does.
A cluster smaller than the count is refused by the server when the stream is created; that
refusal is turned into the same error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pool_managerd.core.errors import PoolManagerError

__all__ = ["REPLICA_ERROR_CODES", "ReplicasUnavailable", "check_clustered", "replicas_refused", "stream_replicas"]

REPLICA_ERROR_CODES = frozenset({10005, 10023, 10074})
"""JetStream API errors that mean "not that many replicas here": no suitable peers (10005),
insufficient resources (10023), replicas > 1 not supported in non-clustered mode (10074)."""


class ReplicasUnavailable(PoolManagerError):
    """The server cannot keep ``nats.replicas`` copies; the daemon exits 2 before touching a pool."""

    code = "unavailable"


def stream_replicas(config: Any) -> int:
    """The replica count for every stream and bucket the daemon creates (``nats.replicas``).

    One place, so a new stream or bucket cannot forget it: pass the daemon configuration.
    """
    return int(config.nats.replicas)


def check_clustered(server_info: Mapping[str, Any], replicas: int, *, url: str) -> None:
    """Raise :class:`ReplicasUnavailable` when ``replicas > 1`` and the server (its INFO) is not
    part of a cluster. ``url`` names the server in the message."""
    if replicas <= 1:
        return
    if not server_info.get("cluster"):
        raise ReplicasUnavailable(
            f"nats.replicas = {replicas} needs a clustered nats-server, but {url} is not part of a cluster "
            "(set nats.replicas = 1, or connect to a cluster of at least that many servers)"
        )


def replicas_refused(replicas: int, what: str, detail: str) -> ReplicasUnavailable:
    """The error for a stream or bucket the server would not create with ``replicas`` copies."""
    return ReplicasUnavailable(
        f"nats.replicas = {replicas}: the cluster cannot hold {what} with {replicas} replicas ({detail}); "
        "use a replica count no larger than the number of JetStream servers in the cluster"
    )
