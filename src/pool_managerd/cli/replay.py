"""``pool-managerd replay`` and ``pool-managerd export``: the event log, offline or live.

``replay`` folds events (from stream ``POOLD_EVENTS`` or an exported JSONL file) through the
lifecycle table with no side effects, prints a timeline and the resulting state per pool, and
exits non-zero naming the first broken invariant. ``--check-live`` compares the rebuilt states
with the ``poold_pools`` KV snapshots. ``export`` writes the stream as JSONL, one event a line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from pool_managerd.cli.connect import add_auth_arguments
from pool_managerd.contract.errors import MalformedMessage, PoolManagerError
from pool_managerd.contract.messages import Event, ForeignMessage, StateChanged, encode
from pool_managerd.contract.subjects import DEFAULT_PREFIX, Subjects, validate_id
from pool_managerd.core.fold import Fold
from pool_managerd.core.log_integrity import StreamJudge
from pool_managerd.core.state import PoolValue
from pool_managerd.core.upcast import decode_event

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE, EXIT_FOREIGN = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events to read: a pool, a position range, a time bound."""

    pool: str | None = None
    from_seq: int | None = None
    until_seq: int | None = None
    until_time: float | None = None


def parse_time(text: str) -> float:
    """Unix seconds or ISO 8601 (``2026-11-27T14:02:00Z``) → Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (Unix seconds or ISO 8601)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def read_file(path: Path, sel: Selection) -> Iterator[tuple[int, Event]]:
    """Events of an exported JSONL file as (line number, event); bad lines raise with their number."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if sel.from_seq is not None and lineno < sel.from_seq:
                continue
            if sel.until_seq is not None and lineno > sel.until_seq:
                break
            try:
                event = decode_event(line)
            except MalformedMessage as exc:
                raise MalformedMessage(f"{path}:{lineno}: {exc.message}") from None
            if sel.until_time is not None and event.ts > sel.until_time:
                break
            if sel.pool is None or event.pool == sel.pool:
                yield lineno, event


async def _connect(args: argparse.Namespace) -> Any:
    from pool_managerd.cli.connect import connect, resolve_target

    return await connect(resolve_target(args, "viewer"), 5.0)


async def read_stream(
    args: argparse.Namespace, sel: Selection, judge: StreamJudge | None = None
) -> AsyncIterator[tuple[int, Event | ForeignMessage]]:
    """Messages of stream ``POOLD_EVENTS`` as (stream sequence, event or foreign message), as
    ``args`` says to connect. A message that is not a legitimate event is named, not fatal."""
    from pool_managerd.adapters.event_log import read_entries

    subjects = Subjects(args.prefix)
    judge = judge or StreamJudge(subjects.prefix)
    nc = await _connect(args)
    try:
        filter_subject = None if sel.pool is None else subjects.pool_events(sel.pool)
        async for entry in read_entries(nc, filter_subject, sel.from_seq, sel.until_seq):
            found = judge.take(entry)
            if isinstance(found, Event) and sel.until_time is not None and found.ts > sel.until_time:
                break
            yield entry.stream_seq, found
    finally:
        await nc.close()


def foreign_line(found: ForeignMessage, acknowledged: bool) -> str:
    """One human line naming a foreign message."""
    mark = "acknowledged" if acknowledged else "NOT acknowledged"
    return (f"{found.stream_seq:>8} !! foreign message on {found.subject} ({found.size} B, {mark}): "
            f"{found.reason}; preview {found.preview!r}")  # fmt: skip


def timeline_line(position: int, event: Event) -> str:
    """One human line of the timeline."""
    when = dt.datetime.fromtimestamp(event.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    who = event.pool or f"node:{event.node}"
    body = event.body
    if isinstance(body, StateChanged):
        what = f"{body.trigger:<15} {body.src} -> {body.dst}"
        why = body.reason
    else:
        what = event.type
        fields = {k: v for k, v in msgspec.structs.asdict(body).items() if v not in (None, [], {}, "")}
        why = " ".join(f"{k}={v}" for k, v in fields.items())[:160]
    cmd = f" [cmd {event.command_id}]" if event.command_id else ""
    return f"{position:>8} {when} {who:<16} #{event.seq:<5} {what}  {why}{cmd}"


def view_json(view: PoolValue, writer: str | None) -> dict[str, Any]:
    return {
        "pool": view.pool,
        "state": view.state,
        "seq": view.seq,
        "writer": writer,
        "engine_pid": view.engine.pid if view.engine else None,
        "mask": list(view.placement.mask) if view.placement else [],
        "restarts": view.restarts,
        "crashes": view.crashes,
        "leases": sorted(view.leases),
        "last_error": view.last_error,
        "last_event": view.last_event,
        "last_ts": view.last_ts,
    }


async def _collect(
    args: argparse.Namespace,
    sel: Selection,
    out: TextIO,
    foreign_open: list[ForeignMessage],
    foreign_acked: list[ForeignMessage],
) -> tuple[Fold, int]:
    fold = Fold(expect_start=sel.from_seq is None and sel.pool is None and args.file is None)
    quiet = args.json or args.quiet
    count = 0

    def take(position: int, event: Event) -> None:
        nonlocal count
        count += 1
        violation = fold.apply(event)
        if not quiet:
            out.write(timeline_line(position, event) + "\n")
            if violation is not None:
                out.write(f"         !! {violation.code}: {violation.message}\n")

    if args.file is not None:
        for position, event in read_file(args.file, sel):
            take(position, event)
    else:
        judge = StreamJudge(Subjects(args.prefix).prefix)
        async for position, found in read_stream(args, sel, judge):
            if isinstance(found, Event):
                take(position, found)
        # Named after the timeline: only then is it known which ones a later event acknowledged.
        for found in judge.foreign:
            acknowledged = found.stream_seq in judge.acknowledged
            (foreign_acked if acknowledged else foreign_open).append(found)
            if not quiet:
                out.write(foreign_line(found, acknowledged) + "\n")
    return fold, count


async def _live_differences(args: argparse.Namespace, fold: Fold) -> list[str]:
    from pool_managerd.adapters.event_log import SnapshotStore

    diffs: list[str] = []
    nc = await _connect(args)
    try:
        store = await SnapshotStore.open(nc)
        for pool, view in sorted(fold.views.items()):
            snap = await store.get(pool)
            if snap is None:
                # A pool removed from every configuration is stopped and its snapshot deleted.
                if view.state != "unready":
                    diffs.append(f"{pool}: no KV snapshot (log says {view.state} at seq {view.seq})")
                continue
            pairs: list[tuple[str, object, object]] = [
                ("state", view.state, snap.state),
                ("seq", view.seq, snap.seq),
                ("engine_pid", view.engine.pid if view.engine else None, snap.engine.pid if snap.engine else None),
                ("mask", list(view.placement.mask) if view.placement else [], list(snap.device_mask)),
                ("restarts", view.restarts, snap.restarts),
            ]
            diffs += [f"{pool}: {name} rebuilt {a!r} but live {b!r}" for name, a, b in pairs if a != b]
    finally:
        await nc.close()
    return diffs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="NATS server URL (default: $POOL_MANAGERD_URL, the credentials' url, "
                        "or nats://127.0.0.1:4222)")  # fmt: skip
    source.add_argument("--file", type=Path, help="an exported JSONL log instead of the stream")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    add_auth_arguments(parser)
    parser.add_argument("--pool", help="one pool only")
    parser.add_argument("--from-seq", type=int, help="first stream sequence (line number with --file)")
    parser.add_argument("--until-seq", type=int, help="last stream sequence (line number with --file)")
    parser.add_argument("--until-time", type=parse_time, help="stop at this instant (Unix seconds or ISO 8601)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no timeline, only the states")
    parser.add_argument("--check-live", action="store_true", help="compare with the poold_pools KV snapshots")


def run(args: argparse.Namespace) -> int:
    try:
        if args.pool is not None:
            validate_id(args.pool, "pool")
        if args.check_live and args.file is not None:
            raise PoolManagerError("--check-live compares with the live KV bucket; it needs --url, not --file")
        sel = Selection(args.pool, args.from_seq, args.until_seq, args.until_time)
        foreign_open: list[ForeignMessage] = []
        foreign_acked: list[ForeignMessage] = []
        fold, count = asyncio.run(_collect(args, sel, sys.stdout, foreign_open, foreign_acked))
        diffs = asyncio.run(_live_differences(args, fold)) if args.check_live else []
    except (PoolManagerError, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"replay: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a NATS connection failure, most often
        print(f"replay: cannot read the event log: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        result = {
            "events": count,
            "pools": {pool: view_json(view, fold.writer(pool)) for pool, view in sorted(fold.views.items())},
            "violations": [
                {"code": v.code, "pool": v.pool, "seq": v.seq, "message": v.message} for v in fold.violations
            ],
            "live_differences": diffs,
            "foreign": [
                {**msgspec.structs.asdict(f), "acknowledged": f in foreign_acked}
                for f in sorted(foreign_open + foreign_acked, key=lambda f: f.stream_seq)
            ],
        }
        print(json.dumps(result, indent=2))
    else:
        print(f"\n{count} events, {len(fold.views)} pools")
        for pool, view in sorted(fold.views.items()):
            engine = f" engine pid {view.engine.pid}" if view.engine else ""
            print(f"  {pool:<20} {view.state:<11} seq {view.seq:<6} restarts {view.restarts}{engine}")
        for diff in diffs:
            print(f"live difference: {diff}")
        if args.check_live and not diffs:
            print("live check: the KV snapshots match the rebuilt states")
    if fold.violations:
        first = fold.violations[0]
        print(f"violation: {first.code}: {first.message}", file=sys.stderr)
        return EXIT_VIOLATION
    if diffs:
        return EXIT_VIOLATION
    if foreign_open:
        seqs = ", ".join(str(f.stream_seq) for f in foreign_open)
        print(f"foreign: {len(foreign_open)} unacknowledged foreign message(s) at stream sequence(s) {seqs}; "
              "their pools are quarantined until an operator runs ctl ack-corrupt", file=sys.stderr)  # fmt: skip
        return EXIT_FOREIGN
    return EXIT_OK


# --- export ----------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write ('-' for stdout)")
    parser.add_argument("--url", help="NATS server URL (default: $POOL_MANAGERD_URL, the credentials' url, "
                        "or nats://127.0.0.1:4222)")  # fmt: skip
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    add_auth_arguments(parser)
    parser.add_argument("--pool")
    parser.add_argument("--from-seq", type=int)
    parser.add_argument("--until-seq", type=int)
    parser.add_argument("--until-time", type=parse_time)


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    sel = Selection(args.pool, args.from_seq, args.until_seq, args.until_time)
    n = 0
    async for _position, found in read_stream(args, sel):
        if isinstance(found, ForeignMessage):
            # Not an event: an export holds events only, and says what it left out.
            print(f"export: skipped {foreign_line(found, False).strip()}", file=sys.stderr)
            continue
        out.write(encode(found).decode() + "\n")
        n += 1
    return n


def run_export(args: argparse.Namespace) -> int:
    try:
        if args.pool is not None:
            validate_id(args.pool, "pool")
        if str(args.out) == "-":
            n = asyncio.run(_export(args, sys.stdout))
        else:
            tmp = args.out.with_name(args.out.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as fh:
                n = asyncio.run(_export(args, fh))
            tmp.replace(args.out)
    except (PoolManagerError, OSError) as exc:
        print(f"export: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        print(f"export: cannot read the event log: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {n} events to {args.out}", file=sys.stderr)
    return EXIT_OK
