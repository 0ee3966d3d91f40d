"""The compose file and the sample config it mounts are valid: CI cannot run Docker, so it checks
their structure and that the config loads the way the daemon will load it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pool_managerd.accounts import ROLES, password_env
from pool_managerd.config import load_config
from pool_managerd.contract.nats_version import NATS_SERVER_FLOOR, parse_server_version
from support.nats_versions import SUPPORTED_TESTED

REPO = Path(__file__).resolve().parents[1]


def test_compose_has_nats_with_jetstream_and_the_daemon() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"nats", "pool-managerd"} <= set(services)
    assert "-js" in services["nats"]["command"]
    daemon = services["pool-managerd"]
    assert "nats" in daemon["depends_on"]
    assert (REPO / daemon["build"] / "Dockerfile").is_file()


def test_compose_runs_an_exact_nats_release_at_or_above_the_floor_that_the_tests_run() -> None:
    image = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["nats"]["image"]
    match = re.fullmatch(r"nats:(?P<version>\d+\.\d+\.\d+)(?:-alpine[0-9.]*)?", image)
    assert match, f"{image!r}: pin an exact nats release (e.g. nats:2.15.1-alpine), not a moving tag"
    version = parse_server_version(match["version"])
    assert version is not None and version.at_least(NATS_SERVER_FLOOR), f"{image} is below the supported floor"
    assert match["version"] in SUPPORTED_TESTED, f"{image}: tests/test_nats_compat.py does not run that release"


def test_every_file_the_compose_mounts_exists_and_the_config_loads() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = [v for v in doc["services"]["pool-managerd"]["volumes"] if v.startswith("./")]
    assert mounts, "the daemon mounts its config from the repository"
    for mount in mounts:
        host_path = REPO / mount.split(":")[0]
        assert host_path.is_file(), f"{host_path} is mounted but missing"
    config_mount = next(m for m in mounts if m.split(":")[1] == "/etc/pool-managerd/config.toml")
    config = load_config(REPO / config_mount.split(":")[0])
    # The compose service names of the three cluster nodes.
    assert config.nats.urls == ["nats://nats:4222", "nats://nats-2:4222", "nats://nats-3:4222"]
    assert config.gpus.startswith("sim:")
    assert [p.id for p in config.pools] == ["chat-8b", "embed"]
    assert config.metrics_addr and config.metrics_addr.endswith(":9464")
    assert "9464:9464" in doc["services"]["pool-managerd"]["ports"]


def test_compose_runs_nats_with_the_shipped_permissions_and_the_daemon_as_its_user() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    nats = doc["services"]["nats"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"] if v.startswith("./")}
    command = nats["command"]
    conf = command[command.index("-c") + 1]
    assert (REPO / mounts[conf]).resolve() == (REPO / "deploy" / "nats-server.conf").resolve()
    # Every password the shipped file reads is passed in, and none has a default.
    for role in ROLES:
        assert f"${{{password_env(role)}:?" in nats["environment"][password_env(role)]
    daemon_env = doc["services"]["pool-managerd"]["environment"]
    assert daemon_env["POOL_MANAGERD_NATS__USER"] == "daemon"
    assert password_env("daemon") in daemon_env["POOL_MANAGERD_NATS__PASSWORD"]


NATS_NODES = ("nats", "nats-2", "nats-3")
DAEMONS = ("pool-managerd", "pool-managerd-b")


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def test_compose_runs_a_three_node_nats_cluster_with_routes_and_own_stores() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    names, stores = set(), set()
    for service in NATS_NODES:
        node = services[service]
        command = node["command"]
        assert "-js" in command
        assert _flag(command, "--cluster_name") == "poold"
        assert _flag(command, "--cluster").endswith(":6222")
        routes = set(_flag(command, "--routes").split(","))
        # Every node routes to every node of the cluster (a route to itself is ignored).
        assert routes == {f"nats://{other}:6222" for other in NATS_NODES}
        names.add(_flag(command, "-n"))
        conf = _flag(command, "-c")
        mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        assert (REPO / mounts[conf]).resolve() == (REPO / "deploy" / "nats-server.conf").resolve()
        stores.add(mounts[_flag(command, "-sd")])
        for role in ROLES:
            assert f"${{{password_env(role)}:?" in node["environment"][password_env(role)]
    assert len(names) == 3, "JetStream clustering needs a distinct server name per node"
    assert len(stores) == 3, "each node keeps its own JetStream store"


def test_compose_runs_two_daemons_with_own_ids_and_run_dirs_one_a_standby() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    configs, run_volumes = {}, set()
    for service in DAEMONS:
        daemon = services[service]
        assert set(NATS_NODES) <= set(daemon["depends_on"])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in daemon["volumes"]}
        config = load_config(REPO / mounts["/etc/pool-managerd/config.toml"])
        run_volumes.add(mounts[str(config.run_dir)])
        configs[service] = config
        # Every server of the cluster, and three copies of the stream and buckets.
        assert sorted(config.nats.urls) == sorted(f"nats://{n}:4222" for n in NATS_NODES)
        assert config.nats.replicas == 3
        assert daemon["environment"]["POOL_MANAGERD_NATS__USER"] == "daemon"
    a, b = configs["pool-managerd"], configs["pool-managerd-b"]
    assert (a.node, b.node) == ("node-a", "node-b")
    assert len(run_volumes) == 2, "each host has its own run dir"
    # node-b stands by for chat-8b, with the same definition as its owner's.
    chat_a = next(p for p in a.pools if p.id == "chat-8b")
    chat_b = next(p for p in b.pools if p.id == "chat-8b")
    assert chat_a == chat_b and chat_a.standby == ["node-b"]
    assert [p.id for p in b.pools] == ["chat-8b"]
