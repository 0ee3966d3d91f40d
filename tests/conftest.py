"""Shared fixtures for the whole suite.

Sections (append new fixtures to the section they belong to, or add a new section at the end):

1. Hypothesis profiles
2. Test kinds: the ``unit`` / ``adapter`` / ``e2e`` markers, and the leak guard
3. NATS: real ``nats-server`` processes, clients, isolated JetStream namespaces

Helpers that are not fixtures live in ``tests/support/``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, settings
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.config import load_config
from pool_managerd.contract.subjects import Subjects
from pool_managerd.runtime.daemon import Daemon
from pool_managerd.testing.nats_cluster import NatsCluster
from support.markers import FOLDERS, classify
from support.procs import leak_guard

# ---------------------------------------------------------------------------------------------
# 1. Hypothesis profiles: HYPOTHESIS_PROFILE=ci|dev (default dev). Both keep >= 200 examples.
# ---------------------------------------------------------------------------------------------

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ---------------------------------------------------------------------------------------------
# 2. Test kinds (see support/markers.py): every test is marked unit, adapter or e2e by its folder,
#    and the Hypothesis properties slow; `make test-fast` runs `-m "unit and not slow"`.
# ---------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    classify(items)


_UNIT_ONLY = frozenset({"unit", "unit and not slow"})
"""The -m expressions that select unit tests alone (any other is left to pytest)."""


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # With -m unit, tests/adapters and tests/e2e are not even imported: importing them (nats,
    # playwright, the daemon) would cost more than running the unit tests.
    if config.getoption("markexpr") in _UNIT_ONLY and collection_path.name in FOLDERS:
        return True if FOLDERS[collection_path.name] != "unit" else None
    return None


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that is not ``unit`` fails if a process it started outlives it.

    Autouse here, at the top, so it is set up before and torn down after every other fixture of
    the test: the rigs and harnesses have stopped what they know of when it looks. A fixture that
    must start after it (to be stopped before it looks) requests ``_no_leaks``."""
    if request.node.get_closest_marker("unit") is not None:
        yield
        return
    yield from leak_guard()


# ---------------------------------------------------------------------------------------------
# 3. NATS
# ---------------------------------------------------------------------------------------------

NATS_TEST_OPTIONS: dict[str, Any] = {
    # nats-py's defaults give up reconnecting after ~2 min and wait 2 s between attempts; tests
    # kill and restart servers, so reconnect forever and quickly.
    "allow_reconnect": True,
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.1,
    "connect_timeout": 2,
}


async def _quiet_error_cb(exc: Exception) -> None:
    # Disconnect errors are expected in kill/restart tests; the default callback logs them loudly.
    return None


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server for the session. Tests isolate themselves with :func:`js_ns`."""
    with NatsServer(store_dir=tmp_path_factory.mktemp("nats-session")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """URL of the session server."""
    return nats_server.url


@pytest.fixture
def fresh_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of this test's own, free to ``kill()`` / ``restart()`` (same port and store)."""
    with NatsServer(store_dir=tmp_path / "nats-store") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback of this test's own (routes, a store dir per node),
    started once the meta leader is agreed on; free to ``kill(i)`` / ``restart(i)`` a node (same
    ports and store: it rejoins). Its own, because daemons on it create the shared stream."""
    with NatsCluster(3, store_root=tmp_path / "nats-cluster") as cluster:
        yield cluster


NatsConnect = Callable[..., Awaitable[NATS]]


@pytest.fixture
async def nats_connect() -> AsyncIterator[NatsConnect]:
    """Factory ``await nats_connect(url, **overrides)`` with test-friendly reconnect options.

    Every client it makes is closed at teardown.
    """
    clients: list[NATS] = []

    async def connect(url: str, **overrides: Any) -> NATS:
        options = {"error_cb": _quiet_error_cb, **NATS_TEST_OPTIONS, **overrides}
        client = await nats.connect(url, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        if not client.is_closed:
            await client.close()


@pytest.fixture
async def nc(nats_server: NatsServer, nats_connect: NatsConnect) -> NATS:
    """A client connected to the session server (closed after the test)."""
    return await nats_connect(nats_server.url)


@dataclass(frozen=True)
class JsNamespace:
    """Names that keep one test's JetStream objects apart from every other test's."""

    subjects: Subjects
    stream: str
    bucket: str


@pytest.fixture
def js_ns() -> JsNamespace:
    """A unique subject prefix, stream name and KV bucket name for this test."""
    tag = uuid.uuid4().hex[:10]
    return JsNamespace(subjects=Subjects(prefix=f"t{tag}"), stream=f"EVT_{tag}", bucket=f"kv_{tag}")


FAKE = {"engine": "fake", "extra_args": ["--load-time", "0.1"], "model_bytes": 1_000_000_000, "stop_grace_s": 2.0}
"""A fake-engine pool that is ready in 0.1 s."""

StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """``await start_daemon(url or urls, node=..., pools=[...], nats_options={...}, **config)``; every
    daemon is stopped after."""
    daemons: list[Daemon] = []

    async def start(
        url: str | list[str],
        *,
        node: str = "node-a",
        pools: list[dict[str, Any]] | None = None,
        nats_options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Daemon:
        pools = pools if pools is not None else [{"id": "chat", **FAKE}]
        extra.setdefault("heartbeat_s", 5.0)
        urls = [url] if isinstance(url, str) else list(url)
        options = {**extra.pop("nats", {}), **(nats_options or {}), "urls": urls}
        config = load_config(None, node=node, run_dir=tmp_path / node, gpus="sim:hetero-24g-48g",
                             nats=options, pools=pools, **extra)  # fmt: skip
        daemon = Daemon(config)
        daemons.append(daemon)
        await daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        await daemon.stop()
