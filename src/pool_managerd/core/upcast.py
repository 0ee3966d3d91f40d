"""Reading events of any schema version: older ones are upcast, step by step, by pure functions.

``UPCASTERS[v]`` turns a version-``v`` event (as plain JSON data) into a version ``v + 1`` one.
Version 1 is the first released shape, so the table is empty today; the first change of an
event's shape bumps :data:`pool_managerd.contract.messages.SCHEMA_VERSION` and adds the step here. The
golden logs under ``tests/golden/`` are replayed in CI, so a shape change without an upcaster
fails there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from pool_managerd.contract.errors import MalformedMessage
from pool_managerd.contract.messages import EVENT_DECODER, SCHEMA_VERSION, Event

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

UPCASTERS: dict[int, Upcaster] = {}
"""version → function from that version's JSON data to the next version's."""

FIRST_VERSION = 1


def upcast(data: dict[str, Any], upcasters: dict[int, Upcaster] | None = None) -> dict[str, Any]:
    """Bring plain event data to the current schema version."""
    steps = UPCASTERS if upcasters is None else upcasters
    version = data.get("v")
    if not isinstance(version, int) or version < FIRST_VERSION:
        raise MalformedMessage(f"event has no valid schema version (v={version!r})")
    if version > SCHEMA_VERSION:
        raise MalformedMessage(f"event schema v{version} is newer than this build's v{SCHEMA_VERSION}; upgrade")
    while version < SCHEMA_VERSION:
        step = steps.get(version)
        if step is None:
            raise MalformedMessage(f"no upcaster from event schema v{version} to v{version + 1}")
        data = step(dict(data))
        version += 1
        data["v"] = version
    return data


def decode_event(raw: bytes, upcasters: dict[int, Upcaster] | None = None) -> Event:
    """Bytes of an event of any supported version → a current :class:`Event`.

    The current version decodes straight into the Struct (the fast path replay relies on); only
    when that fails or the version is older is the data upcast first.
    """
    try:
        event = EVENT_DECODER.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        event = None
    if event is not None and event.v == SCHEMA_VERSION:
        return event
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(f"event is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage("event is not a JSON object")
    try:
        return msgspec.convert(upcast(data, upcasters), Event)
    except msgspec.ValidationError as exc:
        raise MalformedMessage(f"event does not match schema v{SCHEMA_VERSION}: {exc}") from None
