"""The lease keeper's renewals against a store whose answers are scripted: a renewal that got no
answer is tried again until the serving deadline, and a refusal is checked against the record
before the lease is given up. (The real KV bucket, a real cluster and kills of its servers are
``tests/e2e/test_fleet_faults.py``'s.)"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from pool_managerd.adapters.owner_store import LeaseLost, ReadLease
from pool_managerd.contract.messages import OwnerRecord
from pool_managerd.core.ownership import Claim, LeaseTiming
from pool_managerd.runtime.ownership import OwnershipKeeper
from support.deadlines import POOL_S

# Short enough that a renewal falls due within a test, long enough that the retries fit before
# the serving deadline (1.5 s after a renewal) on a loaded machine.
TIMING = LeaseTiming(ttl_s=1.8, margin_s=0.3)


@dataclass
class ScriptedStore:
    """One key's record and revision; ``write_faults``/``read_faults`` are raised, in order, by
    the next writes/reads (an entry ``"stored"`` stores the write, then raises as if its ack was lost)."""

    record: OwnerRecord | None = None
    revision: int = 0
    write_faults: deque[BaseException | str] = field(default_factory=deque)
    read_faults: deque[BaseException] = field(default_factory=deque)
    writes: int = 0
    stored: asyncio.Event = field(default_factory=asyncio.Event)

    def watcher(self, callback: object) -> _NoWatch:
        return _NoWatch()

    async def read(self, pool: str) -> ReadLease:
        if self.read_faults:
            raise self.read_faults.popleft()
        return ReadLease(self.record, self.revision)

    async def write(self, pool: str, record: OwnerRecord, expect_revision: int) -> int:
        self.writes += 1
        fault = self.write_faults.popleft() if self.write_faults else None
        if isinstance(fault, BaseException):
            raise fault
        if expect_revision != self.revision:
            raise LeaseLost(pool, expect_revision)
        self.record, self.revision = record, self.revision + 1
        if fault == "stored":
            raise TimeoutError("ack lost")
        self.stored.set()
        return self.revision


class _NoWatch:
    """The keeper's KV watch, absent here: these tests are about renewals."""

    async def start(self) -> None:
        return None

    async def restart(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def _holding(store: ScriptedStore) -> tuple[OwnershipKeeper, list[str]]:
    lost: list[str] = []

    async def claimed(pool: str, claim: Claim) -> None:
        return None

    keeper = OwnershipKeeper(store, "node-a", TIMING, on_lost=lambda pool, why: lost.append(why),  # type: ignore[arg-type]
                             on_claimed=claimed)  # fmt: skip
    assert await keeper.try_claim("p", take_over=True) is not None
    keeper.start()
    assert keeper.serving("p") and store.revision == 1
    store.stored.clear()
    return keeper, lost


async def test_a_renewal_that_gets_no_answer_is_tried_again_before_the_deadline() -> None:
    store = ScriptedStore()
    keeper, lost = await _holding(store)
    try:
        # Two renewals in a row get no answer (a leader election of the bucket): the third,
        # a retry within the same renewal period, must hold the lease.
        store.write_faults.extend([ConnectionError("no responders"), ConnectionError("no responders")])
        await asyncio.wait_for(store.stored.wait(), POOL_S)
        assert lost == [] and keeper.serving("p")
        assert keeper.renew_failures == 2 and keeper.renewals == 1
        assert store.record is not None and store.record.epoch == 1
    finally:
        await keeper.close()


async def test_a_refused_renewal_whose_record_cannot_be_read_keeps_the_lease() -> None:
    store = ScriptedStore()
    keeper, lost = await _holding(store)
    try:
        # The renewal is stored but its ack is lost; the next one, expecting the old revision, is
        # refused; the read that would show the record is ours gets no answer at first. None of
        # that is another node's write, so the lease is kept and renewed on top of our own.
        store.write_faults.append("stored")
        store.read_faults.append(TimeoutError("no answer"))
        await asyncio.wait_for(store.stored.wait(), POOL_S)
        assert lost == [] and keeper.serving("p")
        assert store.revision == 3 and keeper.held["p"].revision == 3
    finally:
        await keeper.close()


async def test_a_renewal_refused_by_another_nodes_record_gives_the_lease_up() -> None:
    store = ScriptedStore()
    keeper, lost = await _holding(store)
    try:
        store.record, store.revision = OwnerRecord(node="node-b", epoch=2, ttl_s=TIMING.ttl_s, renewed_at=0.0), 2
        await asyncio.wait_for(_until(lambda: bool(lost)), POOL_S)
        assert lost == ["another node wrote its owner record"]
        assert not keeper.serving("p") and "p" not in keeper.held
    finally:
        await keeper.close()


async def _until(check: object) -> None:
    while not check():  # type: ignore[operator]
        await asyncio.sleep(0.02)  # ok: polls a flag the keeper's own task sets
