"""The daemon's NATS connection: the embedded server when none is configured, the first connect
and its options, the client's callbacks, whether the server connected now may be written to,
what the daemon learns of the server (version, URL), and a flush that survives a cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS

from pool_managerd.accounts import Credentials, Role, inbox_prefix
from pool_managerd.adapters.nats_connect import first_connect, is_permission_violation
from pool_managerd.config import DaemonConfig, NatsConfig
from pool_managerd.contract.nats_version import NatsServerTooOld, ServerVersion, check_server_version

if TYPE_CHECKING:
    from pool_managerd.adapters.embedded_nats import NatsServer
    from pool_managerd.runtime.daemon import Daemon

log = logging.getLogger(__name__)


# --- the embedded server -------------------------------------------------------------------------


def embedded_server(config: DaemonConfig) -> tuple[NatsServer, dict[Role, Credentials]]:
    """The embedded nats-server with the shipped accounts, not started yet, and every user's credentials.

    Credentials live in ``<run_dir>/auth`` (0700; one 0600 JSON file per user); ``ctl``,
    ``watch`` and ``demo`` read them with ``--creds-dir <run_dir>``. The daemon connects as
    ``daemon``. Not started here, so the caller holds the server (and a stop during start-up
    stops it) before it runs.
    """
    from pool_managerd import accounts
    from pool_managerd.adapters.embedded_nats import NatsServer

    store = config.run_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    creds = accounts.ensure_credentials(config.run_dir)
    server_config = accounts.server_config({role: c.password for role, c in creds.items()}, config.nats.prefix)
    nats_cfg = config.nats
    ws_port = nats_cfg.embedded_websocket_port if nats_cfg.embedded_websocket else None
    server = NatsServer(
        store_dir=store, log_file=config.run_dir / "nats.log", config=server_config, websocket_port=ws_port
    )
    return server, creds


async def start_embedded(config: DaemonConfig, server: NatsServer, creds: Mapping[Role, Credentials]) -> None:
    """Start ``server`` (from :func:`embedded_server`) and say where it and its credentials are."""
    from pool_managerd import accounts

    # Started off the event loop's thread of control: SIGTERM is acted on while it starts.
    await server.astart()
    # A websocket listener (for browser dashboards), where the server has one.
    ws_url = server.ws_url
    accounts.publish_locations(config.run_dir, creds, server.url, ws_url)
    auth_dir = config.run_dir / accounts.AUTH_DIR
    log.info("embedded nats-server (JetStream in %s) at %s, websocket %s; credentials in %s",
             config.run_dir / "nats", server.url, ws_url, auth_dir)  # fmt: skip
    print(f"embedded NATS at {server.url}; credentials (admin, operator, viewer) in {auth_dir}:"
          f" pool-managerd ctl --creds-dir {config.run_dir} ...", flush=True)  # fmt: skip
    if ws_url:
        hint = f"pool-managerd dashboard --creds-dir {config.run_dir}"
        print(f"embedded NATS websocket at {ws_url}: {hint}", flush=True)


# --- connecting ----------------------------------------------------------------------------------


async def connect(
    cfg: NatsConfig, node: str, urls: list[str], *, auth: Credentials | None, watch: ConnectionWatch
) -> NATS:
    """The first connect to ``urls``, with ``watch`` answering the client's callbacks.

    ``auth`` (the embedded server's ``daemon`` user) wins over any configured user."""
    opts: dict[str, Any] = {
        "servers": urls,
        "name": cfg.name or f"pool-managerd-{node}",
        "connect_timeout": cfg.connect_timeout_s,
        "max_reconnect_attempts": -1,  # never give up on the cluster
        "reconnect_time_wait": cfg.reconnect_wait_s,
        "ping_interval": cfg.ping_interval_s,
        "max_outstanding_pings": cfg.max_outstanding_pings,
        "allow_reconnect": True,
        "error_cb": watch.on_error,
        "disconnected_cb": watch.on_disconnected,
        "reconnected_cb": watch.on_reconnected,
        "closed_cb": watch.on_closed,
    }
    if cfg.credentials_file:
        opts["user_credentials"] = str(cfg.credentials_file)
    if cfg.nkey_seed_file:
        opts["nkeys_seed"] = str(cfg.nkey_seed_file)
    if cfg.user:
        opts["user"], opts["password"] = cfg.user, cfg.password
    if cfg.token:
        opts["token"] = cfg.token
    if auth is not None:
        opts["user"], opts["password"] = auth.user, auth.password
    inbox = cfg.inbox_prefix or (inbox_prefix(opts["user"]) if opts.get("user") else None)
    if inbox:
        opts["inbox_prefix"] = inbox
    if cfg.tls_ca_file or cfg.tls_cert_file:
        import ssl

        ctx = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
        if cfg.tls_cert_file and cfg.tls_key_file:
            ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
        opts["tls"] = ctx
    who = ", ".join(urls) + (f" as user {opts['user']!r}" if opts.get("user") else "")
    # The first connect has startup_timeout_s and ends at once on refused credentials or TLS;
    # reconnects after it never stop.
    return await first_connect(opts, timeout=cfg.startup_timeout_s, who=who)


class ConnectionWatch:
    """The daemon's answers to its connection's events, and the verdict on the server it is
    connected to now (a server below the floor is never written to: the daemon stands down)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._supported_for: tuple[object, ...] | None = None
        """The server (version, URL) last found supported."""

    async def on_error(self, exc: Exception) -> None:
        """nats-py's ``error_cb``."""
        if is_permission_violation(exc):
            # The server refused something this daemon needs: the deployment's permissions are short.
            log.error("NATS refused an operation (check the daemon user's permissions): %s", exc)
            return
        log.warning("NATS error: %s", exc)

    async def on_disconnected(self) -> None:
        """nats-py's ``disconnected_cb``."""
        daemon = self._daemon
        if not daemon.stopping.is_set() and daemon.incompatible is None:
            log.warning("disconnected from NATS; events wait in the backlog")

    async def on_reconnected(self) -> None:
        """nats-py's ``reconnected_cb``: on a supported server the KV watches start again and the
        snapshots are written anew."""
        daemon = self._daemon
        if not self.server_supported():
            return
        log.info("reconnected to NATS")
        if daemon.snapshots is not None:
            daemon.tasks.start(daemon.snapshots.restart_watch(), "kv-rewatch")
        if daemon.ownership is not None:
            daemon.ownership.rewatch()
        # The server may have lost what was written (a restart without its store): write anew.
        daemon.kv.forget_written()
        for pool in list(daemon.runtime.actors if daemon.runtime else []):
            daemon.kv.mark_dirty(pool)

    async def on_closed(self) -> None:
        """nats-py's ``closed_cb``: closed for good, not by the daemon, ends it (exit 1)."""
        daemon = self._daemon
        if not daemon.stopping.is_set() and daemon.incompatible is None:
            log.error("NATS connection closed for good; exiting")
            daemon.exit_code = 1
            daemon.stopping.set()

    def server_supported(self) -> bool:
        """Whether the server this client is connected to now may be written to.

        Checked before every event write as well as on reconnect: nats-py reports the reconnect
        only after a round trip, and the publisher may already be writing by then."""
        daemon = self._daemon
        if daemon.incompatible is not None:
            return False
        nc = daemon.nc
        if nc is None or not nc.is_connected:
            # No verdict mid-reconnect (the new server's INFO may not be in yet); writes wait for
            # the connection anyway and are asked again once it is up.
            return True
        # Asked before every write: the verdict is kept for as long as the server and the version
        # it reports stay the same (parsing them each time cost a tenth of a preload's loop).
        key = (repr(nc.connected_server_version), nc.connected_url)
        if key == self._supported_for:
            return True
        try:
            checked_version(nc)
        except NatsServerTooOld as exc:
            self._incompatible_server(exc)
            return False
        self._supported_for = key
        return True

    def _incompatible_server(self, exc: NatsServerTooOld) -> None:
        """A reconnect reached a server below the floor: stand down loudly, exit 2.

        Its writes cannot be fenced, so nothing more is written (events, node events, KV
        snapshots); commands stop being answered; engines are left running, exactly as with
        ``on_shutdown = "leave"``, for a daemon connected to a supported server to adopt."""
        daemon = self._daemon
        if daemon.incompatible is not None:
            return
        daemon.incompatible = exc
        log.error("standing down: %s", exc.message)
        daemon.exit_code = 2
        daemon.stopping.set()


# --- what the daemon learns of the connection ----------------------------------------------------


def checked_version(nc: NATS) -> ServerVersion | None:
    """The connected server's version (None: it reports none we can read).

    Raises :class:`NatsServerTooOld` for a server below the floor."""
    return check_server_version(reported_version(nc), url=safe_url(nc))


def reported_version(nc: NATS) -> ServerVersion | None:
    """The version in the connected server's INFO, or None when it gives none we can read."""
    reported = nc.connected_server_version
    try:
        version = ServerVersion(int(reported.major), int(reported.minor), int(reported.patch),
                                str(reported.prerelease or ""))  # fmt: skip
    except (ValueError, TypeError):
        return None
    # nats-py's stand-in for "no INFO version yet".
    return None if version.release == (0, 0, 0) and version.prerelease == "unknown" else version


def safe_url(nc: NATS) -> str | None:
    """The connected server as scheme://host:port: never the credentials a URL may carry."""
    url = nc.connected_url
    if url is None or url.hostname is None:
        return None
    return f"{url.scheme}://{url.hostname}:{url.port}" if url.port else f"{url.scheme}://{url.hostname}"


async def flush_through_cancel(nc: NATS) -> None:
    """``nc.flush()`` that a cancellation (a stop during start-up) cannot break.

    Cancelled mid-flight, nats-py's flush leaves its cancelled PONG future queued; the PONG then
    raises ``InvalidStateError`` inside the client's read loop, which stops reading, and every
    later ack, reply and KV write on the connection times out. Shielded, the flush finishes on its
    own (bounded by nats-py's flush timeout) while the caller is cancelled at once."""
    flush = asyncio.ensure_future(nc.flush())
    # Retrieved here, so a flush that fails after its caller left is not an unhandled error.
    flush.add_done_callback(lambda done: done.cancelled() or done.exception())
    await asyncio.shield(flush)
