"""The replay fold: pool events folded through :func:`~pool_managerd.core.state.evolve`, with
invariant checks. Pure.

The same fold serves ``pool-managerd replay`` (history, audits, ``--check-live``) and a
restarted daemon (recovery rebuilds each pool from its events before reconciling with the
processes it finds). It re-runs no guard: every decision (placement, delay, exit code) is
recorded in the events, so a fold needs no clock, RNG or GPU and is exact. The state it
computes is the value the live machine evolved as it emitted the same events.

Invariants checked per pool:

* ``seq_gap``: per-pool sequences are contiguous (the first one seen may start anywhere when
  the fold begins mid-log, see ``expect_start``);
* ``illegal_transition``: every ``state_changed`` is a row of the table and starts from the
  state the fold is in;
* ``two_writers``: every event is written under the lease its node holds. An event carries the
  epoch of its writer's ownership lease; each epoch opens with a ``pool_claimed`` by its holder,
  with an epoch above every earlier one, and an event is legal only from the node that claimed
  its epoch, while no later epoch has been claimed. So a pool may change hands any number of
  times (A to B to A), and a write by a node that did not hold the lease at that point is found.
  Events without an epoch (logs from before leases) follow the older rule until the pool's first
  claim: a pool may move to another node, but a node that handed it over never writes it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pool_managerd.contract.messages import Event, PoolClaimed, StateChanged
from pool_managerd.core.state import PoolValue, evolve, initial
from pool_managerd.core.table import DESTINATIONS

_DESTINATIONS = DESTINATIONS
_NONE: frozenset[str] = frozenset()

PoolView = PoolValue
"""What the fold holds per pool: the pool's state value (the name replay code has used)."""


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken invariant, naming the pool and the event where it was found."""

    code: str
    pool: str
    seq: int
    message: str


@dataclass(slots=True)
class Fold:
    """Folds events one at a time; ``views`` holds each pool's state, ``violations`` what broke."""

    expect_start: bool = False
    """True: a pool's first event must have ``seq`` 1 (a whole log); False: a fold may start
    mid-log (``--from-seq``)."""
    start: Callable[[str], PoolValue] = initial
    """A pool's value before its first event (recovery starts from the pool's definition)."""
    views: dict[str, PoolValue] = field(default_factory=dict)
    writers: dict[str, list[str]] = field(default_factory=dict)
    """Per pool, the nodes that wrote it, in order; the last one is the current writer."""
    violations: list[Violation] = field(default_factory=list)
    events: int = 0
    claims: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Per pool, the latest claim: (node, epoch)."""

    def writer(self, pool: str) -> str | None:
        """The node that wrote ``pool``'s last event."""
        nodes = self.writers.get(pool)
        return nodes[-1] if nodes else None

    def apply(self, event: Event) -> Violation | None:
        """Fold one event; returns the violation it caused, if any (also kept in ``violations``)."""
        self.events += 1
        pool = event.pool
        if pool is None:
            return None  # node events carry no pool state
        # A violation is recorded and the fold goes on with what the event says, so one broken
        # event is reported once instead of cascading through the rest of the log.
        found: Violation | None = None
        view = self.views.get(pool)
        if view is None:
            view = self.start(pool)
            self.writers[pool] = []
            if self.expect_start and event.seq != 1:
                found = self._violate("seq_gap", pool, event.seq, f"first event of pool {pool!r} has seq {event.seq}")
        elif event.seq != view.seq + 1:
            found = self._violate(
                "seq_gap",
                pool,
                event.seq,
                f"pool {pool!r}: seq {event.seq} follows {view.seq} (want {view.seq + 1})",
            )
        writers = self.writers[pool]
        body = event.body
        if event.epoch is not None or pool in self.claims:
            found = self._check_epoch(pool, event) or found
        if not writers or event.node != writers[-1]:  # rare: a pool's first event or a takeover
            if event.node in writers:
                if pool not in self.claims:
                    found = found or self._violate(
                        "two_writers", pool, event.seq,
                        f"pool {pool!r}: node {event.node!r} writes again after {writers[-1]!r} took the pool over",
                    )  # fmt: skip
                writers.remove(event.node)
            writers.append(event.node)
        if body.__class__ is StateChanged and (
            body.src != view.state or body.dst not in _DESTINATIONS.get((body.src, body.trigger), _NONE)
        ):
            why = "is not a row of the lifecycle table" if body.src == view.state else f"but the pool is {view.state}"
            found = self._violate(
                "illegal_transition", pool, event.seq,
                f"pool {pool!r} seq {event.seq}: {body.src} --{body.trigger}--> {body.dst} {why}",
            )  # fmt: skip
        self.views[pool] = evolve(view, event)
        return found

    def _check_epoch(self, pool: str, event: Event) -> Violation | None:
        """The lease rule of ``two_writers`` (see the module docstring)."""
        held = self.claims.get(pool)
        body = event.body
        if body.__class__ is PoolClaimed:
            assert isinstance(body, PoolClaimed)
            self.claims[pool] = (event.node, body.epoch)
            if held is not None and body.epoch <= held[1]:
                return self._violate(
                    "two_writers", pool, event.seq,
                    f"pool {pool!r}: node {event.node!r} claims epoch {body.epoch}, "
                    f"but {held[0]!r} already claimed epoch {held[1]}",
                )  # fmt: skip
            if body.node != event.node or event.epoch != body.epoch:
                return self._violate("two_writers", pool, event.seq,
                                     f"pool {pool!r}: a claim of epoch {body.epoch} for {body.node!r} "
                                     f"written by {event.node!r} under epoch {event.epoch}")  # fmt: skip
            return None
        if held is None or held != (event.node, event.epoch):
            lease = "nobody has claimed it" if held is None else f"{held[0]!r} holds epoch {held[1]}"
            return self._violate(
                "two_writers", pool, event.seq,
                f"pool {pool!r}: node {event.node!r} writes under epoch {event.epoch}, but {lease}",
            )  # fmt: skip
        return None

    def _violate(self, code: str, pool: str, seq: int, message: str) -> Violation:
        violation = Violation(code, pool, seq, message)
        self.violations.append(violation)
        return violation


def fold(events: Iterable[Event], *, expect_start: bool = False) -> Fold:
    """Fold every event; see :class:`Fold`."""
    f = Fold(expect_start=expect_start)
    apply = f.apply
    for event in events:
        apply(event)
    return f
