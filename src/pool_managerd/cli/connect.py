"""How the command-line tools (``ctl``, ``watch``, ``replay``, ``export``) find and reach NATS.

Where to connect and as whom, first match wins:

* URL: ``--url``, ``$POOL_MANAGERD_URL``, the ``url`` of the credentials file, ``nats://127.0.0.1:4222``;
* user: ``--user``/``--password`` (or ``$POOL_MANAGERD_USER``/``$POOL_MANAGERD_PASSWORD``), else
  the credentials of ``--role`` in ``--creds-dir`` (or ``$POOL_MANAGERD_CREDS_DIR``): the run dir
  of ``pool-managerd run``/``demo``, which keeps one file per user in ``<run_dir>/auth``;
* role: ``--role`` (or ``$POOL_MANAGERD_ROLE``), else the least one the tool needs (``viewer``
  for reads, ``operator`` for commands, ``admin`` for ``reload``).

A user's replies arrive on its own inbox prefix ``_INBOX.<user>``, which is what the shipped
permissions allow. TLS: ``--tls-ca`` (and ``--tls-cert``/``--tls-key`` for a client certificate).
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from pool_managerd.accounts import ROLES, CredentialError, inbox_prefix, load_credentials
from pool_managerd.adapters.nats_connect import ConnectFailed, first_connect
from pool_managerd.contract.subjects import DEFAULT_PREFIX

__all__ = [
    "CREDS_DIR_ENV",
    "DEFAULT_URL",
    "URL_ENV",
    "Target",
    "TargetError",
    "add_auth_arguments",
    "add_connection_arguments",
    "connect",
    "resolve_target",
]

DEFAULT_URL = "nats://127.0.0.1:4222"
URL_ENV = "POOL_MANAGERD_URL"
CREDS_DIR_ENV = "POOL_MANAGERD_CREDS_DIR"
ROLE_ENV = "POOL_MANAGERD_ROLE"
USER_ENV = "POOL_MANAGERD_USER"
PASSWORD_ENV = "POOL_MANAGERD_PASSWORD"


class TargetError(Exception):
    """The connection options cannot be used (a missing credentials file, a user without password)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect and as whom."""

    url: str
    user: str | None = None
    password: str | None = None
    inbox_prefix: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def who(self) -> str:
        """``at nats://h:4222 as user 'viewer'``, for messages."""
        return f"at {self.url}" + (f" as user {self.user!r}" if self.user else "")


def add_connection_arguments(parser: argparse.ArgumentParser, *, timeout: bool = True) -> None:
    """``--url --prefix [--timeout] --creds-dir --role --user --password --tls-*``."""
    parser.add_argument(
        "--url",
        default=None,
        help=f"NATS server URL, or several comma-separated (a cluster) (default: ${URL_ENV}, the credentials' url, "
        f"or {DEFAULT_URL})",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"subject prefix (default: {DEFAULT_PREFIX})")
    if timeout:
        parser.add_argument(
            "--timeout", type=float, default=5.0, metavar="S",
            help="seconds to wait for NATS and for a reply (default 5)",
        )  # fmt: skip
    add_auth_arguments(parser)


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """``--creds-dir --role --user --password --tls-ca --tls-cert --tls-key``."""
    auth = parser.add_argument_group("authentication")
    auth.add_argument(
        "--creds-dir", type=Path, default=os.environ.get(CREDS_DIR_ENV) or None, metavar="DIR",
        help=f"run dir of `pool-managerd run`/`demo` (or its auth/ dir) holding the users' credentials "
        f"(default: ${CREDS_DIR_ENV})",
    )  # fmt: skip
    auth.add_argument(
        "--role", choices=[r for r in ROLES if r != "daemon"], default=os.environ.get(ROLE_ENV) or None,
        help=f"whose credentials to use from --creds-dir (default: ${ROLE_ENV}, else the least the command needs)",
    )  # fmt: skip
    auth.add_argument("--user", default=os.environ.get(USER_ENV) or None, help=f"NATS user (default: ${USER_ENV})")
    auth.add_argument(
        "--password", default=os.environ.get(PASSWORD_ENV) or None,
        help=f"NATS password (default: ${PASSWORD_ENV}; prefer the variable: arguments show in ps)",
    )  # fmt: skip
    auth.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA certificate(s) to verify the server with")
    auth.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (with --tls-key)")
    auth.add_argument("--tls-key", type=Path, metavar="FILE", help="client private key")


def resolve_target(args: argparse.Namespace, default_role: str) -> Target:
    """The :class:`Target` the options describe; raises :class:`TargetError`."""
    url = args.url or os.environ.get(URL_ENV) or None
    user, password = args.user, args.password
    inbox: str | None = inbox_prefix(user) if user else None
    if user and not password:
        raise TargetError(f"--user {user} needs a password (--password or ${PASSWORD_ENV})")
    if args.creds_dir is not None:
        role = args.role or default_role
        try:
            creds = load_credentials(Path(args.creds_dir), role)
        except CredentialError as exc:
            if not user:
                raise TargetError(exc.message) from None
        else:
            url = url or creds.url
            if not user:
                user, password, inbox = creds.user, creds.password, creds.inbox_prefix
    tls: ssl.SSLContext | None = None
    if args.tls_ca or args.tls_cert:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise TargetError("--tls-cert and --tls-key go together")
        try:
            tls = ssl.create_default_context(cafile=str(args.tls_ca) if args.tls_ca else None)
            if args.tls_cert is not None:
                tls.load_cert_chain(str(args.tls_cert), str(args.tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise TargetError(f"TLS files: {exc}") from None
    return Target(url=url or DEFAULT_URL, user=user, password=password, inbox_prefix=inbox, tls=tls)


async def connect(
    target: Target,
    timeout: float,
    *,
    reconnect_forever: bool = False,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    name: str = "pool-managerd-cli",
) -> NATS:
    """Connect within ``timeout`` s; raises ``ConnectionError`` with one readable sentence.

    ``reconnect_forever`` (for ``watch``) keeps reconnecting after a connection is lost; the first
    connection still has to succeed within ``timeout``. Refused credentials or TLS end at once.
    """

    async def quiet(exc: Exception) -> None:
        return None

    opts: dict[str, Any] = {
        # A cluster: "--url nats://a:4222,nats://b:4222" lists several; any one that answers will do.
        "servers": [url.strip() for url in target.url.split(",") if url.strip()] or [target.url],
        "name": name,
        "connect_timeout": max(0.1, min(timeout, 5.0)),
        "allow_reconnect": True,
        # nats-py retries the *first* connect as many times as it may reconnect: one retry keeps a
        # refused connection fast; -1 would retry it until the deadline.
        "max_reconnect_attempts": -1 if reconnect_forever else 1,
        "reconnect_time_wait": 0.5 if reconnect_forever else 0.1,
        "error_cb": error_cb or quiet,
    }
    if target.user:
        opts["user"], opts["password"] = target.user, target.password
    if target.inbox_prefix:
        opts["inbox_prefix"] = target.inbox_prefix
    if target.tls is not None:
        opts["tls"] = target.tls
    if reconnected_cb is not None:
        opts["reconnected_cb"] = reconnected_cb
    try:
        return await first_connect(opts, timeout=timeout, who=target.who, log_retries=False)
    except ConnectFailed as exc:
        raise ConnectionError(exc.message) from None
