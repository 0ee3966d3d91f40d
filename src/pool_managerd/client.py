"""A small typed async client of the pool-managerd NATS contract (DESIGN.md §5).

For services that drive pools and for ``pool-managerd ctl``::

    nc = await nats.connect("nats://127.0.0.1:4222")
    client = PoolClient(nc)
    reply = await client.preload("chat", device_mask="0,1")
    if isinstance(reply, Rejected):
        print(reply.code, reply.message)

    # Send a command and follow the pool's events until it settles (subscribed before sending,
    # so no event is missed):
    result = await client.command_and_wait("chat", "preload", "ready", wait_timeout=60)
    print(result.reached, result.state, [e.type for e in result.events])

    # Follow live events:
    async with client.events("chat") as events:
        async for event in events:
            print(event.type, event.body)

Every call returns a typed reply and never raises for a refusal: an invalid id, an unknown verb or
invalid fields are answered locally (``Rejected`` with ``invalid_id``, ``unknown_verb`` or
``bad_request``) without sending anything; no daemon serving the pool is ``unknown_pool``; a
timeout or a closed connection is ``unavailable``.

One job, a long module: one typed method per command of the contract, and the request, event-follow
and error-mapping plumbing they share; splitting the methods from the plumbing would leave each half
meaningless alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, cast

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import (
    EVENT_DECODER,
    NODE_COMMANDS,
    POOL_COMMANDS,
    REPLY_DECODER,
    Accepted,
    Event,
    GpuClearCmd,
    GpuClearReply,
    InventoryReply,
    LifecycleReply,
    PoolsCmd,
    PoolSnapshot,
    PoolsReply,
    PoolState,
    RejectCode,
    Rejected,
    StateChanged,
    StatusReply,
    encode,
)
from pool_managerd.contract.subjects import DEFAULT_PREFIX, SERVICE_NAME, Subjects, validate_id

__all__ = [
    "RESTING_STATES",
    "CommandReply",
    "EventStream",
    "NodeInfo",
    "NodeReply",
    "PermissionDenials",
    "PoolClient",
    "WaitResult",
]

log = logging.getLogger(__name__)

CommandReply: TypeAlias = Accepted | Rejected | StatusReply
"""What a pool command can be answered with."""

NodeReply: TypeAlias = PoolsReply | InventoryReply | LifecycleReply | GpuClearReply | Rejected
"""What a node command can be answered with."""

RESTING_STATES: Final[frozenset[str]] = frozenset({"unready", "ready", "failed"})
"""States a pool stays in until a command (or a fact on a ready pool) moves it: a wait for
another state ends when the pool comes to rest in one of these."""


def _reject(
    code: RejectCode,
    message: str,
    *,
    pool: str | None = None,
    verb: str | None = None,
    command_id: str | None = None,
) -> Rejected:
    return Rejected(code=code, message=message, pool=pool, verb=verb, command_id=command_id)


@dataclass(slots=True)
class WaitResult:
    """The outcome of :meth:`PoolClient.command_and_wait` or :meth:`PoolClient.wait_for_state`.

    ``reply`` is the command's reply (the initial ``status`` reply for ``wait_for_state``);
    ``events`` are the pool's events seen from the command on, in order; ``state`` is the last
    state known; ``reached`` says whether the pool got to the target state; ``timed_out`` that
    the wait ended at its deadline.
    """

    reply: CommandReply
    target: PoolState
    events: list[Event] = field(default_factory=list)
    state: PoolState | None = None
    reached: bool = False
    timed_out: bool = False

    @property
    def last_transition(self) -> StateChanged | None:
        """The last ``state_changed`` body seen, if any."""
        for event in reversed(self.events):
            if isinstance(event.body, StateChanged):
                return event.body
        return None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A daemon found by :meth:`PoolClient.discover` (``$SRV.PING.pool-managerd``)."""

    node: str
    id: str
    version: str
    metadata: dict[str, str]


class EventStream:
    """Live pool events on a core NATS subscription; an async context manager and iterator.

    Events are decoded with ``EVENT_DECODER``; messages that are not events (or of an event type
    this client does not know) are skipped with a debug log line. Nothing is replayed: use
    ``adapters.eventlog.reading.read_events`` for history.
    """

    def __init__(self, nc: NATS, subjects: Sequence[str]) -> None:
        self._nc = nc
        self.subjects = list(subjects)
        self._subs: list[Subscription] = []
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Subscribe (idempotent). Every event published after this returns is delivered."""
        if self._subs:
            return
        for subject in self.subjects:
            self._subs.append(await self._nc.subscribe(subject, cb=self._on_msg))
        # The SUB must reach the server before anything the caller sends next.
        await self._nc.flush()

    async def close(self) -> None:
        """Unsubscribe; best effort on a closed connection."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = EVENT_DECODER.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.debug("skipping non-event message on %s: %s", msg.subject, exc)
            return
        self._queue.put_nowait(event)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when ``timeout`` seconds pass first (None waits forever)."""
        if timeout is not None and timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def flush(self) -> None:
        """Let every message already received by the connection reach this stream's buffer."""
        # Callback subscriptions hand messages over in a task; a PING/PONG round trip plus a few
        # loop turns means everything the server sent before now has been dispatched.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._nc.flush(timeout=1)
        for _ in range(3):
            await asyncio.sleep(0)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next()
            if event is not None:
                yield event


_VIOLATION_RE = re.compile(r'Permissions Violation for (Publish|Subscription) to "([^"]+)"', re.IGNORECASE)


class PermissionDenials:
    """Turns the server's permission refusals into answers.

    A NATS server that refuses a publish says so asynchronously (``-ERR 'Permissions Violation
    for Publish to "<subject>"'``) and drops the message; the request would only time out. Pass
    this object as the connection's ``error_cb`` (it forwards everything to ``forward``) and to
    :class:`PoolClient`: a request the server refused is answered ``permission_denied`` at once.
    """

    def __init__(self, forward: Callable[[Exception], Any] | None = None) -> None:
        self._forward = forward
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}
        self.refused: list[tuple[str, str]] = []
        """Every (operation, subject) refused on this connection, in order."""

    async def __call__(self, exc: Exception) -> None:
        found = _VIOLATION_RE.search(str(exc))
        if found is not None:
            what, subject = found.group(1).lower(), found.group(2)
            self.refused.append((what, subject))
            for fut in self._waiters.pop(subject, []):
                if not fut.done():
                    fut.set_result(what)
        if self._forward is not None:
            result = self._forward(exc)
            if asyncio.iscoroutine(result):
                await result

    @contextlib.contextmanager
    def expect(self, subject: str) -> Iterator[asyncio.Future[str]]:
        """A future resolved when the server refuses ``subject``; forgotten on exit."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(subject, []).append(fut)
        try:
            yield fut
        finally:
            waiters = self._waiters.get(subject)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[subject]
            fut.cancel()


class PoolClient:
    """Typed client of one pool-managerd deployment (one subject prefix) on a NATS connection.

    The connection is the caller's: the client neither connects nor closes it. With
    ``denials`` (the connection's :class:`PermissionDenials` error callback) a command the server
    refuses to deliver is answered ``permission_denied`` at once instead of timing out.
    """

    def __init__(
        self,
        nc: NATS,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 5.0,
        *,
        denials: PermissionDenials | None = None,
    ) -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.timeout = timeout
        self.denials = denials

    async def _request(self, subject: str, payload: bytes, wait: float, headers: dict[str, str] | None) -> Msg:
        """``nc.request``; raises :class:`_Denied` when the server refuses to deliver it."""
        if self.denials is None:
            return await self.nc.request(subject, payload, timeout=wait, headers=headers)
        with self.denials.expect(subject) as refused:
            request = asyncio.ensure_future(self.nc.request(subject, payload, timeout=wait, headers=headers))
            waits: set[asyncio.Future[Any]] = {request, refused}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not request.done():
                    request.cancel()
                    with contextlib.suppress(BaseException):
                        await request
            if not request.done() or request.cancelled():
                raise _Denied(subject)
            return request.result()

    # --- pool commands ---------------------------------------------------------------------------

    def _build(self, verb: str, *, command_id: str | None = None, **fields: Any) -> Any:
        """Build and validate the command struct for ``verb``; raises :class:`_LocalReject` on an
        unknown verb or invalid fields."""
        cls = POOL_COMMANDS.get(verb)
        if cls is None:
            raise _LocalReject("unknown_verb", f"unknown verb {verb!r}; known: {', '.join(POOL_COMMANDS)}")
        cid = command_id or uuid.uuid4().hex
        try:
            cmd = cls(command_id=cid, **fields)
            # Struct constructors do not check constraints; a round trip does, as the daemon will.
            return msgspec.json.decode(encode(cmd), type=cls)
        except TypeError as exc:
            raise _LocalReject("bad_request", f"invalid {verb} command: {exc}") from None
        except msgspec.ValidationError as exc:
            raise _LocalReject("bad_request", f"invalid {verb} command: {exc}") from None

    async def command(
        self,
        pool: str,
        verb: str,
        *,
        command_id: str | None = None,
        traceparent: str | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> CommandReply:
        """Send one pool command and return the daemon's reply.

        ``fields`` are the command's own fields (``device_mask``, ``deadline_s``, ``ttl_s``, ...).
        A ``command_id`` is generated (uuid4 hex) unless given; resending the same id and fields
        gets the same reply and is applied once.
        """
        cid = command_id or uuid.uuid4().hex
        payload = self._payload(pool, verb, cid, fields)
        if isinstance(payload, Rejected):
            return payload
        return await self._request_pool(pool, verb, payload, cid, traceparent, timeout)

    def _payload(self, pool: str, verb: str, cid: str, fields: dict[str, Any]) -> bytes | Rejected:
        """The encoded command, or the local rejection (invalid id, verb or fields): never sent."""
        try:
            validate_id(pool, "pool")
            return encode(self._build(verb, command_id=cid, **fields))
        except PoolManagerError as exc:
            return _reject(_code(exc), exc.message, pool=_str_or_none(pool), verb=verb, command_id=cid)

    async def _request_pool(
        self, pool: str, verb: str, payload: bytes, cid: str, traceparent: str | None, timeout: float | None
    ) -> CommandReply:
        subject = self.subjects.command(pool, verb)
        wait = self.timeout if timeout is None else timeout
        headers = {"traceparent": traceparent} if traceparent else None
        try:
            msg = await self._request(subject, payload, wait, headers)
        except _Denied:
            return _reject("permission_denied", f"permission denied: this NATS user may not send {verb} to pool "
                           f"{pool} (the server refused {subject})", pool=pool, verb=verb, command_id=cid)  # fmt: skip
        except nats.errors.NoRespondersError:
            return _reject("unknown_pool", f"no daemon serves pool {pool!r}", pool=pool, verb=verb, command_id=cid)
        except nats.errors.TimeoutError:
            return _reject(
                "unavailable", f"no reply from pool {pool} within {wait:g} s", pool=pool, verb=verb, command_id=cid
            )
        except (nats.errors.Error, OSError) as exc:
            return _reject("unavailable", f"NATS: {exc or type(exc).__name__}", pool=pool, verb=verb, command_id=cid)
        reply = self._decode(msg.data, pool=pool, verb=verb, command_id=cid)
        if isinstance(reply, Accepted | Rejected | StatusReply):
            return reply
        return _reject("internal", f"unexpected {type(reply).__name__} to {verb}", pool=pool, verb=verb,
                       command_id=cid)  # fmt: skip

    def _decode(self, data: bytes, **where: str | None) -> Any:
        try:
            return REPLY_DECODER.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _reject("internal", f"undecodable reply: {exc}", **where)

    async def preload(
        self,
        pool: str,
        *,
        device_mask: str | list[str] | None = None,
        model: str | None = None,
        policy: str | None = None,
        **options: Any,
    ) -> CommandReply:
        """``preload``: start the engine (mask/model/policy override the configured ones)."""
        return await self.command(pool, "preload", **_given(device_mask=device_mask, model=model, policy=policy),
                                  **options)  # fmt: skip

    async def drain(self, pool: str, *, deadline_s: float | None = None, **options: Any) -> CommandReply:
        """``drain``: refuse new leases, stop once leases reach 0 or the deadline passes."""
        return await self.command(pool, "drain", **_given(deadline_s=deadline_s), **options)

    async def reload(
        self,
        pool: str,
        *,
        model: str | None = None,
        device_mask: str | list[str] | None = None,
        overrides: dict[str, int | float | bool | str] | None = None,
        deadline_s: float | None = None,
        **options: Any,
    ) -> CommandReply:
        """``reload``: drain, then start again with another model and/or values for the pool's
        declared ``overrides``; roll back if it does not become ready. The argv stays the
        configured template."""
        fields = _given(model=model, device_mask=device_mask, overrides=overrides, deadline_s=deadline_s)
        return await self.command(pool, "reload", **fields, **options)

    async def stop(self, pool: str, *, grace_s: float | None = None, **options: Any) -> CommandReply:
        """``stop``: SIGTERM the engine's process group now, SIGKILL after the grace period."""
        return await self.command(pool, "stop", **_given(grace_s=grace_s), **options)

    async def reset(self, pool: str, **options: Any) -> CommandReply:
        """``reset``: acknowledge a crash loop (``failed`` → ``unready``)."""
        return await self.command(pool, "reset", **options)

    async def lease(
        self,
        pool: str,
        *,
        ttl_s: float | None = None,
        lease_id: str | None = None,
        holder: str | None = None,
        **options: Any,
    ) -> CommandReply:
        """``lease``: take a slot; the reply's ``lease_id`` (drawn by the daemon, unguessable)
        and ``expires_at`` describe it. Pass that ``lease_id`` to renew the lease."""
        fields = _given(ttl_s=ttl_s, lease_id=lease_id, holder=holder)
        return await self.command(pool, "lease", **fields, **options)

    async def release(self, pool: str, lease_id: str, **options: Any) -> CommandReply:
        """``release``: give a leased slot back (``lease_id`` as the grant returned it)."""
        return await self.command(pool, "release", lease_id=lease_id, **options)

    async def status(self, pool: str, **options: Any) -> StatusReply | Rejected:
        """``status``: the pool's snapshot (never changes anything)."""
        reply = await self.command(pool, "status", **options)
        if isinstance(reply, Accepted):  # not something a daemon sends for status
            return _reject("internal", "accepted reply to status", pool=pool, verb="status")
        return reply

    # --- node commands ---------------------------------------------------------------------------

    async def node(self, node: str, verb: str, *, timeout: float | None = None) -> NodeReply:
        """Send a node command (``pools``, ``inventory``, ``lifecycle``) to the daemon of ``node``.

        ``pools`` is asked page by page (see ``PoolsCmd.after``) and answered as one reply with
        every page's pools; a page refused midway is the answer."""
        if verb != "pools":
            return await self._node_once(node, verb, None, timeout)
        pools: list[PoolSnapshot] = []
        after: str | None = None
        for _ in range(100_000):  # a daemon's pages always advance; this only bounds a broken one
            reply = await self._node_once(node, verb, after, timeout)
            if not isinstance(reply, PoolsReply):
                return reply
            pools += reply.pools
            if reply.next is None or reply.next == after:
                return PoolsReply(node=reply.node, pools=pools, total=reply.total)
            after = reply.next
        return _reject("internal", f"node {node}: pools pages do not end", verb=verb)

    async def gpu_clear(self, node: str, uuid: str, *, timeout: float | None = None) -> GpuClearReply | Rejected:
        """``gpu_clear``: tell ``node`` that the unhealthy device ``uuid`` may be placed on again
        (operator). ``cleared`` False in the reply: it was not marked unhealthy."""
        try:
            cmd = GpuClearCmd(uuid=uuid)
            msgspec.json.decode(encode(cmd), type=GpuClearCmd)  # the bounds the daemon checks
        except msgspec.ValidationError as exc:
            return _reject("bad_request", f"not a GPU UUID: {exc}", verb="gpu_clear")
        reply = await self._node_once(node, "gpu_clear", None, timeout, cmd=cmd)
        if isinstance(reply, GpuClearReply | Rejected):
            return reply
        return _reject("internal", f"unexpected {type(reply).__name__} to gpu_clear", verb="gpu_clear")

    async def _node_once(
        self, node: str, verb: str, after: str | None, timeout: float | None, *, cmd: msgspec.Struct | None = None
    ) -> NodeReply:
        try:
            validate_id(node, "node")
        except PoolManagerError as exc:
            return _reject(_code(exc), exc.message, verb=verb)
        cls = NODE_COMMANDS.get(verb)
        if cls is None:
            return _reject("unknown_verb", f"unknown node verb {verb!r}; known: {', '.join(NODE_COMMANDS)}", verb=verb)
        if cmd is None and verb == "gpu_clear":
            return _reject("bad_request", "gpu_clear needs a GPU UUID: use gpu_clear()", verb=verb)
        wait = self.timeout if timeout is None else timeout
        subject = self.subjects.node_command(node, verb)
        try:
            body = cmd if cmd is not None else (PoolsCmd(after=after) if after else cls())  # type: ignore[call-arg]
            msg = await self._request(subject, encode(body), wait, None)
        except _Denied:
            return _reject("permission_denied", f"permission denied: this NATS user may not ask node {node} for "
                           f"{verb} (the server refused {subject})", verb=verb)  # fmt: skip
        except nats.errors.NoRespondersError:
            return _reject("unavailable", f"no daemon serves node {node!r}", verb=verb)
        except nats.errors.TimeoutError:
            return _reject("unavailable", f"no reply from node {node} within {wait:g} s", verb=verb)
        except (nats.errors.Error, OSError) as exc:
            return _reject("unavailable", f"NATS: {exc or type(exc).__name__}", verb=verb)
        reply = self._decode(msg.data, verb=verb)
        if isinstance(reply, PoolsReply | InventoryReply | LifecycleReply | GpuClearReply | Rejected):
            return reply
        return _reject("internal", f"unexpected {type(reply).__name__} to node {verb}", verb=verb)

    async def discover(self, timeout: float | None = None, settle_s: float = 0.2) -> list[NodeInfo]:
        """Every daemon answering ``$SRV.PING.pool-managerd`` (any prefix), sorted by node.

        Waits up to ``timeout`` for the first answer, then ``settle_s`` more for the others.
        """
        wait = self.timeout if timeout is None else timeout
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        found: dict[str, NodeInfo] = {}
        try:
            await self.nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    break
                info = _node_info(msg.data)
                if info is not None:
                    found[info.id] = info
                    deadline = min(deadline, time.monotonic() + settle_s)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return sorted(found.values(), key=lambda i: (i.node, i.id))

    # --- events ----------------------------------------------------------------------------------

    def events(self, pool: str | None = None, *, node_events: bool = False) -> EventStream:
        """Live events of ``pool`` (``<prefix>.evt.<pool>.>``) or of every pool (``<prefix>.evt.>``);
        with ``node_events`` also ``<prefix>.node.*.evt.>``. Use as ``async with``; raises
        :class:`~pool_managerd.contract.errors.InvalidId` for an invalid pool id."""
        subjects = [self.subjects.pool_events(pool) if pool is not None else self.subjects.all_pool_events]
        if node_events:
            subjects.append(self.subjects.all_node_events)
        return EventStream(self.nc, subjects)

    async def command_and_wait(
        self,
        pool: str,
        verb: str,
        state: PoolState,
        *,
        wait_timeout: float = 60.0,
        on_reply: Callable[[CommandReply], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        command_id: str | None = None,
        traceparent: str | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> WaitResult:
        """Send a command, then follow the pool's events until it reaches ``state``.

        The subscription is made before the command is sent, so no event is missed. The wait
        ends when a ``state_changed`` event reaches ``state`` (``reached``), or comes to rest in
        another of :data:`RESTING_STATES` (``failed`` after a crash loop, ``unready`` after a
        stop, ``ready`` after an aborted reload), or after ``wait_timeout`` seconds
        (``timed_out``). A rejected command returns at once. ``on_reply`` sees the reply as soon as
        it arrives; ``on_event`` then sees every event of the command and after it, as it arrives
        (the same events end up in ``events``).
        """
        cid = command_id or uuid.uuid4().hex
        deadline = time.monotonic() + wait_timeout
        payload = self._payload(pool, verb, cid, fields)
        stream: EventStream | None = None
        reply: CommandReply
        if isinstance(payload, Rejected):
            reply = payload
        else:
            stream = self.events(pool)
            try:
                await stream.start()
            except (nats.errors.Error, OSError) as exc:
                reply = _reject("unavailable", f"NATS: {exc or type(exc).__name__}", pool=pool, verb=verb,
                                command_id=cid)  # fmt: skip
            else:
                reply = await self._request_pool(pool, verb, payload, cid, traceparent, timeout)
        try:
            if on_reply is not None:
                on_reply(reply)
            result = WaitResult(reply, state)
            if isinstance(reply, StatusReply):
                result.state = reply.pool.state
                result.reached = reply.pool.state == state
            if not isinstance(reply, Accepted) or stream is None:
                return result
            result.state = reply.state
            await _follow(stream, result, after_seq=reply.seq, command_id=cid, deadline=deadline, on_event=on_event)
            return result
        finally:
            if stream is not None:
                await stream.close()

    async def wait_for_state(
        self,
        pool: str,
        state: PoolState,
        timeout: float = 60.0,
        *,
        on_event: Callable[[Event], None] | None = None,
    ) -> WaitResult:
        """Wait until ``pool`` is in ``state``: subscribe, read its status, then follow events.

        Returns at once when the pool already is in ``state``. Unlike
        :meth:`command_and_wait`, a pool resting in another state does not end the wait: only
        ``state`` or the deadline do.
        """
        try:
            validate_id(pool, "pool")
        except PoolManagerError as exc:
            return WaitResult(_reject(_code(exc), exc.message, verb="status"), state)
        deadline = time.monotonic() + timeout
        async with self.events(pool) as stream:
            reply = await self.status(pool, timeout=max(0.001, deadline - time.monotonic()))
            result = WaitResult(reply, state)
            if not isinstance(reply, StatusReply):
                return result
            result.state = reply.pool.state
            if result.state == state:
                result.reached = True
                return result
            await _follow(stream, result, after_seq=reply.pool.seq, command_id=None, deadline=deadline,
                          on_event=on_event, stop_at_rest=False)  # fmt: skip
            return result


class _Denied(Exception):
    def __init__(self, subject: str) -> None:
        super().__init__(subject)
        self.subject = subject


class _LocalReject(PoolManagerError):
    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _follow(
    stream: EventStream,
    result: WaitResult,
    *,
    after_seq: int,
    command_id: str | None,
    deadline: float,
    on_event: Callable[[Event], None] | None,
    stop_at_rest: bool = True,
) -> None:
    """Collect events into ``result`` until the target state, a resting state, or the deadline.

    ``result.state`` is the state the reply reported, after the events up to ``after_seq`` (the
    reply's sequence): only later transitions decide the outcome. Events up to ``after_seq``
    are shown only when they carry our ``command_id`` (the command's own); older ones are noise
    from before it.
    """
    target = result.target

    def take(event: Event) -> None:
        result.events.append(event)
        if on_event is not None:
            on_event(event)

    def own(event: Event) -> bool:
        return event.seq > after_seq or (command_id is not None and event.command_id == command_id)

    result.reached = result.state == target
    if result.reached or (stop_at_rest and result.state in RESTING_STATES):
        # Settled by the reply alone. The command's own events were published before the reply,
        # so after a round trip they are in the buffer: show them, then stop.
        if after_seq > 0:
            await stream.flush()
        while (event := await stream.next(timeout=0)) is not None:
            if own(event):
                take(event)
        return
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            result.timed_out = True
            return
        event = await stream.next(timeout=left)
        if event is None or not own(event):
            continue
        take(event)
        body = event.body
        if event.seq <= after_seq or not isinstance(body, StateChanged):
            continue
        result.state = body.dst
        if body.dst == target:
            result.reached = True
            return
        if stop_at_rest and body.dst in RESTING_STATES:
            return


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _code(exc: PoolManagerError) -> RejectCode:
    return cast(RejectCode, exc.code)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _node_info(data: bytes) -> NodeInfo | None:
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict) or raw.get("name") != SERVICE_NAME:
        return None
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        metadata = {}
    meta = {str(k): str(v) for k, v in metadata.items()}
    return NodeInfo(node=meta.get("node", ""), id=str(raw.get("id", "")), version=str(raw.get("version", "")),
                    metadata=meta)  # fmt: skip
