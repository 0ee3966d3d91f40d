"""NATS users and their subject permissions: the one source of the shipped server configuration
(``deploy/nats-server.conf``) and of the embedded server's accounts.

Four users, each allowed exactly what its tools do and nothing else (everything not allowed is
refused by the server):

* ``daemon``: pool-managerd itself. The only identity that may write events, snapshots and
  health results; serves commands and ``$SRV`` discovery; replies to what it receives.
* ``admin``: every command, ``reload`` included (a reload changes what the engine runs).
* ``operator``: every command but ``reload``, plus everything ``viewer`` may do.
* ``viewer``: ``status`` and the node reads (``pools``, ``inventory``, ``lifecycle``), ``$SRV``
  discovery, live events, the event stream and the snapshot bucket through JetStream reads.

Each user receives replies only on its own inbox prefix ``_INBOX.<user>`` (clients connect
with that ``inbox_prefix``), so no user can read another user's replies or the daemon's
JetStream traffic. The daemon alone has ``allow_responses``: other users never get to publish
on a reply subject, so none can forge a JetStream acknowledgement for the daemon's events.

:func:`server_config` renders the ``authorization`` block. With no passwords it references
environment variables (``$POOLD_DAEMON_PASSWORD`` ...), which is the shipped file; with
passwords it is what ``pool-managerd run`` writes for its embedded server. The two differ only
in the password lines, and a test checks the shipped file against this module.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.subjects import (
    AUDIT_STREAM,
    DEFAULT_PREFIX,
    KV_BUCKET,
    OWNERS_BUCKET,
    SERVICE_NAME,
    STREAM_NAME,
)

__all__ = [
    "AUTH_DIR",
    "ROLES",
    "CredentialError",
    "Credentials",
    "Permissions",
    "Role",
    "credentials_path",
    "ensure_credentials",
    "inbox_prefix",
    "load_credentials",
    "password_env",
    "permissions",
    "server_config",
]

Role = Literal["daemon", "admin", "operator", "viewer"]
ROLES: Final[tuple[Role, ...]] = ("daemon", "admin", "operator", "viewer")

AUTH_DIR: Final = "auth"
"""Where ``run`` keeps the embedded server's credentials, under the run dir (mode 0700)."""

_READ_NODE_VERBS: Final = ("pools", "inventory", "lifecycle")
_OPERATOR_VERBS: Final = ("preload", "drain", "stop", "reset", "lease", "release", "ack_corrupt")
_KV_STREAM: Final = f"KV_{KV_BUCKET}"
_OWNERS_STREAM: Final = f"KV_{OWNERS_BUCKET}"


class CredentialError(PoolManagerError):
    """A credentials file or directory that cannot be used (missing, unreadable, malformed)."""

    code = "bad_request"


@dataclass(frozen=True, slots=True)
class Permissions:
    """What one user may publish and subscribe to, as nats-server subject patterns."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: int = 0
    """How many messages it may publish to the reply subject of each message it receives (0: none)."""
    connection_types: tuple[str, ...] = ("STANDARD",)


def inbox_prefix(user: str) -> str:
    """The inbox prefix a user's client must connect with: ``_INBOX.<user>``."""
    return f"_INBOX.{user}"


def password_env(role: str) -> str:
    """The environment variable the shipped configuration reads ``role``'s password from."""
    return f"POOLD_{role.upper()}_PASSWORD"


def _stream_reads(stream: str) -> list[str]:
    """Reading a stream: its info, single messages, and ephemeral consumers (create, pull, delete)."""
    api = "$JS.API"
    return [
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*",
    ]


def _viewer(prefix: str, user: str) -> tuple[list[str], list[str]]:
    publish = [
        f"{prefix}.cmd.*.status",
        *(f"{prefix}.node.*.cmd.{verb}" for verb in _READ_NODE_VERBS),
        "$SRV.PING",
        *(f"$SRV.{kind}.{SERVICE_NAME}" for kind in ("PING", "INFO", "STATS")),
        *(f"$SRV.{kind}.{SERVICE_NAME}.*" for kind in ("PING", "INFO", "STATS")),
        *_stream_reads(STREAM_NAME),
        *_stream_reads(_KV_STREAM),
        # Flow-control answers of the ordered consumer behind a KV watch.
        f"$JS.FC.{_KV_STREAM}.>",
        *_stream_reads(_OWNERS_STREAM),
    ]
    subscribe = [
        f"{prefix}.evt.>",
        f"{prefix}.node.*.evt.>",
        f"{prefix}.health.*",
        f"{inbox_prefix(user)}.>",
    ]
    return publish, subscribe


def permissions(role: Role, prefix: str = DEFAULT_PREFIX) -> Permissions:
    """The permissions of ``role`` for a deployment with subject prefix ``prefix``."""
    if role == "daemon":
        publish = [
            f"{prefix}.evt.>",
            f"{prefix}.node.*.evt.>",
            f"{prefix}.health.*",
            f"$JS.API.STREAM.CREATE.{STREAM_NAME}",
            f"$JS.API.STREAM.UPDATE.{STREAM_NAME}",
            *_stream_reads(STREAM_NAME),
            f"$JS.API.STREAM.CREATE.{_KV_STREAM}",
            f"$KV.{KV_BUCKET}.>",
            *_stream_reads(_KV_STREAM),
            # Ownership leases: only daemons write them (compare-and-set on the revision).
            f"$JS.API.STREAM.CREATE.{_OWNERS_STREAM}",
            f"$KV.{OWNERS_BUCKET}.{prefix}.>",
            *_stream_reads(_OWNERS_STREAM),
            # Refused commands: the size-bounded audit stream (written, never read, by the daemon).
            f"{prefix}.audit.>",
            f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}",
            f"$JS.API.STREAM.UPDATE.{AUDIT_STREAM}",
            f"$JS.API.STREAM.INFO.{AUDIT_STREAM}",
        ]
        subscribe = [
            f"{prefix}.cmd.*.*",
            f"{prefix}.node.*.cmd.*",
            f"{prefix}.health.*",
            "$SRV.*",
            f"$SRV.*.{SERVICE_NAME}",
            f"$SRV.*.{SERVICE_NAME}.*",
            f"{inbox_prefix(role)}.>",
        ]
        # Replies to commands, discovery and JetStream flow control go to whatever reply subject
        # the request carried: allow_responses grants exactly that. A command reaches the daemon
        # twice (its node's pool endpoint and the unknown-pool catch-all) and the server counts every
        # delivery against the allowance, so one reply needs two.
        return Permissions(tuple(publish), tuple(subscribe), responses=2)
    publish, subscribe = _viewer(prefix, role)
    if role in ("operator", "admin"):
        verbs = _OPERATOR_VERBS + (("reload",) if role == "admin" else ())
        # gpu_clear puts a device a fault took out back into placement: an operator's call.
        # Operators read the audit stream too (whose commands were refused and why); viewers
        # do not: it names other clients' command ids.
        publish = [f"{prefix}.cmd.*.{verb}" for verb in verbs] + [f"{prefix}.node.*.cmd.gpu_clear"] + publish
        publish += _stream_reads(AUDIT_STREAM)
    # Browser dashboards connect over websocket; the daemon's identity never does.
    return Permissions(tuple(publish), tuple(subscribe), connection_types=("STANDARD", "WEBSOCKET"))


def _list(items: tuple[str, ...], indent: str) -> str:
    inner = "".join(f"{indent}  {json.dumps(item)}\n" for item in items)
    return f"[\n{inner}{indent}]"


def server_config(passwords: Mapping[str, str] | None = None, prefix: str = DEFAULT_PREFIX) -> str:
    """The nats-server ``authorization`` block for every role.

    ``passwords`` (role → password) gives literal passwords; without it each password is the
    environment variable :func:`password_env` names, resolved by nats-server at start (it
    refuses to start when one is unset, so there is never an empty password).
    """
    out = [
        "# pool-managerd: NATS users and subject permissions.",
        "# Generated from pool_managerd/accounts.py (`pool-managerd nats-config`); do not edit by hand.",
        "# Each user's client connects with inbox_prefix _INBOX.<user>.",
        "authorization {",
        "  users: [",
    ]
    for role in ROLES:
        perms = permissions(role, prefix)
        if passwords is None:
            password = f"${password_env(role)}"
        else:
            password = json.dumps(passwords[role])
        out += [
            "    {",
            f"      user: {json.dumps(role)}",
            f"      password: {password}",
            f"      allowed_connection_types: {json.dumps(list(perms.connection_types))}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(perms.publish, '        ')} }}",
            f"        subscribe: {{ allow: {_list(perms.subscribe, '        ')} }}",
        ]
        if perms.responses:
            out.append(f"        allow_responses: {{ max: {perms.responses} }}")
        out += ["      }", "    }"]
    out += ["  ]", "}", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Credentials of the embedded server
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user's name, password and inbox prefix, plus where the server listens (when known)."""

    user: str
    password: str
    inbox_prefix: str
    url: str | None = None
    websocket_url: str | None = None

    def to_json(self) -> str:
        """The credentials file's content."""
        raw = {"user": self.user, "password": self.password, "inbox_prefix": self.inbox_prefix}
        if self.url:
            raw["url"] = self.url
        if self.websocket_url:
            raw["websocket_url"] = self.websocket_url
        return json.dumps(raw, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Credentials:
        """Parse a credentials file; raises :class:`CredentialError` naming ``where``."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise CredentialError(f"{where}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise CredentialError(f"{where}: expected a JSON object")
        fields: dict[str, str | None] = {}
        for key in ("user", "password", "inbox_prefix", "url", "websocket_url"):
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise CredentialError(f"{where}: {key} must be a string")
            fields[key] = value
        user, password = fields["user"], fields["password"]
        if not user or not password:
            raise CredentialError(f"{where}: user and password are required")
        return cls(user=user, password=password, inbox_prefix=fields["inbox_prefix"] or inbox_prefix(user),
                   url=fields["url"], websocket_url=fields["websocket_url"])  # fmt: skip


def credentials_path(directory: Path, role: str) -> Path:
    """``<dir>/auth/<role>.json`` when ``dir`` is a run dir, else ``<dir>/<role>.json``."""
    auth = directory / AUTH_DIR
    return (auth if auth.is_dir() else directory) / f"{role}.json"


def load_credentials(directory: Path, role: str) -> Credentials:
    """Read ``role``'s credentials from a run dir (or its ``auth`` dir)."""
    path = credentials_path(directory, role)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialError(f"no credentials for {role!r}: {path} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror or exc}") from None
    return Credentials.from_json(text, str(path))


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_credentials(run_dir: Path) -> dict[Role, Credentials]:
    """The embedded server's credentials in ``<run_dir>/auth``: kept from an earlier run when
    every file is intact (clients that hold them keep working across restarts), else generated
    afresh with random passwords. The directory is 0700 and each file 0600."""
    auth = run_dir / AUTH_DIR
    auth.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(auth, 0o700)
    found: dict[Role, Credentials] = {}
    for role in ROLES:
        try:
            creds = load_credentials(run_dir, role)
        except CredentialError:
            break
        if creds.user != role:
            break
        found[role] = creds
    if len(found) == len(ROLES):
        return found
    fresh: dict[Role, Credentials] = {
        role: Credentials(user=role, password=secrets.token_urlsafe(24), inbox_prefix=inbox_prefix(role))
        for role in ROLES
    }
    for role, creds in fresh.items():
        _write_private(auth / f"{role}.json", creds.to_json())
    return fresh


def publish_locations(run_dir: Path, creds: Mapping[Role, Credentials], url: str, websocket_url: str | None) -> None:
    """Record where the server listens in each credentials file, so ``--creds-dir`` is enough."""
    auth = run_dir / AUTH_DIR
    for role, c in creds.items():
        updated = Credentials(c.user, c.password, c.inbox_prefix, url=url, websocket_url=websocket_url)
        _write_private(auth / f"{role}.json", updated.to_json())
