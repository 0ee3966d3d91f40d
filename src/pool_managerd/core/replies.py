"""Replies rebuilt from the event log, so that a command retried after a daemon restart gets
the answer it got the first time and is not applied again. Pure.

A command's own step writes events that carry its ``command_id`` and ``fingerprint``
(``<verb>:<hash>``, see :func:`~pool_managerd.contract.messages.command_fingerprint`); the events the pool
writes later because of it carry the id but no fingerprint. From a step's events and the pool's
state after them (the replay fold), the reply is what the machine answered then:

* ``command_rejected`` → ``rejected`` with its code and message (``allowed`` for
  ``illegal_transition``); ``preload_rejected`` → ``rejected`` with the problems;
  ``internal_error`` → ``rejected`` ``internal``;
* anything else → ``accepted`` with the step's first and last sequence, the state after it and,
  for a lease, the lease id and expiry.

A command that wrote no event (a reload to the very same spec) is not rebuilt: applying it again
changes nothing either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pool_managerd.contract.messages import (
    Accepted,
    CommandRejected,
    Event,
    InternalError,
    LeaseGranted,
    PoolState,
    PreloadRejected,
    Rejected,
)
from pool_managerd.core.fold import Fold
from pool_managerd.core.machine import internal_error_message
from pool_managerd.core.table import client_verbs


@dataclass(frozen=True, slots=True)
class LoggedReply:
    """The reply a command got, as the log tells it."""

    pool: str
    command_id: str
    fingerprint: str
    at: float
    """When the step's last event was written (the reply's age counts from there)."""
    reply: Accepted | Rejected


def rebuild_replies(events: Iterable[Event], *, since: float = float("-inf")) -> list[LoggedReply]:
    """The replies of every command whose step is in ``events`` and ended at ``since`` or later,
    in log order (one per pool and command id: the latest wins)."""
    fold = Fold()
    out: dict[tuple[str, str], LoggedReply] = {}
    group: list[Event] = []
    state: PoolState = "unready"

    def close() -> None:
        if group and group[-1].ts >= since:
            reply = _reply(group, state)
            first = group[0]
            assert first.pool is not None and first.command_id is not None and first.fingerprint is not None
            key = (first.pool, first.command_id)
            out.pop(key, None)
            out[key] = LoggedReply(first.pool, first.command_id, first.fingerprint, group[-1].ts, reply)
        group.clear()

    for event in events:
        if event.pool is None:
            continue
        same = bool(group) and (event.pool, event.command_id, event.fingerprint) == (
            group[0].pool, group[0].command_id, group[0].fingerprint)  # fmt: skip
        if not same:
            close()
        fold.apply(event)
        if event.fingerprint is not None and event.command_id is not None:
            group.append(event)
            state = fold.views[event.pool].state
    close()
    return list(out.values())


def _reply(group: list[Event], state: PoolState) -> Accepted | Rejected:
    first, last = group[0], group[-1]
    pool = first.pool or ""
    verb = (first.fingerprint or "").split(":", 1)[0]
    cid = first.command_id
    for event in group:
        body = event.body
        if isinstance(body, CommandRejected):
            allowed = list(client_verbs(body.state)) if body.code == "illegal_transition" and body.state else []
            return Rejected(command_id=cid, pool=pool, verb=body.verb, code=body.code, message=body.message,
                            state=body.state, allowed=allowed)  # fmt: skip
        if isinstance(body, PreloadRejected):
            return Rejected(command_id=cid, pool=pool, verb=verb, code=body.code, message=body.message,
                            state=state, problems=list(body.problems))  # fmt: skip
        if isinstance(body, InternalError):
            return Rejected(command_id=cid, pool=pool, verb=verb, code="internal",
                            message=internal_error_message(verb, pool), state=state)  # fmt: skip
    lease = next((e.body for e in group if isinstance(e.body, LeaseGranted)), None)
    lease_id, expires_at = (lease.lease_id, lease.expires_at) if lease else (None, None)
    return Accepted(command_id=cid, pool=pool, verb=verb, seq=first.seq, last_seq=last.seq, state=state,
                    lease_id=lease_id, expires_at=expires_at)  # fmt: skip
