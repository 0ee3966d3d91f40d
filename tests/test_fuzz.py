"""A hypothesis-driven fuzz of every subject the daemon listens on, against one real daemon, one
real nats-server and a real fake engine.

Messages come from :mod:`pool_managerd.testing.wire_fuzz` (valid commands mutated, wrong types,
deep nesting, huge strings, binary junk, forged health, unknown verbs), drawn from a random
hypothesis controls. Every request must get a typed rejection within a deadline and no message
may change any pool; the daemon must keep answering. The example count follows the hypothesis
profile (``HYPOTHESIS_PROFILE=ci``: 200 examples of 2 messages); ``make fuzz`` sends 100,000.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from conftest import FAKE
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.config import load_config
from pool_managerd.contract.messages import NODE_COMMANDS, POOL_COMMANDS
from pool_managerd.runtime.daemon import Daemon
from pool_managerd.testing.wire_fuzz import Probe, judge, probe, state_of

NODE = "node-f"
POOLS = ["chat", "idle"]
PER_EXAMPLE = 2
REPLY_TIMEOUT_S = 5.0
T = TypeVar("T")

FUZZ_POOLS: list[dict[str, Any]] = [
    {"id": "chat", **FAKE, "slots": 2, "models": ["chat"],
     "overrides": {"ctx_size": {"type": "int", "min": 512, "max": 131072, "flag": "--ctx-size"}}},
    {"id": "idle", **FAKE, "external_health": True},
]  # fmt: skip
"""A ready pool holding a lease and declaring an override, and an idle one that takes outside
health reports: what a fuzzed message could most easily disturb."""


class Rig:
    """A daemon and a client on an event loop of their own thread, driven from sync tests
    (hypothesis runs each example synchronously)."""

    def __init__(self, root: Path) -> None:
        self.server = NatsServer(store_dir=root / "nats").start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        config = load_config(None, node=NODE, run_dir=root / "run", gpus="sim:hetero-24g-48g", heartbeat_s=30.0,
                             nats={"urls": [self.server.url]}, pools=FUZZ_POOLS)  # fmt: skip
        self.daemon = Daemon(config)
        self.nc: NATS = self.run(nats.connect(self.server.url))
        self.run(self.daemon.start())
        self.baseline = self.run(self._bring_up())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _request(self, subject: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply: dict[str, Any] = json.loads((await self.nc.request(subject, data, timeout=REPLY_TIMEOUT_S)).data)
        return reply

    async def states(self) -> dict[str, tuple[Any, ...]]:
        return {pool: state_of((await self._request(f"poold.cmd.{pool}.status", b""))["pool"]) for pool in POOLS}

    async def _bring_up(self) -> dict[str, tuple[Any, ...]]:
        assert (await self._request("poold.cmd.chat.preload", {"command_id": "up"}))["type"] == "accepted"

        async def ready() -> None:
            while (await self._request("poold.cmd.chat.status", b""))["pool"]["state"] != "ready":
                await asyncio.sleep(0.02)  # ok: polls a cheap read; wait_for bounds it

        await asyncio.wait_for(ready(), 20)
        lease = await self._request("poold.cmd.chat.lease", {"command_id": "held", "ttl_s": 3000, "holder": "fuzz"})
        assert lease["type"] == "accepted", lease
        return await self.states()

    async def _send(self, p: Probe) -> tuple[str, dict[str, tuple[Any, ...]]]:
        subject = f"poold.{p.subject}"
        verdict = "published"
        if p.expects_reply:
            try:
                verdict = judge((await self.nc.request(subject, p.payload, timeout=REPLY_TIMEOUT_S)).data)
            except TimeoutError:
                verdict = "untyped"
        else:
            await self.nc.publish(subject, p.payload)
            await self.nc.flush()
        return verdict, await self.states()

    def send(self, p: Probe) -> tuple[str, dict[str, tuple[Any, ...]]]:
        """The verdict on ``p``'s reply (``rejected`` is the only right one for a request) and
        every pool's state after it."""
        return self.run(self._send(p))

    def close(self) -> None:
        try:
            self.run(self.daemon.stop())
            self.run(self.nc.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.server.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fuzz"))
    try:
        yield rig
    finally:
        rig.close()


@given(rnd=st.randoms(use_true_random=False))
def test_every_invalid_message_gets_a_typed_rejection_and_changes_no_pool(rig: Rig, rnd: random.Random) -> None:
    for _ in range(PER_EXAMPLE):
        p = probe(rnd, POOLS, NODE)
        verdict, states = rig.send(p)
        assert verdict in ("rejected", "published"), (p.subject, p.mutation, p.payload[:200], verdict)
        assert states == rig.baseline, (p.subject, p.mutation, p.payload[:200])


def test_make_fuzz_runs_short_and_prints_its_figures() -> None:
    # The long run's own code, at 150 messages: a table, then one JSON line of zeros.
    bench = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
    done = subprocess.run([sys.executable, str(bench), "--messages", "150", "--seed", "3"], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "fuzz" and figures["messages"] == 150
    assert [figures[k] for k in ("crashes", "untyped_replies", "accepted_invalid", "state_changes")] == [0, 0, 0, 0]
    assert "status p50 / p99 during (ms)" in done.stdout


def test_the_generator_covers_every_subject_and_mutation() -> None:
    rnd = random.Random(7)
    probes = [probe(rnd, POOLS, NODE) for _ in range(3000)]
    verbs = {p.subject.split(".")[-1] for p in probes if p.kind in ("pool", "node")}
    assert verbs == set(POOL_COMMANDS) | set(NODE_COMMANDS)
    assert {p.kind for p in probes} == {"pool", "node", "health", "subject"}
    kinds = {p.mutation.split(":")[1] for p in probes}
    assert {"unknown_field", "bad_value", "deep_nesting", "huge_string", "binary_junk", "truncated_json"} <= kinds
