"""Creating or updating the event stream and the snapshot bucket, idempotently at every start."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from pool_managerd.adapters.eventlog.errors import EventLogError
from pool_managerd.adapters.eventlog.jetstream import ERR_STREAM_NAME_IN_USE
from pool_managerd.adapters.replication import open_bucket, wait_for_leader
from pool_managerd.contract.subjects import KV_BUCKET, STREAM_NAME, Subjects

__all__ = ["DUPLICATE_WINDOW_S", "ensure_kv", "ensure_stream"]

DUPLICATE_WINDOW_S = 120.0
"""Server-side ``Nats-Msg-Id`` dedupe window of the event stream."""


def _stream_config(
    subjects: Subjects, max_age_s: float | None, replicas: int, name: str, duplicate_window_s: float
) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        description="pool-managerd events (source of truth)",
        subjects=subjects.stream_subjects,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=max_age_s or 0.0,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        # Lets readers (dashboards, replay) use direct gets; the publisher itself reads through
        # the leader (STREAM.MSG.GET) because fencing needs the authoritative last sequence.
        allow_direct=True,
    )


def _needs_update(have: api.StreamConfig, want: api.StreamConfig) -> bool:
    def secs(v: float | None) -> float:
        return round(v or 0.0, 3)

    return (
        sorted(have.subjects or []) != sorted(want.subjects or [])
        or secs(have.max_age) != secs(want.max_age)
        or (have.num_replicas or 1) != (want.num_replicas or 1)
        or secs(have.duplicate_window) != secs(want.duplicate_window)
        or bool(have.allow_direct) != bool(want.allow_direct)
    )


async def ensure_stream(
    js: JetStreamContext,
    subjects: Subjects,
    max_age_s: float | None = None,
    replicas: int = 1,
    *,
    stream: str = STREAM_NAME,
    duplicate_window_s: float = DUPLICATE_WINDOW_S,
) -> api.StreamInfo:
    """Create stream ``stream`` (file storage) or bring its limits to the given ones.

    Idempotent and safe to race: two daemons starting together both succeed. ``max_age_s``
    None or 0 keeps events forever. The storage type cannot change on an existing stream; a
    stream created elsewhere with memory storage raises ``BadRequestError`` on update.
    """
    if max_age_s:
        # The server refuses a duplicate window longer than max_age (err 10052).
        duplicate_window_s = min(duplicate_window_s, max_age_s)
    want = _stream_config(subjects, max_age_s, replicas, stream, duplicate_window_s)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            created = await js.add_stream(want)
            await wait_for_leader(js, stream)
            return created
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
            # Lost a creation race against a daemon with other limits: fall through to update.
            info = await js.stream_info(stream)
    if info.config.storage not in (None, api.StorageType.FILE):
        raise EventLogError(f"stream {stream!r} exists with {info.config.storage} storage; need file")
    if _needs_update(info.config, want):
        return await js.update_stream(want)
    return info


async def ensure_kv(js: JetStreamContext, *, bucket: str = KV_BUCKET, replicas: int = 1) -> KeyValue:
    """Open KV bucket ``bucket`` (default ``poold_pools``), creating it (history 1, file) if absent."""
    config = api.KeyValueConfig(
        bucket=bucket,
        description="pool-managerd pool snapshots (derived from the event stream)",
        history=1,
        storage=api.StorageType.FILE,
        replicas=replicas,
    )
    return await open_bucket(js, config)
