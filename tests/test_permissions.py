"""The shipped NATS permissions, proven on a real nats-server started with deploy/nats-server.conf.

* the daemon runs a pool through preload, ready, drain, stop and a crash recovery as the
  ``daemon`` user, and neither the server nor any client sees a permission violation;
* a viewer's ``drain`` is refused by the server, the pool is unchanged and ``ctl`` says
  "permission denied" at once; the viewer can still read status, watch and replay;
* the daemon and clients connect over TLS with a CA and certificates made here;
* the embedded server of ``run`` uses the same accounts, with credentials generated 0600;
* a wrong password or an unreachable server exits 2 within ``startup_timeout_s`` with one line,
  and SIGTERM during the first connect is honoured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import ssl
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client as NATS

from pool_managerd.accounts import (
    ROLES,
    CredentialError,
    ensure_credentials,
    inbox_prefix,
    load_credentials,
    password_env,
    server_config,
)
from pool_managerd.adapters.embedded_nats import NatsServer, free_port
from pool_managerd.adapters.event_log import read_entries
from pool_managerd.adapters.nats_connect import ConnectFailed, first_connect
from pool_managerd.client import PermissionDenials, PoolClient
from pool_managerd.config import load_config
from pool_managerd.contract.messages import EngineAdopted, HealthChanged, Rejected, StateChanged, StatusReply
from pool_managerd.contract.subjects import AUDIT_STREAM, STREAM_NAME
from pool_managerd.runtime.daemon import Daemon
from test_recovery import MATCH, Rig, Wire, body_of, changed, fake_pool, render_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "deploy" / "nats-server.conf"
CLI_S = 60.0
"""Deadline for one CLI subprocess (Python start-up on a loaded machine included)."""


SIM_GPU = "GPU-4090c0de-0000-4000-8000-000000000024"
"""GPU0 of the simulated inventory the rig's daemon runs on."""


# --- the shipped file is the generated one -------------------------------------------------------


def test_the_shipped_configuration_is_what_the_code_generates() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == server_config(), (
        "deploy/nats-server.conf is stale: regenerate it with `pool-managerd nats-config > deploy/nats-server.conf`"
    )


def test_the_embedded_configuration_differs_from_the_shipped_one_only_in_the_passwords() -> None:
    passwords = {role: f"pw-{role}" for role in ROLES}
    shipped = SHIPPED.read_text(encoding="utf-8").splitlines()
    embedded = server_config(passwords).splitlines()
    assert len(shipped) == len(embedded)
    differing = [(a, b) for a, b in zip(shipped, embedded, strict=True) if a != b]
    assert differing == [(f"      password: ${password_env(r)}", f'      password: "pw-{r}"') for r in ROLES]


# --- a server started with the shipped configuration ---------------------------------------------


def env_password() -> str:
    """A password the shipped file can read from the environment: nats-server parses a variable's
    value as a configuration value, so it must look like a bare word (a letter, then letters and
    digits); one starting with a digit is refused as a malformed number."""
    return "p" + secrets.token_hex(16)


@dataclass
class Secured:
    server: NatsServer
    passwords: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def violations(self, user: str | None = None) -> list[str]:
        lines = [line for line in self.log().splitlines() if "Violation" in line]
        return [line for line in lines if user is None or f"user:{user}" in line]


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Secured]:
    """A nats-server running deploy/nats-server.conf as shipped, passwords from the environment."""
    passwords = {role: env_password() for role in ROLES}
    for role, password in passwords.items():
        monkeypatch.setenv(password_env(role), password)
    log_path = tmp_path / "nats.log"
    server = NatsServer(store_dir=tmp_path / "nats", config=SHIPPED.read_text(encoding="utf-8"), log_file=log_path)
    server.start()
    try:
        yield Secured(server, passwords, log_path)
    finally:
        server.close()


async def connect_as(secured: Secured, role: str, errors: list[Exception] | None = None, **opts: Any) -> NATS:
    """A client of the secured server as ``role``; its asynchronous errors go to ``errors``."""
    sink = errors if errors is not None else []

    async def on_error(exc: Exception) -> None:
        sink.append(exc)

    options: dict[str, Any] = {
        "servers": [secured.server.url], "user": role, "password": secured.passwords[role],
        "inbox_prefix": inbox_prefix(role), "error_cb": on_error, "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.1, "connect_timeout": 2, **opts,
    }  # fmt: skip
    return await first_connect(options, timeout=10, who=f"as {role}")


class DaemonUserRig(Rig):
    """The recovery tests' daemon subprocess, connecting as the ``daemon`` user."""

    def __init__(self, tmp: Path, secured: Secured, nc: NATS, wire: Wire) -> None:
        super().__init__(tmp, secured.server, nc, wire)
        self.password = secured.passwords["daemon"]

    def configure(self, pools: list[dict[str, Any]], **top: Any) -> None:
        text = render_config(self.server.url, self.run_dir, pools, **top)
        auth = f'[nats]\nuser = "daemon"\npassword = {json.dumps(self.password)}\n'
        self.config_path.write_text(text.replace("[nats]\n", auth, 1))


@pytest.fixture
async def rig(tmp_path: Path, secured: Secured) -> AsyncIterator[tuple[DaemonUserRig, list[Exception]]]:
    """The daemon rig, driven by an admin connection whose asynchronous errors are collected."""
    errors: list[Exception] = []
    admin = await connect_as(secured, "admin", errors)
    wire = Wire()
    await admin.subscribe("poold.evt.>", cb=wire.on_msg)
    await admin.subscribe("poold.node.*.evt.>", cb=wire.on_msg)
    await admin.flush()
    r = DaemonUserRig(tmp_path, secured, admin, wire)
    try:
        yield r, errors
    finally:
        killed = await r.cleanup()
        print(f"----- nats-server log\n{secured.log()[-6000:]}")
        await admin.close()
    if killed and r.finished:
        pytest.fail("processes survived the daemon's graceful stop:\n  " + "\n  ".join(killed))


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``pool-managerd ARGS``; returns (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def as_user(secured: Secured, role: str) -> tuple[list[str], dict[str, str]]:
    """CLI arguments and environment that connect as ``role`` (the password only in the environment)."""
    return ["--url", secured.server.url, "--user", role], {"POOL_MANAGERD_PASSWORD": secured.passwords[role]}


def no_violations(secured: Secured, rig: DaemonUserRig, errors: list[Exception]) -> None:
    assert secured.violations() == [], "the server refused something:\n" + "\n".join(secured.violations())
    log = rig.log()
    assert "Permissions Violation" not in log and "NATS refused" not in log, log[-4000:]
    assert not [e for e in errors if "violation" in str(e).lower()], errors


# --- the daemon under exactly its permissions ----------------------------------------------------


async def test_the_daemon_serves_a_pool_and_recovers_under_exactly_the_daemon_users_permissions(
    rig: tuple[DaemonUserRig, list[Exception]], secured: Secured
) -> None:
    r, errors = rig
    r.configure([fake_pool("chat")])
    await r.start()
    await r.preload_ready("chat")

    mark = r.wire.mark()
    lease = await r.accepted("chat", "lease", ttl_s=30.0)
    await r.accepted("chat", "drain", deadline_s=10.0)
    await r.accepted("chat", "release", lease_id=lease.lease_id)
    await r.wait(changed("chat", dst="unready"), "drained to unready", start=mark)

    pid = (await r.preload_ready("chat"))["chat"]
    await r.kill()  # a crash: the engine keeps running, the next daemon must adopt it
    mark = r.wire.mark()
    await r.start()
    adopted = await r.wait(body_of(EngineAdopted, "chat"), "engine_adopted", start=mark)
    assert adopted.body.pid == pid  # type: ignore[union-attr]
    await r.wait(body_of(HealthChanged, "chat", ready=True), "the adopted engine healthy", start=mark)
    assert (await r.status("chat")).state == "ready"

    mark = r.wire.mark()
    await r.accepted("chat", "stop")
    await r.wait(changed("chat", dst="unready"), "stopped", start=mark)
    assert await r.terminate() == 0

    # The viewer reads the whole history and the snapshots (stream consumers, direct gets).
    args, env = as_user(secured, "viewer")
    rc, out, err = await cli("replay", "--check-live", *args, env=env)
    assert rc == 0 and MATCH in out, out + err
    r.finished = True
    no_violations(secured, r, errors)


# --- the viewer ----------------------------------------------------------------------------------


async def test_a_viewers_drain_is_refused_by_the_server_and_ctl_says_permission_denied(
    rig: tuple[DaemonUserRig, list[Exception]], secured: Secured
) -> None:
    r, _ = rig
    r.configure([fake_pool("chat")])
    await r.start()
    await r.preload_ready("chat")
    before = await r.status("chat")
    mark = r.wire.mark()

    args, env = as_user(secured, "viewer")
    rc, out, err = await cli("ctl", "drain", "chat", *args, "--timeout", "20", env=env)
    assert rc == 1, (rc, out, err)
    assert "permission denied" in err and "poold.cmd.chat.drain" in err, err
    assert "no reply" not in err, "the refusal must be reported, not waited out"
    refused = [line for line in secured.violations("viewer") if '"poold.cmd.chat.drain"' in line]
    assert refused, "the server did not log the refused publish:\n" + secured.log()[-3000:]

    # Nothing reached the daemon: same state, same sequence, no event since.
    after = await r.status("chat")
    assert (after.state, after.seq) == ("ready", before.seq)
    await r.nc.flush()
    assert [e for e in r.wire.items[mark:] if e.pool == "chat" and isinstance(e.body, StateChanged)] == []

    # The viewer can read: status, the live table, and (in-process) a typed refusal for commands.
    rc, out, err = await cli("ctl", "status", "chat", *args, env=env)
    assert rc == 0 and "ready" in out, out + err
    rc, out, err = await cli("watch", "--once", *args, env=env)
    assert rc == 0 and "chat" in out and "ready" in out, out + err
    denials = PermissionDenials()
    viewer = await connect_as(secured, "viewer", error_cb=denials)
    try:
        client = PoolClient(viewer, timeout=20, denials=denials)
        reply = await client.stop("chat")
        assert isinstance(reply, Rejected) and reply.code == "permission_denied", reply
        assert isinstance(await client.status("chat"), StatusReply)
        assert [n.node for n in await client.discover(timeout=5)] == ["node-a"]
        # Putting a faulted GPU back into placement is an operator's call.
        cleared = await client.gpu_clear("node-a", SIM_GPU)
        assert isinstance(cleared, Rejected) and cleared.code == "permission_denied", cleared
    finally:
        await viewer.close()

    # An operator may drain but not reload: reload is the admin's.
    op_args, op_env = as_user(secured, "operator")
    rc, out, err = await cli("ctl", "reload", "chat", "--model", "other", *op_args, env=op_env)
    assert rc == 1 and "permission denied" in err, (rc, out, err)
    rc, out, err = await cli("ctl", "gpu-clear", SIM_GPU, "--node", "node-a", *op_args, env=op_env)
    assert rc == 0 and "was not marked unhealthy" in out, (rc, out, err)
    assert (await r.status("chat")).state == "ready"

    # The viewer's live table follows a change made by someone allowed to make it.
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", "watch", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )  # fmt: skip
    assert watch.stdout is not None
    seen: list[str] = []
    try:
        await _read_until(watch.stdout, " ready ", CLI_S, seen)
        await r.accepted("chat", "stop")
        await _read_until(watch.stdout, " unready ", CLI_S, seen)
        watch.send_signal(signal.SIGTERM)
        _, werr = await asyncio.wait_for(watch.communicate(), CLI_S)
        assert watch.returncode == 0 and b"permission denied" not in werr, werr.decode()
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert await r.terminate() == 0
    r.finished = True

    # Every refusal the server logged is one this test asked for: reads need nothing refused.
    expected = {("viewer", "poold.cmd.chat.drain"), ("viewer", "poold.cmd.chat.stop"),
                ("operator", "poold.cmd.chat.reload"), ("viewer", "poold.node.node-a.cmd.gpu_clear")}  # fmt: skip
    for line in secured.violations():
        assert any(f"user:{u}" in line and f'"{s}"' in line for u, s in expected), line
    assert secured.violations("daemon") == []


# --- TLS -------------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    path.chmod(0o600)


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *, server: bool = False, client: bool = False,
) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = issuer if issuer is not None else (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("pool-managerd test CA", ca_key, None)
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    for name, opts in (("server", {"server": True}), ("client", {"client": True})):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"pool-managerd test {name}", key, (ca.subject, ca_key), **opts)
        (d / f"{name}.pem").write_bytes(cert.public_bytes(pem))
        _write_key(d / f"{name}-key.pem", key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    (d / "other-ca.pem").write_bytes(_cert("someone else's CA", other_key, None).public_bytes(pem))
    return Pki(d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem", d / "client-key.pem",
               d / "other-ca.pem")  # fmt: skip


def _tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def test_the_daemon_and_a_viewer_connect_over_tls_with_client_certificates(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    passwords = {role: env_password() for role in ROLES}
    for role, password in passwords.items():
        monkeypatch.setenv(password_env(role), password)
    tls = (f"tls {{\n  cert_file: {json.dumps(str(pki.server_cert))}\n  key_file: {json.dumps(str(pki.server_key))}\n"
           f"  ca_file: {json.dumps(str(pki.ca))}\n  verify: true\n}}\n")  # fmt: skip
    server = NatsServer(store_dir=tmp_path / "nats", config=SHIPPED.read_text(encoding="utf-8") + tls)
    server.start()
    daemon: Daemon | None = None
    try:
        config = load_config(None, node="tls-node", run_dir=tmp_path / "run", gpus="sim:hetero-24g-48g",
                             pools=[fake_pool("chat")],
                             nats={"urls": [server.url], "user": "daemon", "password": passwords["daemon"],
                                   "tls_ca_file": pki.ca, "tls_cert_file": pki.client_cert,
                                   "tls_key_file": pki.client_key, "startup_timeout_s": 10})  # fmt: skip
        daemon = Daemon(config)
        await daemon.start()
        assert daemon.nc is not None and daemon.nc.connected_url is not None

        viewer_opts = {
            "servers": [server.url], "user": "viewer", "password": passwords["viewer"],
            "inbox_prefix": inbox_prefix("viewer"), "connect_timeout": 2,
        }  # fmt: skip
        viewer = await first_connect({**viewer_opts, "tls": _tls(pki.ca, pki.client_cert, pki.client_key)},
                                     timeout=10, who="as viewer")  # fmt: skip
        try:
            reply = await PoolClient(viewer, timeout=10).status("chat")
            assert isinstance(reply, StatusReply) and reply.pool.state == "unready"
        finally:
            await viewer.close()

        # Without a client certificate, or trusting another CA: refused at once, and said so.
        for ctx in (_tls(pki.ca), _tls(pki.other_ca, pki.client_cert, pki.client_key)):
            with pytest.raises(ConnectFailed) as failed:
                await first_connect({**viewer_opts, "tls": ctx}, timeout=20, who="as viewer")
            assert failed.value.refused, failed.value.message

        # The command-line tools take the same files.
        env = {"POOL_MANAGERD_PASSWORD": passwords["viewer"]}
        rc, out, err = await cli("ctl", "status", "chat", "--url", server.url, "--user", "viewer",
                                 "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                                 "--tls-key", str(pki.client_key), env=env)  # fmt: skip
        assert rc == 0 and "unready" in out, out + err
    finally:
        if daemon is not None:
            await daemon.stop()
        server.close()


# --- the embedded server -------------------------------------------------------------------------


async def _read_until(stream: asyncio.StreamReader, needle: str, timeout: float, seen: list[str]) -> str:
    async def read() -> str:
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"stream ended before {needle!r}:\n" + "".join(seen))
            line = raw.decode(errors="replace")
            seen.append(line)
            if needle in line:
                return line

    return await asyncio.wait_for(read(), timeout)


def _toml_config(tmp: Path, nats: str, **top: Any) -> Path:
    lines = ['node = "node-a"', f"run_dir = {json.dumps(str(tmp / 'run'))}", 'gpus = "sim:hetero-24g-48g"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["", "[nats]", nats, "", "[[pools]]", 'id = "chat"', 'engine = "fake"', "model_bytes = 1000000000",
              'extra_args = ["--load-time", "0.1"]', "stop_grace_s = 2.0"]  # fmt: skip
    path = tmp / "poold.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _run_daemon(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pool_managerd", "run", "--config", str(config), "--log-format", "text",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip


async def test_the_embedded_server_of_run_uses_the_shipped_accounts_with_private_credentials(tmp_path: Path) -> None:
    config = _toml_config(tmp_path, "urls = []")
    proc = await _run_daemon(config)
    assert proc.stdout is not None and proc.stderr is not None
    out: list[str] = []
    errs: list[str] = []
    run_dir = tmp_path / "run"
    try:
        line = await _read_until(proc.stdout, "embedded NATS at", 60, out)
        assert f"{run_dir / 'auth'}" in line and "--creds-dir" in line, line
        await _read_until(proc.stderr, "serving 1 pool(s)", 60, errs)
        # Keep both pipes drained from here on: a full pipe would block the daemon.
        drains = [asyncio.ensure_future(stream.read()) for stream in (proc.stdout, proc.stderr)]

        auth = run_dir / "auth"
        assert stat.S_IMODE(auth.stat().st_mode) == 0o700
        creds = {}
        for role in ROLES:
            path = auth / f"{role}.json"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            creds[role] = json.loads(path.read_text())
            assert creds[role]["user"] == role and creds[role]["url"].startswith("nats://127.0.0.1:")
        assert len({c["password"] for c in creds.values()}) == len(ROLES), "passwords are not distinct"
        conf = run_dir / "nats" / "nats-server.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        shipped = server_config({r: c["password"] for r, c in creds.items()})
        # The shipped users, then the websocket listener for browser dashboards, nothing else.
        assert conf.read_text().startswith(shipped)
        ws_port = int(creds["viewer"]["websocket_url"].rsplit(":", 1)[1])
        assert (
            conf.read_text()[len(shipped) :]
            == f'websocket {{\n  host: "127.0.0.1"\n  port: {ws_port}\n  no_tls: true\n}}\n'
        )

        rc, stdout, stderr = await cli("ctl", "status", "chat", "--creds-dir", str(run_dir))
        assert rc == 0 and "unready" in stdout, stdout + stderr
        rc, stdout, stderr = await cli("ctl", "preload", "chat", "--creds-dir", str(run_dir), "--role", "viewer")
        assert rc == 1 and "permission denied" in stderr, stdout + stderr
        rc, stdout, stderr = await cli(
            "ctl", "preload", "chat", "--wait", env={"POOL_MANAGERD_CREDS_DIR": str(run_dir)}
        )
        assert rc == 0 and "chat is ready" in stdout, stdout + stderr  # as operator, the default for commands

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        for drained in await asyncio.gather(*drains):
            errs.append(drained.decode(errors="replace"))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        print("".join(out), "".join(errs), sep="\n")


# --- a bad first connection exits ----------------------------------------------------------------

STARTUP_TIMEOUT_S = 3.0
EXIT_SLACK_S = 15.0
"""Python start-up and imports come before the connect: on a loaded 2-core machine they alone
can take seconds. What matters is that the daemon exits at all (it used to retry forever)."""


async def _exit_of(proc: asyncio.subprocess.Process, timeout: float) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _final_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pool-managerd:")]


async def test_a_wrong_password_exits_2_at_once_with_one_clear_line(tmp_path: Path, secured: Secured) -> None:
    nats = (f"urls = [{json.dumps(secured.server.url)}]\nuser = \"daemon\"\npassword = \"wrong\"\n"
            f"startup_timeout_s = {STARTUP_TIMEOUT_S}")  # fmt: skip
    started = time.monotonic()
    proc = await _run_daemon(_toml_config(tmp_path, nats))
    rc, err = await _exit_of(proc, STARTUP_TIMEOUT_S + EXIT_SLACK_S)
    assert rc == 2, err
    lines = _final_lines(err)
    assert len(lines) == 1 and "refused the credentials" in lines[0] and "'daemon'" in lines[0], err
    assert time.monotonic() - started < STARTUP_TIMEOUT_S + EXIT_SLACK_S
    assert secured.violations() == []  # an authorization failure, not a permission one
    assert "Authorization Violation" in secured.log() or "authentication error" in secured.log().lower()


async def test_an_unreachable_server_exits_2_after_the_startup_timeout(tmp_path: Path) -> None:
    nats = f'urls = ["nats://127.0.0.1:{free_port()}"]\nstartup_timeout_s = {STARTUP_TIMEOUT_S}'
    proc = await _run_daemon(_toml_config(tmp_path, nats))
    rc, err = await _exit_of(proc, STARTUP_TIMEOUT_S + EXIT_SLACK_S)
    assert rc == 2, err
    lines = _final_lines(err)
    assert len(lines) == 1 and f"within {STARTUP_TIMEOUT_S:g} s" in lines[0], err


async def test_sigterm_during_the_first_connect_stops_the_daemon(tmp_path: Path) -> None:
    nats = f'urls = ["nats://127.0.0.1:{free_port()}"]\nstartup_timeout_s = 300'
    proc = await _run_daemon(_toml_config(tmp_path, nats))
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        # The daemon says once that it is retrying: from then on it is inside the first connect.
        await _read_until(proc.stderr, "not reachable yet", 60, seen)
        proc.send_signal(signal.SIGTERM)
        rc, err = await _exit_of(proc, 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 0, "".join(seen) + err
    assert "stop requested during start-up" in err, "".join(seen) + err


# --- credentials files ---------------------------------------------------------------------------


def test_credentials_are_kept_while_intact_and_regenerated_when_not(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path)
    assert set(first) == set(ROLES)
    assert ensure_credentials(tmp_path) == first, "intact credentials must survive a restart"
    assert load_credentials(tmp_path, "viewer") == first["viewer"]
    assert load_credentials(tmp_path / "auth", "viewer") == first["viewer"]

    (tmp_path / "auth" / "operator.json").write_text("{not json")
    second = ensure_credentials(tmp_path)
    assert all(second[r].password != first[r].password for r in ROLES), "a broken set is replaced as a whole"
    for role in ROLES:
        assert stat.S_IMODE((tmp_path / "auth" / f"{role}.json").stat().st_mode) == 0o600

    with pytest.raises(CredentialError, match="does not exist"):
        load_credentials(tmp_path / "elsewhere", "viewer")
    (tmp_path / "auth" / "viewer.json").write_text('{"user": "viewer"}')
    with pytest.raises(CredentialError, match="user and password are required"):
        load_credentials(tmp_path, "viewer")


# --- websocket: for browsers, never for the daemon's identity ------------------------------------


def _ws_frame(payload: bytes) -> bytes:
    """One masked binary frame, as a browser sends it (clients must mask)."""
    mask = secrets.token_bytes(4)
    head = bytes([0x82])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _ws_read(reader: asyncio.StreamReader) -> bytes:
    """The payload of one unmasked server frame."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    data = await reader.readexactly(n)
    return data if b0 & 0x0F != 0x8 else b"(close) " + data


async def _ws_connect_as(port: int, user: str, password: str) -> str:
    """Open a websocket to nats-server, CONNECT as ``user``; returns the server's answer to PING."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        writer.write((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
        status = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
        assert b" 101 " in status, status
        info = await _ws_read(reader)
        assert info.startswith(b"INFO "), info
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False, "protocol": 1}
        writer.write(_ws_frame(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n"))
        await writer.drain()
        return (await asyncio.wait_for(_ws_read(reader), 10)).decode(errors="replace")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_browsers_may_use_websocket_but_the_daemon_user_may_not(tmp_path: Path) -> None:
    passwords = {role: f"pw-{role}" for role in ROLES}
    port = free_port()
    websocket = f'websocket {{\n  host: "127.0.0.1"\n  port: {port}\n  no_tls: true\n}}\n'
    server = NatsServer(store_dir=tmp_path / "nats", config=server_config(passwords) + websocket)
    server.start()
    try:
        for role in ("admin", "operator", "viewer"):
            assert (await _ws_connect_as(port, role, passwords[role])).startswith("PONG"), role
        answer = await _ws_connect_as(port, "daemon", passwords["daemon"])
        assert "Authorization Violation" in answer, answer
    finally:
        server.close()


# --- foreign messages and refusals under the shipped permissions -----------------------------------


async def test_a_daemon_identitys_junk_quarantines_an_operator_acknowledges_and_refusals_are_audited(
    rig: tuple[DaemonUserRig, list[Exception]], secured: Secured
) -> None:
    r, _ = rig
    r.configure([fake_pool("chat")])
    await r.start()
    await r.preload_ready("chat")
    # Only the daemon's identity may publish on event subjects; here it is used to forge one.
    forger = await connect_as(secured, "daemon")
    try:
        junk = (await forger.jetstream().publish("poold.evt.chat.junk", b"{}", stream=STREAM_NAME)).seq
    finally:
        await forger.close()
    refused = await r.request("chat", "lease", ttl_s=30.0)
    assert isinstance(refused, Rejected) and refused.code == "log_corrupt", refused
    snap = await r.status("chat")
    assert snap.state == "ready" and snap.log_corrupt is not None and snap.log_corrupt.sequences == [junk]

    args, env = as_user(secured, "viewer")
    rc, out, err = await cli("ctl", "ack-corrupt", "chat", str(junk), *args, "--timeout", "20", env=env)
    assert rc == 1 and "permission denied" in err, (rc, out, err)
    op_args, op_env = as_user(secured, "operator")
    rc, out, err = await cli("ctl", "status", "chat", *op_args, env=op_env)
    assert rc == 0 and f"ctl ack-corrupt chat {junk}" in out, out + err
    rc, out, err = await cli("ctl", "ack-corrupt", "chat", str(junk), *op_args, env=op_env)
    assert rc == 0 and out.startswith("accepted: ack_corrupt chat"), (rc, out, err)
    assert (await r.status("chat")).log_corrupt is None
    await r.accepted("chat", "lease", ttl_s=30.0)
    rc, out, err = await cli("replay", "--pool", "chat", *args, env=env)
    assert rc == 0 and "acknowledged)" in out, (rc, out, err)

    # Refusals are in the audit stream, which an operator reads and a viewer may not.
    operator = await connect_as(secured, "operator")
    try:
        async with asyncio.timeout(CLI_S):
            while True:
                codes = [json.loads(e.data)["code"] async for e in read_entries(operator, "poold.audit.>",
                                                                                stream=AUDIT_STREAM)]  # fmt: skip
                if "log_corrupt" in codes:
                    break
                await asyncio.sleep(0.05)  # ok: audit records are written without an ack to wait on
    finally:
        await operator.close()
    viewer = await connect_as(secured, "viewer")
    try:
        # The server drops the refused API request: no answer comes.
        with pytest.raises((TimeoutError, nats.errors.Error)):
            _ = [e async for e in read_entries(viewer, "poold.audit.>", stream=AUDIT_STREAM, fetch_timeout=1.0)]
    finally:
        await viewer.close()
    await r.accepted("chat", "stop")
    assert await r.terminate() == 0
    r.finished = True
    assert secured.violations("daemon") == [] and secured.violations("operator") == []
