"""Who may serve a pool, when its owner must stop, and when another node may claim it. Pure.

A pool's ownership is a lease: an :class:`~pool_managerd.contract.messages.OwnerRecord` (node, epoch) in
a KV key, changed only by compare-and-set on the key's revision. The shell does the KV reads and
writes and keeps the clocks; these functions decide, from (record, revision, now, timing).

Every time here is the *local monotonic* clock of the node deciding, never another host's wall
clock, so no two clocks are compared:

* The owner counts its lease from the moment it *sent* its last successful write (the server
  stored it later, so the lease really began later), and stops serving at
  ``ttl_s - margin_s`` after that.
* Anyone else counts from the moment it *saw* the record's revision change (the server stored
  it earlier), and may claim a record that has not changed for ``ttl_s + margin_s``.

So the owner stops at least ``2 * margin_s`` before anyone may claim, provided the two clocks
run at about the same rate (drift well under ``margin_s`` per ``ttl_s``), and a pause of the
owner (SIGSTOP, a VM stall, a long GC) only makes it stop *sooner*: on waking, it looks at how
long ago it renewed before answering anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from pool_managerd.contract.messages import OwnerRecord


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """The lease's time-to-live and the safety margin on each side of it (seconds)."""

    ttl_s: float
    margin_s: float

    def __post_init__(self) -> None:
        if not 0 < self.margin_s * 2 < self.ttl_s:
            raise ValueError(f"lease margin {self.margin_s} s must be positive and under half the ttl {self.ttl_s} s")

    @property
    def renew_every_s(self) -> float:
        """How often the owner renews: three tries before it must stop serving."""
        return (self.ttl_s - self.margin_s) / 3

    @property
    def serve_for_s(self) -> float:
        """How long after a renewal was sent the owner may still serve."""
        return self.ttl_s - self.margin_s

    @property
    def claim_after_s(self) -> float:
        """How long a record must stay unchanged (as seen) before another node may claim it."""
        return self.ttl_s + self.margin_s


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claimant writes: the next epoch, and whom it takes the pool from."""

    epoch: int
    previous_node: str | None
    previous_epoch: int
    expect_revision: int
    """The revision the write must find (0: the key must not exist yet)."""


def serving(renewed_sent_at: float | None, now: float, timing: LeaseTiming) -> bool:
    """Whether the owner may still act on the pool (answer, write, run its engine)."""
    return renewed_sent_at is not None and now - renewed_sent_at < timing.serve_for_s


def serving_until(renewed_sent_at: float, timing: LeaseTiming) -> float:
    """When the owner must stop unless it renews again first."""
    return renewed_sent_at + timing.serve_for_s


def may_claim(
    node: str,
    record: OwnerRecord | None,
    revision: int,
    seen_since: float | None,
    now: float,
    timing: LeaseTiming,
    *,
    known_epoch: int = 0,
) -> Claim | None:
    """The claim ``node`` may write now, or None while another node's lease may still be live.

    ``record``/``revision``: the key as last read (None, 0: absent). ``seen_since``: when this
    node first saw that revision (None: not watched long enough to know). ``known_epoch``: the
    highest epoch the pool's events name, so an epoch is never reused even if the key was lost.
    A free lease (absent, released) or this node's own (its previous life) may be taken at once;
    another node's only once it has stayed unchanged for :attr:`LeaseTiming.claim_after_s`.
    """
    if record is None:
        return Claim(known_epoch + 1, None, known_epoch, revision)
    epoch = max(record.epoch, known_epoch) + 1
    if record.released or record.node == node:
        return Claim(epoch, record.node, record.epoch, revision)
    if seen_since is not None and now - seen_since >= timing.claim_after_s:
        return Claim(epoch, record.node, record.epoch, revision)
    return None


def claim_due(seen_since: float, timing: LeaseTiming) -> float:
    """When another node's unchanged record may be claimed."""
    return seen_since + timing.claim_after_s


def may_take_over(node: str, standby: tuple[str, ...]) -> bool:
    """Whether ``node`` may take a pool over from another live node that stops renewing: any
    node that configures it when the pool names no standbys, else only the ones it names."""
    return not standby or node in standby
