"""Subject builders and parsers for the NATS contract (DESIGN.md §5). Pure.

Every id is validated before it enters a subject, so a hostile pool name can never inject
wildcards or extra tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pool_managerd.contract.errors import InvalidId, InvalidSubject

DEFAULT_PREFIX = "poold"
STREAM_NAME = "POOLD_EVENTS"
AUDIT_STREAM = "POOLD_AUDIT"
KV_BUCKET = "poold_pools"
OWNERS_BUCKET = "poold_owners"
"""KV bucket of the pools' ownership leases: key ``<prefix>.<pool>``."""
SERVICE_NAME = "pool-managerd"

ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TOKEN_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid pool/node id, else raise :class:`InvalidId`."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidId(what, value)
    return value


def _token(value: str, what: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise InvalidSubject(f"{what} {value!r} is not a valid subject token")
    return value


@dataclass(frozen=True, slots=True)
class Subjects:
    """All subjects under one prefix (``poold`` unless configured)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise InvalidSubject(f"prefix {self.prefix!r} must be dot-separated tokens without wildcards")

    # pool commands
    def command(self, pool: str, verb: str) -> str:
        """``<prefix>.cmd.<pool>.<verb>``"""
        return f"{self.prefix}.cmd.{validate_id(pool, 'pool')}.{_token(verb, 'verb')}"

    def commands_of(self, pool: str) -> str:
        """Wildcard for every command of one pool: ``<prefix>.cmd.<pool>.*``"""
        return f"{self.prefix}.cmd.{validate_id(pool, 'pool')}.*"

    # node commands
    def node_command(self, node: str, verb: str) -> str:
        """``<prefix>.node.<node>.cmd.<verb>``"""
        return f"{self.prefix}.node.{validate_id(node, 'node')}.cmd.{_token(verb, 'verb')}"

    # events
    def pool_event(self, pool: str, event: str) -> str:
        """``<prefix>.evt.<pool>.<event>``"""
        return f"{self.prefix}.evt.{validate_id(pool, 'pool')}.{_token(event, 'event')}"

    def pool_events(self, pool: str) -> str:
        """Every event of one pool: ``<prefix>.evt.<pool>.>`` (the fencing subject filter)."""
        return f"{self.prefix}.evt.{validate_id(pool, 'pool')}.>"

    def node_event(self, node: str, event: str) -> str:
        """``<prefix>.node.<node>.evt.<event>``"""
        return f"{self.prefix}.node.{validate_id(node, 'node')}.evt.{_token(event, 'event')}"

    def node_events(self, node: str) -> str:
        return f"{self.prefix}.node.{validate_id(node, 'node')}.evt.>"

    @property
    def all_pool_events(self) -> str:
        return f"{self.prefix}.evt.>"

    @property
    def all_node_events(self) -> str:
        return f"{self.prefix}.node.*.evt.>"

    @property
    def stream_subjects(self) -> list[str]:
        """The subjects stream ``POOLD_EVENTS`` captures."""
        return [self.all_pool_events, self.all_node_events]

    # audit (refused commands; a stream of its own, size-bounded)
    def audit(self, node: str, code: str) -> str:
        """``<prefix>.audit.<node>.<code>``"""
        return f"{self.prefix}.audit.{validate_id(node, 'node')}.{_token(code, 'code')}"

    @property
    def all_audit(self) -> str:
        return f"{self.prefix}.audit.>"

    # health
    def health(self, pool: str) -> str:
        """``<prefix>.health.<pool>``"""
        return f"{self.prefix}.health.{validate_id(pool, 'pool')}"

    @property
    def all_health(self) -> str:
        return f"{self.prefix}.health.*"

    # parsing
    def owner_key(self, pool: str) -> str:
        """``<prefix>.<pool>``: the pool's key in the ownership bucket."""
        return f"{self.prefix}.{validate_id(pool, 'pool')}"

    def parse_command(self, subject: str) -> tuple[str, str]:
        """``<prefix>.cmd.<pool>.<verb>`` → (pool, verb); raises on anything else."""
        rest = self._strip(subject, "cmd")
        parts = rest.split(".")
        if len(parts) != 2:
            raise InvalidSubject(f"{subject!r} is not <prefix>.cmd.<pool>.<verb>")
        return validate_id(parts[0], "pool"), parts[1]

    def parse_node_command(self, subject: str) -> tuple[str, str]:
        """``<prefix>.node.<node>.cmd.<verb>`` → (node, verb)."""
        rest = self._strip(subject, "node")
        parts = rest.split(".")
        if len(parts) != 3 or parts[1] != "cmd":
            raise InvalidSubject(f"{subject!r} is not <prefix>.node.<node>.cmd.<verb>")
        return validate_id(parts[0], "node"), parts[2]

    def parse_health(self, subject: str) -> str:
        """``<prefix>.health.<pool>`` → pool."""
        rest = self._strip(subject, "health")
        if "." in rest:
            raise InvalidSubject(f"{subject!r} is not <prefix>.health.<pool>")
        return validate_id(rest, "pool")

    def parse_pool_event(self, subject: str) -> tuple[str, str]:
        """``<prefix>.evt.<pool>.<event>`` → (pool, event)."""
        rest = self._strip(subject, "evt")
        parts = rest.split(".")
        if len(parts) != 2:
            raise InvalidSubject(f"{subject!r} is not <prefix>.evt.<pool>.<event>")
        return validate_id(parts[0], "pool"), parts[1]

    def _strip(self, subject: str, kind: str) -> str:
        head = f"{self.prefix}.{kind}."
        if not subject.startswith(head):
            raise InvalidSubject(f"{subject!r} does not start with {head!r}")
        return subject[len(head) :]


def msg_id(pool: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of a pool event: ``<pool>:<seq>`` (server-side dedupe on retry)."""
    return f"{pool}:{seq}"
