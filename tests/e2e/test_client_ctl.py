"""PoolClient and ``pool-managerd ctl`` against a real daemon (in-process) on a real nats-server.

The daemon runs on the test's event loop, so the CLI runs as an asyncio subprocess. The helpers
here (:func:`running_daemon`, :func:`run_cli`) are shared with ``test_watch.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.cli import ctl as ctl_cli
from pool_managerd.cli.format import format_age, format_event, short_uuid
from pool_managerd.client import CommandReply, PoolClient
from pool_managerd.contract.messages import (
    Accepted,
    Event,
    InventoryReply,
    LifecycleReply,
    PoolsReply,
    Rejected,
    StateChanged,
    StatusReply,
)
from support.cli import DaemonEnv, rows_of, run_cli, running_daemon
from support.deadlines import POOL_S

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def env(nats_server: NatsServer, nc: NATS, tmp_path: Path) -> AsyncIterator[DaemonEnv]:
    async with running_daemon(nats_server.url, tmp_path / "run", nc) as started:
        yield started


@pytest.fixture
def client(nc: NATS) -> PoolClient:
    # Generous: replies take milliseconds, but a loaded CI machine has stalled one for seconds.
    return PoolClient(nc, timeout=POOL_S)


# ---------------------------------------------------------------------------------------------
# PoolClient
# ---------------------------------------------------------------------------------------------


async def test_client_lifecycle_preload_lease_release_drain(env: DaemonEnv, client: PoolClient) -> None:
    seen: list[Event] = []
    replies: list[CommandReply] = []
    result = await client.command_and_wait(
        env.pool, "preload", "ready", wait_timeout=20, on_reply=replies.append, on_event=seen.append
    )
    assert isinstance(result.reply, Accepted), result.reply
    assert replies == [result.reply]
    assert result.reached and not result.timed_out and result.state == "ready"
    assert seen == result.events
    transitions = [(e.body.trigger, e.body.src, e.body.dst) for e in seen if isinstance(e.body, StateChanged)]
    assert transitions == [("preload", "unready", "preloading"), ("engine_ready", "preloading", "ready")]
    # The command's own event carries its command id; the facts after it are the daemon's.
    assert seen[0].command_id == result.reply.command_id
    assert [e.seq for e in seen] == sorted(e.seq for e in seen)

    status = await client.status(env.pool)
    assert isinstance(status, StatusReply)
    assert status.pool.state == "ready" and status.pool.engine is not None and status.pool.slots_total == 2

    lease = await client.lease(env.pool, ttl_s=30, holder="tester")
    assert isinstance(lease, Accepted) and lease.lease_id and lease.expires_at
    status = await client.status(env.pool)
    assert isinstance(status, StatusReply) and status.pool.active_leases == 1
    assert [(x.lease_id, x.holder) for x in status.pool.leases] == [(lease.lease_id, "tester")]

    released = await client.release(env.pool, lease.lease_id)
    assert isinstance(released, Accepted)
    again = await client.release(env.pool, lease.lease_id)
    assert isinstance(again, Rejected) and again.code == "unknown_lease"

    drained = await client.command_and_wait(env.pool, "drain", "unready", wait_timeout=20, deadline_s=5)
    assert isinstance(drained.reply, Accepted) and drained.reached and drained.state == "unready"
    assert drained.last_transition is not None and drained.last_transition.dst == "unready"

    # Already there: returns at once, without events.
    there = await client.wait_for_state(env.pool, "unready", timeout=5)
    assert there.reached and there.events == [] and isinstance(there.reply, StatusReply)


async def test_wait_for_state_sees_a_preload_sent_elsewhere(env: DaemonEnv, client: PoolClient) -> None:
    waiter = asyncio.create_task(client.wait_for_state(env.pool, "ready", timeout=20))
    # Whenever the waiter subscribed and read the status, the engine_ready event is after it.
    reply = await client.preload(env.pool)
    assert isinstance(reply, Accepted)
    result = await waiter
    assert result.reached and result.state == "ready" and not result.timed_out, result
    assert result.last_transition is not None and result.last_transition.trigger == "engine_ready"


async def test_wait_ends_when_the_pool_comes_to_rest_in_failed(env: DaemonEnv, client: PoolClient) -> None:
    result = await client.command_and_wait(env.crashy, "preload", "ready", wait_timeout=20)
    assert isinstance(result.reply, Accepted)
    assert not result.reached and not result.timed_out and result.state == "failed"
    assert any(e.type == "backoff_scheduled" for e in result.events)
    reset = await client.command_and_wait(env.crashy, "reset", "unready", wait_timeout=5)
    assert isinstance(reset.reply, Accepted) and reset.reached
    # Settled by the reply itself; its own event is still reported.
    assert [e.type for e in reset.events] == ["state_changed"]


async def test_wait_times_out(env: DaemonEnv, client: PoolClient) -> None:
    # The crashy engine never gets healthy; waiting for ready with a short deadline times out
    # while the pool is still preloading or restarting.
    result = await client.command_and_wait(env.crashy, "preload", "ready", wait_timeout=0.1)
    assert isinstance(result.reply, Accepted)
    assert result.timed_out and not result.reached
    await client.command_and_wait(env.crashy, "stop", "unready", wait_timeout=10)


async def test_events_stream_and_traceparent(env: DaemonEnv, client: PoolClient) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with client.events(env.pool) as events:
        reply = await client.preload(env.pool, traceparent=traceparent, command_id="cmd-trace-1")
        assert isinstance(reply, Accepted) and reply.command_id == "cmd-trace-1"
        # The pool's first claim of its ownership lease is written with its first event.
        claim = await events.next(timeout=10)
        assert claim is not None and claim.type == "pool_claimed" and claim.command_id == "cmd-trace-1"
        first = await events.next(timeout=10)
        assert first is not None and first.type == "state_changed" and first.pool == env.pool
        assert first.command_id == "cmd-trace-1" and first.traceparent == traceparent
        async with asyncio.timeout(20):
            async for event in events:
                assert event.pool == env.pool
                if isinstance(event.body, StateChanged) and event.body.dst == "ready":
                    break
    # A retry with the same command id gets the same reply and is applied once.
    retried = await client.preload(env.pool, command_id="cmd-trace-1")
    assert retried == reply


async def test_local_rejections_send_nothing(nats_server: NatsServer, nc: NATS, client: PoolClient) -> None:
    sent: list[str] = []

    async def spy(msg: Any) -> None:
        sent.append(msg.subject)

    await nc.subscribe("poold.>", cb=spy)
    invalid = await client.status("Not_Valid")
    assert isinstance(invalid, Rejected) and invalid.code == "invalid_id" and invalid.verb == "status"
    wildcard = await client.preload("a.>")
    assert isinstance(wildcard, Rejected) and wildcard.code == "invalid_id"
    verb = await client.command("chat", "explode")
    assert isinstance(verb, Rejected) and verb.code == "unknown_verb"
    field = await client.command("chat", "lease", colour="blue")
    assert isinstance(field, Rejected) and field.code == "bad_request"
    value = await client.lease("chat", ttl_s=-1)
    assert isinstance(value, Rejected) and value.code == "bad_request" and "ttl_s" in value.message
    waited = await client.command_and_wait("Bad", "preload", "ready", wait_timeout=1)
    assert isinstance(waited.reply, Rejected) and waited.reply.code == "invalid_id"
    node = await client.node("BAD NODE", "pools")
    assert isinstance(node, Rejected) and node.code == "invalid_id"
    await nc.flush()
    assert sent == []


async def test_no_responders_and_timeouts(nats_server: NatsServer, nc: NATS, client: PoolClient) -> None:
    pool = f"ghost-{uuid.uuid4().hex[:8]}"
    unknown = await client.status(pool)
    assert isinstance(unknown, Rejected) and unknown.code == "unknown_pool"
    assert unknown.message == f"no daemon serves pool {pool!r}"
    node = await client.node(pool, "pools")
    assert isinstance(node, Rejected) and node.code == "unavailable"

    # A responder that never answers: the request times out.
    await nc.subscribe(f"poold.cmd.{pool}.*", cb=_ignore)
    await nc.flush()
    silent = await client.stop(pool, timeout=0.2)
    assert isinstance(silent, Rejected) and silent.code == "unavailable" and "within 0.2 s" in silent.message


async def _ignore(msg: Any) -> None:
    return None


async def test_node_commands_and_discovery(env: DaemonEnv, client: PoolClient) -> None:
    pools = await client.node(env.node, "pools")
    assert isinstance(pools, PoolsReply) and {p.pool for p in pools.pools} == {env.pool, env.crashy}
    inventory = await client.node(env.node, "inventory")
    assert isinstance(inventory, InventoryReply) and inventory.gpus.simulated and len(inventory.gpus.gpus) == 2
    lifecycle = await client.node(env.node, "lifecycle")
    assert isinstance(lifecycle, LifecycleReply) and "preload" in lifecycle.allowed["unready"]
    found = await client.discover(timeout=5)
    assert env.node in {info.node for info in found}


# ---------------------------------------------------------------------------------------------
# pool-managerd ctl
# ---------------------------------------------------------------------------------------------


async def test_ctl_preload_status_lease_release_drain(env: DaemonEnv, client: PoolClient) -> None:
    url = ["--url", env.url, "--timeout", str(POOL_S)]
    rc, out, err = await run_cli("ctl", "preload", env.pool, *url, "--wait")
    assert rc == 0, (out, err)
    lines = out.splitlines()
    assert lines[0].startswith(f"accepted: preload {env.pool} → preloading (seq ")
    assert any(f"{env.pool}  state_changed  preload unready → preloading" in line for line in lines)
    assert any(f"{env.pool}  state_changed  engine_ready preloading → ready" in line for line in lines)
    assert lines[-1].startswith(f"{env.pool} is ready (")

    rc, out, err = await run_cli("ctl", "status", env.pool, *url)
    assert rc == 0, err
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines() if not line.startswith(" "))
    assert table["pool"] == env.pool and table["state"] == "ready" and table["node"] == env.node
    assert table["slots"] == "2 free of 2" and table["engine"].startswith("pid ")

    rc, out, err = await run_cli("ctl", "lease", env.pool, *url, "--ttl-s", "30", "--holder", "ci")
    assert rc == 0, err
    lease_id = next(line.split()[1] for line in out.splitlines() if line.startswith("lease_id:"))
    status = await client.status(env.pool)
    assert isinstance(status, StatusReply) and status.pool.active_leases == 1
    assert [(x.lease_id, x.holder) for x in status.pool.leases] == [(lease_id, "ci")]

    rc, out, err = await run_cli("ctl", "release", env.pool, *url, "--lease-id", lease_id)
    assert rc == 0 and out.startswith(f"accepted: release {env.pool} → ready"), (out, err)

    rc, out, err = await run_cli("ctl", "drain", env.pool, *url, "--deadline-s", "5", "--wait", "--json")
    assert rc == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[0]["type"] == "accepted" and docs[0]["verb"] == "drain"
    bodies = [d["body"] for d in docs[1:]]
    assert {"type": "state_changed", "trigger": "drain", "src": "ready", "dst": "draining"}.items() <= bodies[0].items()
    # A drain without leases settles in its own step: the reply says unready, and what the ctl
    # shows are the events buffered by then, the engine's exit among them if it came that soon.
    assert [b["dst"] for b in bodies if b["type"] == "state_changed"][-1] == "unready"


async def test_ctl_rejections_exit_1(env: DaemonEnv) -> None:
    url = ["--url", env.url, "--timeout", str(POOL_S)]
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    (rc_invalid, _, err_invalid), (rc_unknown, _, err_unknown), (rc_illegal, _, err_illegal) = await asyncio.gather(
        run_cli("ctl", "status", "Bad_Pool", *url),
        run_cli("ctl", "status", ghost, *url),
        run_cli("ctl", "reset", env.pool, *url),
    )
    assert rc_invalid == 1 and err_invalid.startswith("invalid_id: invalid pool id 'Bad_Pool'")
    assert rc_unknown == 1 and err_unknown.strip() == f"unknown_pool: no daemon serves pool {ghost!r}"
    assert rc_illegal == 1 and err_illegal.startswith("illegal_transition: ")
    assert "state: unready; allowed: preload" in err_illegal


def test_ctl_unreachable_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_cli.main(["status", "chat", "--url", "nats://127.0.0.1:1", "--timeout", "2"]) == 3
    assert "unavailable: cannot reach NATS at nats://127.0.0.1:1" in capsys.readouterr().err


async def test_ctl_wait_for_a_crash_loop_exits_1(env: DaemonEnv) -> None:
    url = ["--url", env.url, "--timeout", str(POOL_S)]
    rc, out, err = await run_cli("ctl", "preload", env.crashy, *url, "--wait", "--wait-timeout", "20")
    assert rc == 1, (out, err)
    assert f"{env.crashy}  backoff_scheduled" in out
    assert "preload_failed preloading → failed" in out
    assert err.startswith(f"{env.crashy} came to rest in failed, not ready")


async def test_ctl_reply_timeout_exits_3(nats_server: NatsServer, nc: NATS) -> None:
    pool = f"mute-{uuid.uuid4().hex[:8]}"
    await nc.subscribe(f"poold.cmd.{pool}.*", cb=_ignore)
    await nc.flush()
    rc, out, err = await run_cli("ctl", "status", pool, "--url", nats_server.url, "--timeout", "0.3")
    assert rc == 3 and err.strip() == f"unavailable: no reply from pool {pool} within 0.3 s", (out, err)


async def test_ctl_node_verbs(env: DaemonEnv) -> None:
    url = ["--url", env.url, "--timeout", str(POOL_S)]
    (rc_pools, out_pools, err), (rc_inv, out_inv, _) = await asyncio.gather(
        run_cli("ctl", "pools", "--node", env.node, *url),
        run_cli("ctl", "inventory", env.node, *url, "--json"),
    )
    assert rc_pools == 0, err
    assert out_pools.startswith(f"node {env.node}: 2 pool(s)")
    assert rows_of(out_pools, env.pool)[0][1:3] == [env.node, "unready"]
    assert rc_inv == 0 and json.loads(out_inv)["type"] == "inventory"


def test_ctl_usage_errors_parse_offline() -> None:
    parser = argparse.ArgumentParser()
    ctl_cli.add_arguments(parser)
    args = parser.parse_args(["reload", "chat", "--set", "ctx_size=8192", "--set", "mode=fast", "--deadline-s", "3",
                              "--wait"])  # fmt: skip
    assert ctl_cli.command_fields(args) == {"overrides": {"ctx_size": 8192, "mode": "fast"}, "deadline_s": 3.0}
    assert ctl_cli.wait_target(args) == "ready"
    for argv, message in [
        (["reload", "chat", "--set", "nope"], "--set takes NAME=VALUE"),
        (["reload", "chat", "--set", "x=[1]"], "must be a number, true/false or text"),
        (["preload", "chat", "--set", "x=1"], "--set does not apply to preload"),
        (["status", "chat", "--policy", "free"], "--policy does not apply to status"),
        (["release", "chat"], "release needs --lease-id"),
        (["lease", "chat", "--wait"], "no default state"),
        (["stop", "chat", "--wait", "sideways"], "not a state"),
        (["preload", "chat", "--ttl-s", "5"], "--ttl-s does not apply to preload (only to lease)"),
    ]:
        with pytest.raises(ctl_cli.UsageError, match=re.escape(message)):
            args = parser.parse_args(argv)
            ctl_cli.command_fields(args)
            ctl_cli.wait_target(args)
    # Usage errors exit 2 before any connection is tried.
    assert ctl_cli.main(["status", "--url", "nats://127.0.0.1:1"]) == 2
    assert ctl_cli.main(["preload", "chat", "--ttl-s", "5", "--url", "nats://127.0.0.1:1"]) == 2


def test_event_lines_are_readable() -> None:
    event = Event(
        v=1,
        seq=3,
        ts=1_700_000_000.25,
        node="n1",
        pool="chat",
        body=StateChanged(trigger="preload_failed", src="preloading", dst="restarting", reason="exit 1", delay_s=1.5),
    )
    line = format_event(event)
    assert line.endswith("  chat  state_changed  preload_failed preloading → restarting (exit 1; delay 1.50s)")
    assert line[:12].count(":") == 2 and line[8] == "."
    assert format_age(0.42) == "0.4s" and format_age(185) == "3m05s"
    assert short_uuid("GPU-4090c0de-0000-4000-8000-000000000024") == "GPU-4090c0de"
