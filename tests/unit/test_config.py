"""Configuration errors: every bad value is refused by name before the daemon touches anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pool_managerd.config import ConfigError, load_config


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[pools]]\nid = "a"\nprobe_interval_s = inf\n', "pools[0].probe_interval_s"),
        ('[[pools]]\nid = "a"\nload_timeout_s = inf\n', "pools[0].load_timeout_s"),
        ('[[pools]]\nid = "a"\nstop_grace_s = nan\n', "pools[0].stop_grace_s"),
        ("heartbeat_s = inf\n", "heartbeat_s"),
        ("[nats]\nstartup_timeout_s = inf\n", "nats.startup_timeout_s"),
        ("[pools.restart]\n", "pools"),
    ],
)
def test_non_finite_and_malformed_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    message = _error(tmp_path, text)
    assert f"cfg.toml: {key}:" in message


@pytest.mark.parametrize(
    ("pool", "key", "message"),
    [
        ("max_lease_ttl_s = inf", "pools[0].max_lease_ttl_s", "finite"),
        ("max_lease_ttl_s = 0", "pools[0].max_lease_ttl_s", "greater than 0"),
        ("max_lease_ttl_s = 1e9", "pools[0].max_lease_ttl_s", "less than or equal to 604800"),
        ("slots = 5000", "pools[0].slots", "less than or equal to 1024"),
        ('models = [""]', "pools[0].models[0]", "at least 1 character"),
        ('overrides = { ctx = { type = "int", flag = "--ctx" } }', "pools[0].overrides.ctx", "needs min and max"),
        ('overrides = { ctx = { type = "int", min = 9, max = 1, flag = "--ctx" } }', "pools[0].overrides.ctx",
         "min must be <= max"),
        ('overrides = { ctx = { type = "float", min = 0, max = inf, flag = "--c" } }', "pools[0].overrides.ctx.max",
         "finite"),
        ('overrides = { kv = { type = "choice", flag = "--kv" } }', "pools[0].overrides.kv", "needs choices"),
        ('overrides = { x = { type = "bool", flag = "rm -rf" } }', "pools[0].overrides.x.flag", "is not a flag"),
        ('overrides = { x = { type = "str", flag = "--x" } }', "pools[0].overrides.x.type", "'int', 'float'"),
        ('overrides = { "Bad Name" = { type = "bool", flag = "--x" } }', "pools[0].overrides", "must match"),
    ],
)  # fmt: skip
def test_reload_overrides_and_lease_bounds_are_checked_by_key(
    tmp_path: Path, pool: str, key: str, message: str
) -> None:
    text = _error(tmp_path, f'[[pools]]\nid = "a"\nengine = "fake"\n{pool}\n')
    assert f"cfg.toml: {key}:" in text and message in text, text


def test_declared_overrides_reach_the_pool_definition(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    ctx = 'ctx_size = { type = "int", min = 512, max = 4096, flag = "--ctx-size" }'
    path.write_text(
        f'[[pools]]\nid = "a"\nengine = "fake"\nmodels = ["m1"]\nmax_lease_ttl_s = 60\noverrides = {{ {ctx} }}\n'
    )
    definition = load_config(path).pools[0].definition()
    (decl,) = definition.overrides
    assert (decl.name, decl.kind, decl.flag, decl.min, decl.max) == ("ctx_size", "int", "--ctx-size", 512, 4096)
    assert definition.models == ("m1",) and definition.max_lease_ttl_s == 60


def test_unknown_sim_profile_lists_the_known_ones(tmp_path: Path) -> None:
    message = _error(tmp_path, 'gpus = "sim:h100-x9"\n')
    assert "gpus: unknown simulated GPU profile 'sim:h100-x9'" in message
    assert "hetero-24g-48g" in message


def test_missing_gpu_snapshot_file_is_refused(tmp_path: Path) -> None:
    message = _error(tmp_path, f'gpus = "{tmp_path / "nope.json"}"\n')
    assert "gpus: " in message and "nope.json" in message


def test_duplicate_pool_ids_name_both_positions(tmp_path: Path) -> None:
    message = _error(tmp_path, '[[pools]]\nid = "a"\n[[pools]]\nid = "b"\n[[pools]]\nid = "a"\n')
    assert "cfg.toml: pools: pools[2].id 'a' repeats pools[0].id" in message
    assert "(root)" not in message


@pytest.mark.parametrize("prefix", ["poold.*", "poold.>", "a..b", "", "has space", ".poold"])
def test_prefix_must_be_literal_tokens(tmp_path: Path, prefix: str) -> None:
    message = _error(tmp_path, f'[nats]\nprefix = "{prefix}"\n')
    assert "nats.prefix:" in message and "not a subject prefix" in message


def test_dotted_literal_prefix_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text('[nats]\nprefix = "site-a.poold"\n')
    assert load_config(path).nats.prefix == "site-a.poold"


def test_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    message = _error(tmp_path, f'run_dir = "{tmp_path / "afile"}"\n')
    assert "run_dir:" in message and "is not a directory" in message
    message = _error(tmp_path, f'run_dir = "{tmp_path / "afile" / "below"}"\n')
    assert "run_dir:" in message and "is not a directory" in message


@pytest.mark.parametrize("addr", ["9464", "localhost:http", "127.0.0.1:70000", "127.0.0.1:"])
def test_bad_metrics_addr_is_refused(tmp_path: Path, addr: str) -> None:
    message = _error(tmp_path, f'metrics_addr = "{addr}"\n')
    assert "metrics_addr:" in message and "host:port" in message


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_run_exits_2_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text('[nats]\nprefix = "poold.*"\n[[pools]]\nid = "a"\nprobe_interval_s = inf\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pool_managerd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nats.prefix" in proc.stderr and "pools[0].probe_interval_s" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_metrics_addr_in_use_exits_2_before_connecting(tmp_path: Path) -> None:
    # The NATS URL leads nowhere: were the address checked only after connecting, the daemon would
    # wait out startup_timeout_s and report the connection instead.
    with socket.socket() as held, socket.socket() as nowhere:
        held.bind(("127.0.0.1", 0))
        held.listen()
        nowhere.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        dead = nowhere.getsockname()[1]
        path = tmp_path / "cfg.toml"
        path.write_text(
            f'metrics_addr = "127.0.0.1:{port}"\n[nats]\nurls = ["nats://127.0.0.1:{dead}"]\nstartup_timeout_s = 30\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "pool_managerd", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            cwd=tmp_path,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"metrics_addr '127.0.0.1:{port}' cannot be listened on" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
