"""The oldest nats-server pool-managerd supports, and the check made at every connect (pure).

The event log fences each pool with ``Nats-Expected-Last-Subject-Sequence`` over the pool's
wildcard subject ``poold.evt.<pool>.>``, named by ``Nats-Expected-Last-Subject-Sequence-Subject``.
nats-server added that header in 2.11.0. An older server ignores it and compares the expected
sequence with the exact subject of the event instead: the pool's first event is accepted and
a later one on another subject is refused with ``wrong last sequence``, so the daemon would take
its own writes for a rival's and fence every pool. Below the floor there is no fence that works,
so the daemon refuses to run rather than run unfenced or fence itself.

The daemon reads the version from the server's INFO (``nc.connected_server_version``) on the
first connect and on every reconnect; :func:`check_server_version` turns it into a verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pool_managerd.contract.errors import PoolManagerError

__all__ = [
    "NATS_SERVER_FLOOR",
    "NATS_SERVER_FLOOR_TEXT",
    "NATS_SERVER_FLOOR_WHY",
    "NatsServerTooOld",
    "ServerVersion",
    "check_server_version",
    "parse_server_version",
]

NATS_SERVER_FLOOR: tuple[int, int, int] = (2, 11, 0)
"""The oldest nats-server release the daemon runs against (major, minor, patch)."""

NATS_SERVER_FLOOR_TEXT = ".".join(str(part) for part in NATS_SERVER_FLOOR)

NATS_SERVER_FLOOR_WHY = (
    "the event log's fencing needs the Nats-Expected-Last-Subject-Sequence-Subject header, "
    f"which nats-server added in {NATS_SERVER_FLOOR_TEXT}; an older server ignores it and "
    "would refuse the daemon's own events and fence every pool"
)

_SEMVER = re.compile(
    r"^v?(?P<major>0|[1-9]\d{0,8})\.(?P<minor>0|[1-9]\d{0,8})\.(?P<patch>0|[1-9]\d{0,8})"
    r"(?:-(?P<pre>[0-9A-Za-z.-]{1,64}))?(?:\+(?P<build>[0-9A-Za-z.-]{1,64}))?$"
)


@dataclass(frozen=True, slots=True)
class ServerVersion:
    """A nats-server version as its INFO reports it."""

    major: int
    minor: int
    patch: int
    prerelease: str = ""

    @property
    def release(self) -> tuple[int, int, int]:
        """(major, minor, patch)."""
        return (self.major, self.minor, self.patch)

    def at_least(self, floor: tuple[int, int, int]) -> bool:
        """Whether this version is ``floor`` or newer; a pre-release of ``floor`` itself is older
        (semver: 2.11.0-RC.1 precedes 2.11.0, and may predate what 2.11.0 shipped)."""
        if self.release != floor:
            return self.release > floor
        return not self.prerelease

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        return f"{text}-{self.prerelease}" if self.prerelease else text


class NatsServerTooOld(PoolManagerError):
    """The connected nats-server is older than :data:`NATS_SERVER_FLOOR`, or reports no version.

    ``message`` is one line naming the server's version, the floor and why; the daemon prints it
    and exits 2 before it touches any pool.
    """

    code = "unavailable"

    def __init__(self, reported: str | None, url: str | None = None) -> None:
        where = f" at {url}" if url else ""
        floor = NATS_SERVER_FLOOR_TEXT
        if reported is None:
            head = f"nats-server{where} reports no usable version; pool-managerd needs {floor} or newer"
        else:
            head = f"nats-server {reported}{where} is older than {floor}, the oldest pool-managerd supports"
        super().__init__(f"{head}: {NATS_SERVER_FLOOR_WHY}; upgrade nats-server to {floor} or newer")
        self.reported = reported
        self.url = url


def parse_server_version(text: str) -> ServerVersion | None:
    """The version in an INFO ``version`` string (``2.11.0``, ``v2.12.0-RC.2``), or None when it
    is not a semantic version."""
    match = _SEMVER.match(text.strip()) if len(text) <= 200 else None
    if match is None:
        return None
    return ServerVersion(int(match["major"]), int(match["minor"]), int(match["patch"]), match["pre"] or "")


def check_server_version(version: ServerVersion | str | None, *, url: str | None = None) -> ServerVersion:
    """Return the parsed version when it is :data:`NATS_SERVER_FLOOR` or newer; raise
    :class:`NatsServerTooOld` otherwise. A server that reports no version, or one that is not
    semver, is refused too: nothing says it has the header."""
    parsed = parse_server_version(version) if isinstance(version, str) else version
    if parsed is None:
        raise NatsServerTooOld(None, url)
    if not parsed.at_least(NATS_SERVER_FLOOR):
        raise NatsServerTooOld(str(parsed), url)
    return parsed
