"""Replicated JetStream storage: whether the server can hold ``nats.replicas`` copies.

``nats.replicas`` applies to every stream and bucket the daemon creates: the event stream, the
pool snapshot bucket, and any further stream or bucket (the audit stream, the ownership bucket)
that takes its replica count from :func:`stream_replicas`. A single server cannot hold more
than one copy; asking it for three would fail on the first stream create with a server error
that names no setting, so the daemon checks at connect and exits 2 with a sentence that does.
A cluster smaller than the count is refused by the server when the stream is created; that
refusal is turned into the same error.

On a cluster, a create can return before the stream (or bucket) has a leader: two daemons that
create the same replicated bucket at once both get an answer, and the one answered first (the
server saw an identical create in flight) finds no leader behind its first read, which then
times out (5 s, then the daemon gave up starting); the other one's first look at the bucket
(``STREAM.INFO``) may time out too while the leader is being elected. :func:`open_bucket` and
:func:`wait_for_leader` bridge that moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.kv import KeyValue

from pool_managerd.contract.errors import PoolManagerError

__all__ = [
    "REPLICA_ERROR_CODES",
    "ReplicasUnavailable",
    "check_clustered",
    "open_bucket",
    "replicas_refused",
    "stream_replicas",
    "wait_for_leader",
]

_LEADER_POLL_S = 0.02
"""How often stream info is asked again while a new replicated stream elects its leader."""

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


async def open_bucket(js: Any, config: api.KeyValueConfig, timeout: float = 30.0) -> KeyValue:
    """Open KV bucket ``config.bucket``, creating it with ``config`` if absent, once it has a leader.

    A request that times out while another daemon's create of the same bucket elects its leader
    is tried again until ``timeout``. ``js`` is a nats-py ``JetStreamContext``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            try:
                kv: KeyValue = await js.key_value(config.bucket)
            except nats.js.errors.BucketNotFoundError:
                # Creating with an identical config is idempotent on the server: a race is harmless.
                kv = await js.create_key_value(config)
            await wait_for_leader(js, f"KV_{config.bucket}", max(1.0, deadline - time.monotonic()))
            return kv
        except nats.errors.TimeoutError:
            if time.monotonic() >= deadline:
                raise


async def wait_for_leader(js: Any, stream: str, timeout: float = 10.0) -> None:
    """Return once ``stream`` (``KV_<bucket>`` for a bucket) has a leader; at once when the
    server is not clustered. Raises ``TimeoutError`` after ``timeout`` seconds without one.

    ``js`` is a nats-py ``JetStreamContext``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
            pass  # created a moment ago: not every server knows it yet
        if time.monotonic() >= deadline:
            raise TimeoutError(f"stream {stream} has no leader after {timeout:g} s")
        await asyncio.sleep(_LEADER_POLL_S)  # ok: a leader election is only observable by asking
