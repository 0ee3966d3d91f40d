"""GPUs as they behave, end to end without a GPU: the daemon over a real nats-server, real
fake-engine processes recording their (simulated) allocations, and the simulated driver's fault
file. Every path of the post-launch check and of a device fault is shown here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import generate_latest

from conftest import FAKE, StartDaemon
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.client import PoolClient
from pool_managerd.contract.messages import (
    EVENT_DECODER,
    REPLY_DECODER,
    Accepted,
    Event,
    GpuCleared,
    GpuClearReply,
    GpuFault,
    GpuVerified,
    InventoryReply,
    Rejected,
    StateChanged,
    StatusReply,
)
from test_client_ctl import run_cli

GPU0 = "GPU-4090c0de-0000-4000-8000-000000000024"
GPU1 = "GPU-a6000ce1-0000-4000-8000-000000000048"
ONCE = {"max_consecutive_failures": 1, "initial_s": 0.05}
"""One failed start parks the pool in failed: the test sees one verdict, not a restart loop."""


class Events:
    """Every event (pool and node) seen on the wire, with waiters."""

    def __init__(self) -> None:
        self.items: list[Event] = []
        self.cond = asyncio.Condition()

    async def on_msg(self, msg: Msg) -> None:
        async with self.cond:
            self.items.append(EVENT_DECODER.decode(msg.data))
            self.cond.notify_all()

    async def wait(self, pred: Callable[[Event], bool], timeout: float = 15.0) -> Event:
        async def find() -> Event:
            async with self.cond:
                while True:
                    for event in self.items:
                        if pred(event):
                            return event
                    await self.cond.wait()

        return await asyncio.wait_for(find(), timeout)

    def changes(self, pool: str) -> list[StateChanged]:
        return [e.body for e in self.items if e.pool == pool and isinstance(e.body, StateChanged)]


async def follow(nc: NATS) -> Events:
    events = Events()
    await nc.subscribe("poold.evt.>", cb=events.on_msg)
    await nc.subscribe("poold.node.*.evt.>", cb=events.on_msg)
    await nc.flush()
    return events


async def req(nc: NATS, subject: str, payload: dict[str, Any] | None = None) -> Any:
    body = json.dumps(payload).encode() if payload is not None else b""
    msg = await nc.request(subject, body, timeout=10)
    return REPLY_DECODER.decode(msg.data)


def cid() -> str:
    return uuid.uuid4().hex


def reached(pool: str, state: str, after: int = 0) -> Callable[[Event], bool]:
    return lambda e: e.pool == pool and e.seq > after and isinstance(e.body, StateChanged) and e.body.dst == state


def verified(pool: str) -> Callable[[Event], bool]:
    return lambda e: e.pool == pool and isinstance(e.body, GpuVerified)


def pool(pid: str, *knobs: str, **extra: Any) -> dict[str, Any]:
    args = [*FAKE["extra_args"], *knobs]
    return {**FAKE, "id": pid, "extra_args": args, "gpu_check_deadline_s": 0.5, **extra}


@pytest.fixture
async def nc_fresh(fresh_nats_server: NatsServer, nats_connect: Any) -> NATS:
    client: NATS = await nats_connect(fresh_nats_server.url)
    return client


async def preload(nc: NATS, name: str, **fields: Any) -> Accepted:
    reply = await req(nc, f"poold.cmd.{name}.preload", {"command_id": cid(), **fields})
    assert isinstance(reply, Accepted), reply
    return reply


# --- verified after launch ---------------------------------------------------------------------


async def test_a_verified_engine_is_ready_and_its_held_vram_shows_in_status_kv_and_metrics(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    daemon = await start_daemon(fresh_nats_server.url, pools=[pool("chat")])
    events = await follow(nc_fresh)
    await preload(nc_fresh, "chat")
    await events.wait(reached("chat", "ready"))
    body = (await events.wait(verified("chat"))).body
    assert isinstance(body, GpuVerified) and body.ok and body.reason is None
    status = await req(nc_fresh, "poold.cmd.chat.status")
    assert isinstance(status, StatusReply) and status.pool.placement is not None
    placement = status.pool.placement
    # The fake engine allocated the plan's budget on the GPU it was given; the daemon read it
    # from the simulated driver, not from the engine.
    assert status.pool.vram_held == dict(zip(placement.uuids, placement.budgets, strict=True))
    assert body.held == status.pool.vram_held and status.pool.engine is not None
    assert body.pid == status.pool.engine.pid
    ((gpu, held),) = status.pool.vram_held.items()
    value = daemon.metrics.registry.get_sample_value("poold_pool_vram_held_bytes", {"pool": "chat", "gpu": gpu})
    assert value == held
    assert "poold_pool_vram_held_bytes{" in generate_latest(daemon.metrics.registry).decode()
    kv = await nc_fresh.jetstream().key_value("poold_pools")
    for _ in range(200):
        entry = await kv.get("chat")
        if b'"vram_held":{"' in (entry.value or b""):
            break
        await asyncio.sleep(0.05)  # ok: the KV writer coalesces; bounded by the loop
    assert json.loads(entry.value or b"{}")["vram_held"] == {gpu: held}
    # The inventory shows what the engine holds, taken off the GPU's free memory.
    inv = await req(nc_fresh, "poold.node.node-a.cmd.inventory")
    assert isinstance(inv, InventoryReply)
    listed = {g.uuid: g for g in inv.gpus.gpus}[gpu]
    assert [(p.pid, p.used_memory) for p in listed.processes] == [(body.pid, held)]


@pytest.mark.parametrize(
    ("knob", "reason"),
    [("none", "cpu_fallback"), ("wrong-device", "wrong_devices"), ("under", "under_budget")],
)
async def test_an_engine_not_on_its_gpus_fails_typed_and_is_never_ready(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS, knob: str, reason: str
) -> None:
    await start_daemon(fresh_nats_server.url, pools=[pool("chat", "--gpu-alloc", knob, restart=ONCE)])
    events = await follow(nc_fresh)
    await preload(nc_fresh, "chat")
    body = (await events.wait(verified("chat"))).body
    assert isinstance(body, GpuVerified) and not body.ok and body.reason == reason
    failed = await events.wait(lambda e: e.pool == "chat" and isinstance(e.body, StateChanged)
                               and e.body.trigger == "preload_failed")  # fmt: skip
    assert isinstance(failed.body, StateChanged) and failed.body.reason.startswith(f"{reason}:")
    await events.wait(reached("chat", "failed"))
    assert "ready" not in [c.dst for c in events.changes("chat")]
    status = await req(nc_fresh, "poold.cmd.chat.status")
    assert isinstance(status, StatusReply)
    assert status.pool.state == "failed" and status.pool.vram_held == {}
    assert (status.pool.last_error or "").startswith(reason)


async def test_an_engine_that_allocates_late_is_ready_once_it_holds_within_the_deadline(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS
) -> None:
    await start_daemon(fresh_nats_server.url,
                       pools=[pool("chat", "--gpu-alloc-after", "0.4", gpu_check_deadline_s=5.0)])  # fmt: skip
    events = await follow(nc_fresh)
    await preload(nc_fresh, "chat")
    await events.wait(reached("chat", "ready"))
    body = (await events.wait(verified("chat"))).body
    assert isinstance(body, GpuVerified) and body.ok
    # Healthy at 0.1 s, allocated at 0.4 s: the check waited for it.
    assert 0.1 < body.elapsed_s < 5.0


# --- GPU faults --------------------------------------------------------------------------------


def inject(run_dir: Path, **fault: Any) -> None:
    with (run_dir / "sim-gpu" / "faults.jsonl").open("a") as f:
        f.write(json.dumps(fault) + "\n")


def node_event(kind: type, **match: Any) -> Callable[[Event], bool]:
    return lambda e: (
        e.pool is None and isinstance(e.body, kind) and all(getattr(e.body, k) == v for k, v in match.items())
    )


async def test_an_xid_stops_exactly_the_pools_on_its_gpu_marks_it_unhealthy_until_cleared(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS, tmp_path: Path
) -> None:
    pools = [pool("a", device_mask="0"), pool("b", device_mask="1"), pool("c", device_mask="1")]
    await start_daemon(fresh_nats_server.url, pools=pools)
    events = await follow(nc_fresh)
    for name in ("a", "b", "c"):
        await preload(nc_fresh, name)
    for name in ("a", "b", "c"):
        await events.wait(reached(name, "ready"))
    before_a = len(events.changes("a"))

    inject(tmp_path / "node-a", uuid=GPU1, xid=79)
    fault = (await events.wait(node_event(GpuFault, uuid=GPU1))).body
    assert isinstance(fault, GpuFault)
    assert (fault.kind, fault.xid, fault.fault_class, fault.action) == ("xid", 79, "stop", "stop")
    assert fault.unhealthy
    assert fault.pools == ["b", "c"] and fault.simulated
    for name in ("b", "c"):
        stopped = (await events.wait(reached(name, "unready"))).body
        assert isinstance(stopped, StateChanged) and stopped.trigger == "stop"
    assert len(events.changes("a")) == before_a  # the pool on the other GPU is untouched
    inv = await req(nc_fresh, "poold.node.node-a.cmd.inventory")
    assert isinstance(inv, InventoryReply)
    health = {g.uuid: (g.healthy, g.fault) for g in inv.gpus.gpus}
    assert health[GPU0] == (True, None) and health[GPU1] == (False, "Xid 79: GPU fell off the bus")

    # Placement avoids it: named, a typed refusal; auto, the healthy GPU.
    refused = await req(nc_fresh, "poold.cmd.b.preload", {"command_id": cid()})
    assert isinstance(refused, Rejected) and refused.code == "placement_failed"
    assert [p.code for p in refused.problems] == ["gpu_unhealthy"]
    elsewhere = await preload(nc_fresh, "b", device_mask="auto")
    ready = (await events.wait(reached("b", "ready", after=elsewhere.seq))).body
    assert isinstance(ready, StateChanged)
    moved = await req(nc_fresh, "poold.cmd.b.status")
    assert isinstance(moved, StatusReply) and moved.pool.placement is not None
    assert moved.pool.placement.uuids == [GPU0]

    # The operator clears it (ctl gpu-clear): an event, and the GPU is placeable again.
    code, out, err = await run_cli("ctl", "gpu-clear", GPU1, "--node", "node-a", "--url", fresh_nats_server.url)
    assert (code, err) == (0, ""), err
    assert "cleared" in out
    await events.wait(node_event(GpuCleared, uuid=GPU1))
    client = PoolClient(nc_fresh)
    again = await client.gpu_clear("node-a", GPU1)
    assert isinstance(again, GpuClearReply) and not again.cleared
    back = await preload(nc_fresh, "c")
    await events.wait(reached("c", "ready", after=back.seq))
    status = await req(nc_fresh, "poold.cmd.c.status")
    assert isinstance(status, StatusReply) and status.pool.placement is not None
    assert status.pool.placement.uuids == [GPU1]


async def test_ctl_gpu_clear_needs_a_uuid_and_a_node() -> None:
    code, _out, err = await run_cli("ctl", "gpu-clear", GPU1, "--url", "nats://127.0.0.1:1")
    assert code == 2 and "--node" in err
    code, _out, err = await run_cli("ctl", "gpu-clear", "GPU/x", "--node", "n", "--url", "nats://127.0.0.1:1")
    assert code == 2 and "not a GPU UUID" in err


async def test_a_drain_class_fault_drains_its_pools_and_an_application_xid_touches_nothing(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS, tmp_path: Path
) -> None:
    await start_daemon(fresh_nats_server.url, pools=[pool("a", device_mask="0")])
    events = await follow(nc_fresh)
    await preload(nc_fresh, "a")
    await events.wait(reached("a", "ready"))
    before = len(events.changes("a"))
    inject(tmp_path / "node-a", uuid="GPU-not-on-this-node", xid=79)  # dropped: no such GPU
    inject(tmp_path / "node-a", uuid=GPU0, xid=13)
    app = (await events.wait(node_event(GpuFault, xid=13))).body
    assert isinstance(app, GpuFault) and (app.fault_class, app.action, app.unhealthy, app.pools) == (
        "application", "none", False, [])  # fmt: skip
    code, out, err = await run_cli("sim-fault", GPU0, "--xid", "94", "--run-dir", str(tmp_path / "node-a"))
    assert (code, err) == (0, "") and "contained ECC error (drain" in out, (code, out, err)
    drain = (await events.wait(node_event(GpuFault, xid=94))).body
    assert isinstance(drain, GpuFault) and (drain.fault_class, drain.action, drain.pools) == ("drain", "drain", ["a"])
    draining = (await events.wait(reached("a", "draining"))).body
    assert isinstance(draining, StateChanged) and draining.trigger == "drain" and draining.deadline_at is not None
    await events.wait(reached("a", "unready"))
    # The application Xid changed nothing: the first change after it is the drain.
    assert events.changes("a")[before].trigger == "drain"
    faults = [e.body for e in events.items if isinstance(e.body, GpuFault)]
    assert [f.xid for f in faults] == [13, 94]  # faults are handled in order; the unknown GPU's was dropped


async def test_an_unhealthy_gpu_stays_unhealthy_across_a_daemon_restart(
    fresh_nats_server: NatsServer, start_daemon: StartDaemon, nc_fresh: NATS, tmp_path: Path
) -> None:
    daemon = await start_daemon(fresh_nats_server.url, pools=[pool("a", device_mask="0")])
    events = await follow(nc_fresh)
    inject(tmp_path / "node-a", uuid=GPU0, kind="ecc_dbe")
    fault = (await events.wait(node_event(GpuFault, uuid=GPU0))).body
    assert isinstance(fault, GpuFault) and fault.kind == "ecc_dbe" and fault.action == "stop"
    await daemon.stop()
    await start_daemon(fresh_nats_server.url, pools=[pool("a", device_mask="0")])
    inv = await req(nc_fresh, "poold.node.node-a.cmd.inventory")
    assert isinstance(inv, InventoryReply)
    assert {g.uuid: g.healthy for g in inv.gpus.gpus} == {GPU0: False, GPU1: True}
    refused = await req(nc_fresh, "poold.cmd.a.preload", {"command_id": cid()})
    assert isinstance(refused, Rejected) and [p.code for p in refused.problems] == ["gpu_unhealthy"]
