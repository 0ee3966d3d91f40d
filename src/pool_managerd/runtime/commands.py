"""Decoding and answering commands off the wire: size limits, verbs, typed rejections, and the
``command_id`` cache that makes retries idempotent (same reply, applied once)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast, get_args

import msgspec

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.limits import clip, json_problem
from pool_managerd.contract.messages import (
    MAX_PAYLOAD_BYTES,
    NODE_COMMANDS,
    POOL_COMMANDS,
    REJECT_STATUS,
    NodeCommand,
    PoolCommand,
    RejectCode,
    Rejected,
    StatusCmd,
)

_DECODERS = {verb: msgspec.json.Decoder(cls) for verb, cls in POOL_COMMANDS.items()}
_NODE_DECODERS = {verb: msgspec.json.Decoder(cls) for verb, cls in NODE_COMMANDS.items()}


class CommandError(PoolManagerError):
    """A command that cannot be applied, with the stable code its rejection carries."""

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _guard(data: bytes, what: str) -> None:
    """Size and depth first: no decoder ever sees a payload it could choke on."""
    problem = json_problem(data, MAX_PAYLOAD_BYTES)
    if problem is not None:
        raise CommandError(cast(RejectCode, problem[0]), f"{what}: {problem[1]}")


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes, what: str) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise CommandError("bad_request", clip(f"invalid {what}: {exc}")) from None
    except msgspec.DecodeError as exc:
        raise CommandError("bad_request", clip(f"malformed JSON in {what}: {exc}")) from None
    except RecursionError:
        # The depth guard should make this unreachable; never let it escape as exception text.
        raise CommandError("bad_request", f"{what}: JSON nested too deep") from None


def decode_pool_command(verb: str, data: bytes) -> PoolCommand:
    """Bytes → the command for ``verb``; raises :class:`CommandError` with a clear message."""
    _guard(data, f"{verb} command")
    decoder = _DECODERS.get(verb)
    if decoder is None:
        raise CommandError("unknown_verb", f"unknown verb {verb!r}; known: {', '.join(POOL_COMMANDS)}")
    if not data.strip():
        if verb == "status":
            # A bare status request (e.g. `nats req poold.cmd.p.status ''`) needs no id: it changes nothing.
            return StatusCmd(command_id="status")
        data = b"{}"
    command: PoolCommand = _decode(decoder, data, f"{verb} command")
    return command


def decode_node_command(verb: str, data: bytes) -> NodeCommand:
    """Bytes → the node command for ``verb``; raises :class:`CommandError` with a clear message."""
    _guard(data, f"node {verb} command")
    decoder = _NODE_DECODERS.get(verb)
    if decoder is None:
        raise CommandError("unknown_verb", f"unknown node verb {verb!r}; known: {', '.join(NODE_COMMANDS)}")
    command: NodeCommand = _decode(decoder, data if data.strip() else b"{}", f"node {verb} command")
    return command


_CODES: frozenset[str] = frozenset(get_args(RejectCode))


def rejection(
    code: str, message: str, *, pool: str | None = None, verb: str | None = None, command_id: str | None = None
) -> Rejected:
    """A typed rejection; a code outside the stable set becomes ``bad_request`` (never a leak)."""
    stable = cast(RejectCode, code) if code in _CODES else "bad_request"
    return Rejected(command_id=command_id, pool=pool, verb=verb, code=stable, message=message)


ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MAX_ERROR_HEADER = 256
"""Longest ``Nats-Service-Error`` value; the full message is in the body."""

_REJECTED_DECODER = msgspec.json.Decoder(Rejected)


def rejected_in(body: bytes) -> Rejected | None:
    """The rejection an encoded reply carries, or None for any other reply."""
    if not body.startswith(b'{"type":"rejected"'):
        return None
    try:
        return _REJECTED_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def error_headers(reply: Rejected) -> dict[str, str]:
    """The nats micro error headers of a rejection: ``Nats-Service-Error`` (the message on one
    line, bounded) and ``Nats-Service-Error-Code`` (the HTTP-style status of its code)."""
    description = " ".join(reply.message.split())[:MAX_ERROR_HEADER]
    return {ERROR_HEADER: description or reply.code, ERROR_CODE_HEADER: REJECT_STATUS.get(reply.code, "400")}


@dataclass(slots=True)
class _Cached:
    fingerprint: str
    reply: asyncio.Future[bytes]
    at: float


CACHE_MAX_ENTRIES = 10_000
CACHE_TTL_S = 600.0
"""How long a reply is remembered (and rebuilt from the log after a restart): five times the
event stream's 120 s ``Nats-Msg-Id`` dedupe window, so a client retrying within its own
timeouts always meets its first answer."""


class CommandCache:
    """Remembers replies by (pool, command_id) so a retried command is applied once.

    A retry with the same id and the same decoded command (same fingerprint, see
    :func:`~pool_managerd.contract.messages.command_fingerprint`) gets the first reply, waiting for it if
    the first is still in flight; the same id with another verb or other field values is a
    ``command_id_conflict``. Bounded by count and by age (``ttl_s``, wall clock, so that replies
    rebuilt from the log after a restart age from when they were first given); an entry still in
    flight is never evicted, and the ones behind it still expire. Status reads are never cached.
    """

    def __init__(
        self, max_entries: int = CACHE_MAX_ENTRIES, ttl_s: float = CACHE_TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self.hits = 0

    async def run(self, pool: str, command_id: str, fingerprint: str,
                  apply: Callable[[], Awaitable[bytes]]) -> bytes:  # fmt: skip
        """Return the reply for this command, applying it only the first time its id is seen."""
        now = self.clock()
        self._expire(now)
        key = (pool, command_id)
        cached = self._entries.get(key)
        if cached is not None:
            if cached.fingerprint != fingerprint:
                raise CommandError(
                    "command_id_conflict",
                    f"command_id {command_id!r} was already used for a different command on pool {pool!r}",
                )
            self.hits += 1
            return await asyncio.shield(cached.reply)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._entries[key] = _Cached(fingerprint, fut, now)
        try:
            reply = await apply()
        except BaseException as exc:
            # A failure is not a reply: forget it so a retry can be applied.
            self._entries.pop(key, None)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        fut.set_result(reply)
        return reply

    def seed(self, pool: str, command_id: str, fingerprint: str, reply: bytes, at: float) -> None:
        """Remember a reply given before a restart (rebuilt from the event log)."""
        if self.clock() - at > self.ttl_s:
            return
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        fut.set_result(reply)
        self._entries[(pool, command_id)] = _Cached(fingerprint, fut, at)
        self._entries.move_to_end((pool, command_id))
        self._expire(self.clock())

    def forget(self, pool: str, command_id: str) -> None:
        """Drop one entry (a reply that must not be replayed, e.g. ``overloaded``)."""
        self._entries.pop((pool, command_id), None)

    def _expire(self, now: float) -> None:
        over = len(self._entries) - self.max_entries
        for key in list(self._entries):
            entry = self._entries[key]
            if over <= 0 and now - entry.at <= self.ttl_s:
                break  # oldest first: everything after this one is younger
            if not entry.reply.done():
                continue  # in flight: its caller is still waiting for it
            del self._entries[key]
            over -= 1

    def __len__(self) -> int:
        return len(self._entries)
