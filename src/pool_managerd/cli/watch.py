"""``pool-managerd watch``: a live table of every pool, fed by the KV bucket and the event stream.

Examples::

    pool-managerd watch                       # redraws in place on a terminal; Ctrl-C to quit
    pool-managerd watch --once                # print the current table and exit (scripts, tests)
    pool-managerd watch | tee pools.log       # not a terminal: a new table per change

Rows come from the KV bucket ``poold_pools`` (a watch: every current snapshot, then each update),
each checked once against the event stream (:func:`backed`): a snapshot of a pool that no event
and no ``daemon_started`` of its node backs (a forged one) is left out and named below the table;
the event stream (a core subscription on ``<prefix>.evt.>``) keeps the "last event" column fresh
and triggers a redraw as events arrive. Redraws are at most every 100 ms; on a terminal the ages
also tick every ``--interval`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pool_managerd.adapters.eventlog.reading import last_event
from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.cli.connect import TargetError, add_connection_arguments, connect, resolve_target
from pool_managerd.cli.fleet import NodeView, liveness, read_heartbeats
from pool_managerd.cli.format import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, format_age, render_table, silence
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import (
    EVENT_DECODER,
    DaemonStarted,
    DaemonStopping,
    Event,
    NodeHeartbeat,
    PoolSnapshot,
)
from pool_managerd.contract.subjects import KV_BUCKET, STREAM_NAME, Subjects

MIN_REDRAW_S = 0.1
"""Redraws are at least this far apart, however fast events arrive."""

_CLEAR = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``watch`` options."""
    parser.description = "a live table of every pool, fed by the KV bucket poold_pools and the event stream"
    add_connection_arguments(parser)
    parser.add_argument("--once", action="store_true", help="print the current table and exit")
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="on a terminal, redraw at least every S s (default 1)"
    )
    parser.add_argument("--bucket", default=KV_BUCKET, help=f"KV bucket of pool snapshots (default {KV_BUCKET})")


# --------------------------------------------------------------------------------------------
# Live state
# --------------------------------------------------------------------------------------------


def backed(snap: PoolSnapshot, last: Event | None, announced: frozenset[str]) -> bool:
    """Whether the event stream backs a KV snapshot: the pool's newest event is by the node the
    snapshot names and not older than it, or that node's last ``daemon_started`` lists the pool
    (``announced``: a pool served but without events yet). A snapshot nobody's history backs is a
    ghost: the bucket is derived state and only says what the stream already says."""
    if last is not None and last.node == snap.node and last.seq >= snap.seq:
        return True
    return snap.pool in announced


class PoolWatch:
    """What the table shows, kept current by the KV watch and the event subscription."""

    def __init__(self) -> None:
        self.snapshots: dict[str, PoolSnapshot] = {}
        self.last_events: dict[str, Event] = {}
        self.beats: dict[str, Event] = {}
        self.node_events: dict[str, Event] = {}
        self.changed = asyncio.Event()
        self.verified: set[str] = set()
        """Pools whose snapshots the event stream backs (checked once per pool)."""
        self.ghosts: set[str] = set()

    def on_snapshot(self, pool: str, snapshot: PoolSnapshot | None) -> None:
        """KV watch callback: a pool's snapshot changed (None: deleted)."""
        if snapshot is None:
            self.snapshots.pop(pool, None)
        else:
            self.snapshots[pool] = snapshot
        self.changed.set()

    def on_event(self, event: Event) -> None:
        """A pool event arrived: it becomes the pool's last event unless an older one."""
        if event.pool is None:
            return
        known = self.last_events.get(event.pool)
        if known is None or event.seq >= known.seq or event.node != known.node:
            self.last_events[event.pool] = event
        self.changed.set()

    def on_node_event(self, event: Event) -> None:
        """A node event arrived: a heartbeat keeps its node live, any event is its last word."""
        if event.pool is not None:
            return
        if isinstance(event.body, NodeHeartbeat):
            self.beats[event.node] = event
        self.node_events[event.node] = event
        self.changed.set()

    async def on_msg(self, msg: Msg) -> None:
        """Core subscription callback on ``<prefix>.evt.>`` and ``<prefix>.node.*.evt.>``."""
        try:
            event = EVENT_DECODER.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        if event.pool is None:
            self.on_node_event(event)
        else:
            self.on_event(event)

    def node_status(self, now: float) -> dict[str, str]:
        """node → liveness from the heartbeats seen (``pool_managerd.cli.fleet.liveness``); a node
        counts as answering until its last word is ``daemon_stopping`` (watch sends no pings)."""
        status = {}
        for node in sorted(set(self.beats) | {s.node for s in self.snapshots.values() if s.node}):
            last = self.node_events.get(node)
            stopped = last is not None and isinstance(last.body, DaemonStopping)
            view = NodeView(node=node, answering=not stopped, beat=self.beats.get(node), last_node_event=last)
            status[node] = liveness(view, now)
        return status

    def unchecked(self) -> list[str]:
        return [p for p in self.snapshots if p not in self.verified and p not in self.ghosts]

    def render(self, now: float) -> str:
        """:func:`render_table` of the current state (ghost snapshots left out and named), with a
        line of node liveness."""
        status = self.node_status(now)
        shown = {p: s for p, s in self.snapshots.items() if p in self.verified}
        ignored = [p for p in self.ghosts if p in self.snapshots]
        text = render_table(shown, self.last_events, now, node_status=status, ignored=ignored)
        unchecked = self.unchecked()
        if unchecked:
            text += f"\nnot yet checked against the event stream (not shown): {', '.join(sorted(unchecked))}"
        if not status:
            return text
        cells = []
        for node, state in status.items():
            beat = self.beats.get(node)
            age = f"beat {format_age(now - beat.ts)} ago" if beat is not None and now else "no beat"
            cells.append(f"{node} {state if state == 'live' else state.upper()} ({age})" if now else f"{node} {state}")
        return text + "\nnodes: " + ", ".join(cells)


async def _open_store(nc: NATS, bucket: str) -> SnapshotStore | None:
    """The bucket, without creating it (a watcher must not create daemon state)."""
    try:
        return SnapshotStore(await nc.jetstream().key_value(bucket))
    except nats.js.errors.BucketNotFoundError:
        return None


async def _prime_last_events(nc: NATS, subjects: Subjects, watch: PoolWatch, timeout: float) -> set[str]:
    """Fill "last event" for pools that have had no live event yet, from the stream; returns the
    pools whose stream could not be read."""
    unread: set[str] = set()
    for pool in list(watch.snapshots):
        if pool in watch.last_events:
            continue
        try:
            found = await asyncio.wait_for(last_event(nc, subjects, pool), timeout)
        except (TimeoutError, nats.errors.Error, PoolManagerError, OSError):
            unread.add(pool)
            continue
        if found is not None and pool not in watch.last_events:
            watch.last_events[pool] = found[1]
    return unread


async def _announced(nc: NATS, subjects: Subjects, node: str, timeout: float) -> frozenset[str] | None:
    """The pools ``node``'s last ``daemon_started`` lists (None when the stream could not be read)."""
    try:
        raw = await asyncio.wait_for(
            nc.jetstream().get_last_msg(STREAM_NAME, subjects.node_event(node, "daemon_started")), timeout
        )
    except nats.js.errors.NotFoundError:
        return frozenset()
    except (TimeoutError, nats.errors.Error, PoolManagerError, OSError):
        return None
    try:
        body = EVENT_DECODER.decode(raw.data or b"").body
    except msgspec.DecodeError:
        return frozenset()
    return frozenset(body.pools) if isinstance(body, DaemonStarted) else frozenset()


async def _verify(nc: NATS, subjects: Subjects, watch: PoolWatch, timeout: float) -> None:
    """Check every snapshot not checked yet against the stream (:func:`backed`)."""
    pending = watch.unchecked()
    if not pending:
        return
    unread = await _prime_last_events(nc, subjects, watch, timeout)
    nodes: dict[str, frozenset[str] | None] = {}
    for pool in pending:
        snap = watch.snapshots.get(pool)
        if snap is None:
            continue
        if snap.node not in nodes:
            nodes[snap.node] = await _announced(nc, subjects, snap.node, timeout)
        announced = nodes[snap.node]
        if backed(snap, watch.last_events.get(pool), announced or frozenset()):
            watch.verified.add(pool)
        elif pool not in unread and announced is not None:
            watch.ghosts.add(pool)
        # else: the stream could not be read; the snapshot stays unchecked (not shown, named)
        # and is checked again, rather than called a ghost on a read that timed out.


async def _main(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.timeout <= 0:
        print("pool-managerd watch: error: --interval and --timeout must be > 0", file=sys.stderr)
        return EXIT_USAGE
    subjects = Subjects(args.prefix)
    watch = PoolWatch()
    store: SnapshotStore | None = None

    async def on_reconnected() -> None:
        # KV watchers do not survive a reconnect in nats-py: re-create it (it re-delivers every
        # current value first, so the table catches up with what happened meanwhile).
        if store is not None:
            await store.restart_watch()
        watch.changed.set()

    async def on_error(exc: Exception) -> None:
        # A refused subscription or read would leave the table silently empty: say so.
        if "permissions violation" in str(exc).lower():
            print(f"permission denied: {str(exc).removeprefix('nats: ')}", file=sys.stderr, flush=True)

    try:
        target = resolve_target(args, "viewer")
    except TargetError as exc:
        print(f"pool-managerd watch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        nc = await connect(target, args.timeout, reconnect_forever=not args.once, reconnected_cb=on_reconnected,
                           error_cb=on_error)  # fmt: skip
    except ConnectionError as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        if not args.once:
            # Subscribe before reading the bucket: nothing that happens meanwhile is missed.
            await nc.subscribe(subjects.all_pool_events, cb=watch.on_msg)
            await nc.subscribe(subjects.all_node_events, cb=watch.on_msg)
        try:
            store = await asyncio.wait_for(_open_store(nc, args.bucket), args.timeout)
            if store is not None:
                await store.watch(watch.on_snapshot)
                await asyncio.wait_for(store.wait_synced(), args.timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            print(f"unavailable: cannot read KV bucket {args.bucket}: {exc or 'timeout'}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if store is None:
            print(f"note: KV bucket {args.bucket} does not exist yet (no daemon has started)", file=sys.stderr)
        await _verify(nc, subjects, watch, args.timeout)
        with contextlib.suppress(TimeoutError, nats.errors.Error, PoolManagerError, OSError):
            beats, last = await read_heartbeats(nc, subjects, timeout=args.timeout)
            for node, event in beats.items():
                watch.beats.setdefault(node, event)
            for node, event in last.items():
                watch.node_events.setdefault(node, event)
        if args.once:
            print(watch.render(time.time()), flush=True)
            return EXIT_OK
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
        try:
            await _loop(watch, args.interval, sys.stdout.isatty(), lambda: _verify(nc, subjects, watch, args.timeout))
        except asyncio.CancelledError:
            if main.cancelling() > 1:
                raise
            return EXIT_OK
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)
        return EXIT_OK
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        with contextlib.suppress(Exception):
            await nc.close()


async def _loop(watch: PoolWatch, interval: float, tty: bool, verify: Callable[[], Awaitable[None]]) -> None:
    """Redraw on change (at most every :data:`MIN_REDRAW_S`); on a terminal also every ``interval``."""
    last_draw = 0.0
    last_shown = ""
    first = True
    while True:
        if not first:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.changed.wait(), interval if tty else None)
            pause = last_draw + MIN_REDRAW_S - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        first = False
        watch.changed.clear()
        await verify()
        if not tty:
            # A new table only when something visible changed (not for a heartbeat's KV put):
            # rendered at a fixed instant, ages and the clock drop out of the comparison.
            shown = watch.render(0.0)
            if shown == last_shown:
                continue
            last_shown = shown
        last_draw = time.monotonic()
        text = watch.render(time.time())
        if tty:
            width = shutil.get_terminal_size().columns
            text = "\n".join(line[:width] for line in text.splitlines())
            sys.stdout.write(_CLEAR + text + "\n")
        else:
            sys.stdout.write(text + "\n\n")
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pool-managerd watch``."""
    try:
        return asyncio.run(_main(args))
    except PoolManagerError as exc:
        print(f"pool-managerd watch: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        silence(sys.stdout)
        return EXIT_OK
