"""Driving a daemon over NATS as a client does: requests, the event stream followed into
:class:`Events`, and the waits on it (``e2e/test_daemon_e2e.py``, ``e2e/test_nats_compat.py``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pool_managerd.contract.messages import (
    EVENT_DECODER,
    REPLY_DECODER,
    Accepted,
    Event,
    StateChanged,
)


class Events:
    """Every pool event seen on the wire, with waiters."""

    def __init__(self) -> None:
        self.items: list[tuple[Event, dict[str, str]]] = []
        self.cond = asyncio.Condition()

    async def on_msg(self, msg: Msg) -> None:
        async with self.cond:
            self.items.append((EVENT_DECODER.decode(msg.data), dict(msg.headers or {})))
            self.cond.notify_all()

    async def wait(self, pred: Callable[[Event], bool], timeout: float = 15.0) -> Event:
        async def find() -> Event:
            async with self.cond:
                while True:
                    for event, _ in self.items:
                        if pred(event):
                            return event
                    await self.cond.wait()

        return await asyncio.wait_for(find(), timeout)

    def state_changes(self, pool: str) -> list[StateChanged]:
        return [e.body for e, _ in self.items if e.pool == pool and isinstance(e.body, StateChanged)]


async def follow(nc: NATS) -> Events:
    events = Events()
    await nc.subscribe("poold.evt.>", cb=events.on_msg)
    await nc.flush()
    return events


async def req(nc: NATS, subject: str, payload: dict[str, Any] | bytes | None = None, **kw: Any) -> Any:
    data = payload if isinstance(payload, bytes) else (json.dumps(payload).encode() if payload is not None else b"")
    msg = await nc.request(subject, data, timeout=10, **kw)
    return REPLY_DECODER.decode(msg.data)


def cid() -> str:
    return uuid.uuid4().hex


def reached(pool: str, state: str) -> Callable[[Event], bool]:
    return lambda e: e.pool == pool and isinstance(e.body, StateChanged) and e.body.dst == state


async def ready_pool(nc: NATS, events: Events, pool: str = "chat") -> None:
    reply = await req(nc, f"poold.cmd.{pool}.preload", {"command_id": cid()})
    assert isinstance(reply, Accepted), reply
    await events.wait(lambda e: reached(pool, "ready")(e) and e.seq > reply.seq)
