"""``pool-managerd ctl``: send one command to a pool or a node and print the reply.

Examples::

    pool-managerd ctl preload chat --mask 0,1 --wait          # follow events until ready
    pool-managerd ctl status chat
    pool-managerd ctl lease chat --ttl-s 30 --holder me
    pool-managerd ctl release chat --lease-id 3f2a...
    pool-managerd ctl drain chat --deadline-s 10 --wait       # until unready
    pool-managerd ctl reload chat --model b.gguf --set ctx_size=8192   # overrides the pool declares
    pool-managerd ctl pools [--node n1]                       # every node when no --node
    pool-managerd ctl inventory --node n1 --json

Exit status: 0 accepted / ok (and, with ``--wait``, the target state reached); 1 rejected (or the
pool came to rest in another state); 2 usage error; 3 timeout, NATS unreachable or unavailable.

One job, a long module: one ``ctl`` verb each, with its arguments and its printed reply; the
shared formatting lives in :mod:`pool_managerd.cli.format`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO, cast, get_args

import msgspec

from pool_managerd.cli.connect import (
    TargetError,
    add_connection_arguments,
    connect,
    resolve_target,
)
from pool_managerd.cli.format import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    format_age,
    format_clock,
    format_event,
    render_table,
    short_uuid,
    silence,
    table,
)
from pool_managerd.client import CommandReply, NodeReply, PermissionDenials, PoolClient, WaitResult
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import (
    NODE_COMMANDS,
    POOL_COMMANDS,
    Accepted,
    Event,
    GpuClearCmd,
    GpuClearReply,
    InventoryReply,
    LifecycleReply,
    PoolSnapshot,
    PoolsReply,
    PoolState,
    Rejected,
    StatusReply,
    encode,
)
from pool_managerd.contract.subjects import Subjects
from pool_managerd.placement import format_bytes

POOL_VERBS: tuple[str, ...] = tuple(POOL_COMMANDS)
NODE_VERBS: tuple[str, ...] = tuple(v for v in NODE_COMMANDS if v != "gpu_clear")
GPU_CLEAR = "gpu-clear"
"""``ctl gpu-clear <uuid> --node N``: the node command ``gpu_clear`` (operator)."""
FLEET_VERBS: tuple[str, ...] = ("nodes",)
"""Answered from discovery, the KV bucket and the stream (``pool_managerd.cli.fleet``), not by a daemon."""
STATES: tuple[str, ...] = get_args(PoolState)

DEFAULT_WAIT: dict[str, PoolState] = {
    "preload": "ready",
    "reload": "ready",
    "drain": "unready",
    "stop": "unready",
    "reset": "unready",
}
"""The state ``--wait`` (without a value) follows each verb to."""

# option dest → (command field, verbs that take it)
_FIELD_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mask": ("device_mask", ("preload", "reload")),
    "model": ("model", ("preload", "reload")),
    "policy": ("policy", ("preload", "reload")),
    "deadline_s": ("deadline_s", ("drain", "reload")),
    "grace_s": ("grace_s", ("stop",)),
    "ttl_s": ("ttl_s", ("lease",)),
    "lease_id": ("lease_id", ("lease", "release")),
    "holder": ("holder", ("lease",)),
    "set": ("overrides", ("reload",)),
}

_WAIT_DEFAULT = "\0default"


class UsageError(Exception):
    """A command line that cannot be sent; exit status 2."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``ctl`` options."""
    parser.description = "send one command to a pool or a node and print the reply (or follow its events with --wait)"
    parser.epilog = (
        f"pool verbs: {', '.join(POOL_VERBS)}. node verbs: {', '.join(NODE_VERBS)}, {GPU_CLEAR} UUID --node N. "
        f"fleet verbs: {', '.join(FLEET_VERBS)} (every node: id, liveness, version, heartbeat age, GPUs, pools). "
        "Exit status: 0 ok, 1 rejected, 2 usage error, 3 timeout or unreachable."
    )
    verbs = (*POOL_VERBS, "ack-corrupt", *NODE_VERBS, GPU_CLEAR, *FLEET_VERBS)
    parser.add_argument("verb", choices=verbs, metavar="VERB", help="what to do")
    parser.add_argument("target", nargs="?", metavar="POOL", help="the pool (for node verbs: the node, or --node)")
    parser.add_argument("sequences", nargs="*", type=int, metavar="SEQ",
                        help="ack-corrupt: the foreign stream sequences the pool's status lists")  # fmt: skip
    add_connection_arguments(parser)
    parser.add_argument("--node", help="node id for pools/inventory/lifecycle (default: every daemon that answers)")
    parser.add_argument("--command-id", help="client command id (default: a fresh uuid4); retries reuse it")
    parser.add_argument("--traceparent", help="W3C traceparent header to send with the command")
    parser.add_argument("--json", action="store_true", help="print the raw reply JSON (and events as JSON lines)")
    g = parser.add_argument_group("command fields")
    g.add_argument("--mask", help="device mask (preload, reload): 0,1 | GPU-<uuid>,... | all | auto")
    g.add_argument("--model", help="model override (preload, reload)")
    g.add_argument("--policy", help="split policy (preload, reload)")
    g.add_argument("--deadline-s", type=float, metavar="S", help="drain deadline (drain, reload)")
    g.add_argument("--grace-s", type=float, metavar="S", help="SIGTERM→SIGKILL grace (stop)")
    g.add_argument("--ttl-s", type=float, metavar="S", help="lease time to live (lease)")
    g.add_argument("--lease-id", help="lease id the grant returned (lease: renew it; release: required)")
    g.add_argument("--holder", help="who holds the lease (lease)")
    g.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="value of an override the pool declares (reload; repeatable): --set ctx_size=8192")  # fmt: skip
    w = parser.add_argument_group("waiting")
    w.add_argument(
        "--wait",
        nargs="?",
        const=_WAIT_DEFAULT,
        metavar="STATE",
        help="follow the pool's events until STATE (default per verb: preload/reload → ready, "
        "drain/stop/reset → unready); put it after POOL",
    )
    w.add_argument("--wait-timeout", type=float, default=60.0, metavar="S", help="how long --wait waits (default 60)")


def command_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The command's fields from the options; raises :class:`UsageError` on a misplaced one."""
    verb = args.verb
    fields: dict[str, Any] = {}
    for dest, (name, verbs) in _FIELD_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if verb not in verbs:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} does not apply to {verb} (only to {', '.join(verbs)})")
        if dest == "set":
            value = _parse_overrides(value)
        fields[name] = value
    if verb == "release" and "lease_id" not in fields:
        raise UsageError("release needs --lease-id")
    sequences = getattr(args, "sequences", None) or []
    if verb == "ack_corrupt":
        if not sequences:
            raise UsageError("ack-corrupt needs the stream sequences its status lists: ack-corrupt POOL SEQ [SEQ...]")
        fields["sequences"] = sequences
    elif sequences:
        raise UsageError(f"{verb} takes no sequences (only ack-corrupt does)")
    return fields


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; a value that reads as JSON (``8192``, ``true``) is sent typed, any
    other as text. The daemon checks each against the pool's declaration."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--set takes NAME=VALUE, not {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if not isinstance(value, int | float | bool | str):
            raise UsageError(f"--set {name}: the value must be a number, true/false or text")
        values[name] = value
    return values


def default_role(verb: str) -> str:
    """The least role that may send ``verb``: what ``--creds-dir`` uses without ``--role``."""
    if verb == "reload":
        return "admin"
    return "viewer" if verb == "status" or verb in NODE_VERBS or verb in FLEET_VERBS else "operator"


def wait_target(args: argparse.Namespace) -> PoolState | None:
    """The state ``--wait`` asks for, or None without ``--wait``."""
    if args.wait is None:
        return None
    if args.verb in NODE_VERBS or args.verb == GPU_CLEAR or args.verb in FLEET_VERBS:
        raise UsageError(f"--wait does not apply to {args.verb}")
    if args.wait == _WAIT_DEFAULT:
        if args.verb not in DEFAULT_WAIT:
            raise UsageError(f"{args.verb} has no default state to wait for; give one: --wait STATE")
        return DEFAULT_WAIT[args.verb]
    if args.wait not in STATES:
        raise UsageError(f"--wait {args.wait!r}: not a state (one of: {', '.join(STATES)})")
    return cast(PoolState, args.wait)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_status(snap: PoolSnapshot, now: float) -> str:
    """A pool snapshot as a small key/value table."""
    health = ", ".join(n for n, on in (("live", snap.health_live), ("ready", snap.health_ready)) if on) or "-"
    rows: list[tuple[str, str]] = [
        ("pool", snap.pool),
        ("node", snap.node or "-"),
        ("state", snap.state + (" (draining)" if snap.draining and snap.state != "draining" else "")),
        ("seq", str(snap.seq)),
        ("health", health),
        ("model", snap.model or "-"),
    ]
    p = snap.placement
    if p is not None:
        gpus = ", ".join(short_uuid(u) for u in p.uuids) + (" (simulated)" if p.simulated or snap.simulated else "")
        rows.append(("gpus", gpus))
        rows.append(("CUDA_VISIBLE_DEVICES", p.cuda_visible_devices))
        budgets = ", ".join(format_bytes(b) for b in p.budgets) or "-"
        split = f", tensor split {p.tensor_split}" if p.tensor_split else ""
        rows.append(("placement", f"policy {p.policy}, budgets {budgets}{split}"))
    elif snap.device_mask:
        rows.append(("gpus", ", ".join(short_uuid(u) for u in snap.device_mask)))
    e = snap.engine
    if e is not None:
        rows.append(("engine", f"pid {e.pid} port {e.port}, up {format_age(now - e.started_at)}"))
        if e.log_path:
            rows.append(("engine log", e.log_path))
    rows.append(("slots", f"{snap.slots_free} free of {snap.slots_total}"))
    rows.append(("leases", str(snap.active_leases)))
    for lease in snap.leases:
        holder = f" by {lease.holder}" if lease.holder else ""
        rows.append(("", f"{lease.lease_id}{holder}, expires in {format_age(lease.expires_at - now)}"))
    rows.append(("restarts", f"{snap.restarts} (crashes {snap.crashes})"))
    corrupt = snap.log_corrupt
    if corrupt is not None:
        rows.append(("log_corrupt", corrupt.reason))
        for m in corrupt.messages:
            rows.append(("", f"stream seq {m.stream_seq} {m.subject} ({m.size} B): {m.reason}; {m.preview}"))
        rows.append(("", f"after a look: pool-managerd ctl ack-corrupt {snap.pool} "
                         + " ".join(str(q) for q in corrupt.sequences)))  # fmt: skip
    if snap.last_error:
        rows.append(("last error", snap.last_error))
    if snap.last_event:
        rows.append(("last event", snap.last_event))
    if snap.updated_at:
        rows.append(("updated", f"{format_clock(snap.updated_at)} ({format_age(now - snap.updated_at)} ago)"))
    return "\n".join(table([[k, v] for k, v in rows]))


def format_rejected(r: Rejected) -> str:
    """``code: message`` then the problems, the state and the allowed triggers."""
    lines = [f"{r.code}: {r.message}"]
    for prob in r.problems:
        lines.append(f"  - {prob.code}: {prob.message}" + (f" [{prob.device}]" if prob.device else ""))
    if r.state is not None and r.code == "illegal_transition":
        lines.append(f"  state: {r.state}; allowed: {', '.join(r.allowed) or 'none'}")
    return "\n".join(lines)


def format_accepted(r: Accepted, now: float) -> str:
    """``accepted: preload chat → preloading (seq 1, command 3f2a...)`` and the lease, if any."""
    line = f"accepted: {r.verb} {r.pool} → {r.state} (seq {r.seq}, command {r.command_id})"
    if r.lease_id is not None:
        line += f"\nlease_id: {r.lease_id}"
        if r.expires_at is not None:
            line += f"\nexpires:  {format_clock(r.expires_at)} (in {format_age(r.expires_at - now)})"
    return line


def format_inventory(reply: InventoryReply) -> str:
    """The node's GPUs as a table."""
    snap = reply.gpus
    head = f"node {reply.node}: {len(snap.gpus)} GPU(s) from {snap.source}" + (" (SIMULATED)" if snap.simulated else "")
    rows = [["#", "uuid", "name", "cc", "free", "total", "mig"]]
    for g in snap.gpus:
        mig = f"{len(g.mig_instances)} instance(s)" if g.mig_mode else "-"
        cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}"
        rows.append([str(g.index), g.uuid, g.name, cc, format_bytes(g.memory_free), format_bytes(g.memory_total), mig])
    return "\n".join([head, *table(rows, right=frozenset({0, 4, 5}))])


def format_lifecycle(reply: LifecycleReply) -> str:
    """The lifecycle table the daemon runs."""
    rows = [["trigger", "from", "to", "kind", "note"]]
    rows += [[t.trigger, t.source, t.dest, t.kind, t.note] for t in reply.transitions]
    return "\n".join([f"states: {', '.join(reply.states)} (initial {reply.initial})", *table(rows)])


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _exit_for(reply: object) -> int:
    if isinstance(reply, Rejected):
        return EXIT_UNAVAILABLE if reply.code == "unavailable" else EXIT_REJECTED
    return EXIT_OK


def _print(text: str, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        silence(stream)


def _print_reply(reply: CommandReply | NodeReply, as_json: bool) -> None:
    now = time.time()
    if as_json:
        _print(encode(reply).decode())
        return
    match reply:
        case Rejected():
            _print(format_rejected(reply), sys.stderr)
        case Accepted():
            _print(format_accepted(reply, now))
        case StatusReply():
            _print(format_status(reply.pool, now))
        case PoolsReply():
            _print(render_table({s.pool: s for s in reply.pools}, {}, now, title=f"node {reply.node}"))
        case InventoryReply():
            _print(format_inventory(reply))
        case LifecycleReply():
            _print(format_lifecycle(reply))


def _wait_outcome(result: WaitResult, verb: str, as_json: bool, took: float) -> int:
    target = result.target
    pool = result.reply.pool.pool if isinstance(result.reply, StatusReply) else result.reply.pool
    last = result.last_transition
    rolled_back = any(e.type == "reload_rolled_back" for e in result.events)
    aborted = last is not None and last.trigger == "drain_deadline" and verb == "reload"
    if result.reached and not (rolled_back or aborted):
        if not as_json:
            _print(f"{pool} is {target} ({took:.1f} s)")
        return EXIT_OK
    if result.timed_out:
        _print(f"timed out after {took:.1f} s waiting for {pool} to be {target}; last state {result.state}", sys.stderr)
        return EXIT_UNAVAILABLE
    why = f": {last.reason}" if last is not None and last.reason else ""
    if rolled_back or aborted:
        _print(f"reload of {pool} did not take effect; {pool} is {result.state} with its old spec{why}", sys.stderr)
    else:
        _print(f"{pool} came to rest in {result.state}, not {target}{why}", sys.stderr)
    return EXIT_REJECTED


async def _pool_command(client: PoolClient, args: argparse.Namespace, fields: dict[str, Any]) -> int:
    target = wait_target(args)
    opts: dict[str, Any] = {"command_id": args.command_id, "traceparent": args.traceparent}
    if target is None:
        reply = await client.command(args.target, args.verb, **opts, **fields)
        _print_reply(reply, args.json)
        return _exit_for(reply)

    def on_reply(reply: CommandReply) -> None:
        _print_reply(reply, args.json)

    def on_event(event: Event) -> None:
        _print(encode(event).decode() if args.json else format_event(event))

    started = time.monotonic()
    result = await client.command_and_wait(
        args.target, args.verb, target, wait_timeout=args.wait_timeout, on_reply=on_reply, on_event=on_event,
        **opts, **fields,
    )  # fmt: skip
    if not isinstance(result.reply, Accepted):
        return _exit_for(result.reply)
    return _wait_outcome(result, args.verb, args.json, time.monotonic() - started)


async def _gpu_clear(client: PoolClient, args: argparse.Namespace) -> int:
    reply = await client.gpu_clear(args.node, args.target)
    if isinstance(reply, GpuClearReply) and not args.json:
        what = "cleared: placement may use it again" if reply.cleared else "was not marked unhealthy; nothing to clear"
        _print(f"{reply.uuid} on node {reply.node} {what}")
    else:
        _print_reply(reply, args.json)
    return _exit_for(reply)


async def _node_command(client: PoolClient, args: argparse.Namespace) -> int:
    if args.node is not None and args.target is not None and args.node != args.target:
        raise UsageError(f"node given twice: {args.target!r} and --node {args.node!r}")
    node = args.node or args.target
    if node is not None:
        reply = await client.node(node, args.verb)
        _print_reply(reply, args.json)
        return _exit_for(reply)
    if args.verb == "pools" and not args.json:
        return await _fleet_pools(client)
    found = await client.discover(timeout=min(args.timeout, 2.0))
    if not found:
        _print("unavailable: no pool-managerd daemon answered $SRV.PING.pool-managerd; give --node", sys.stderr)
        return EXIT_UNAVAILABLE
    replies = [await client.node(info.node, args.verb) for info in found if info.node]
    good = [r for r in replies if not isinstance(r, Rejected)] or replies
    if args.verb == "lifecycle":
        good = good[:1]
    for i, reply in enumerate(good):
        if i and not args.json:
            _print("")
        _print_reply(reply, args.json)
    return max(_exit_for(r) for r in good)


async def _fleet_pools(client: PoolClient) -> int:
    """``ctl pools`` without a node: every pool of every node, from the bucket, with node liveness."""
    from pool_managerd.cli.fleet import gather_nodes, liveness

    views, snapshots = await gather_nodes(client.nc, client.subjects, timeout=client.timeout)
    if not views and not snapshots:
        _print("unavailable: no pool-managerd daemon answered and the bucket holds no pool", sys.stderr)
        return EXIT_UNAVAILABLE
    now = time.time()
    status = {v.node: liveness(v, now) for v in views}
    nodes = ", ".join(f"{node} ({state})" for node, state in status.items())
    _print(render_table(snapshots, {}, now, title=f"nodes {nodes}", node_status=status))
    return EXIT_OK


async def _fleet_nodes(client: PoolClient, as_json: bool) -> int:
    """``ctl nodes``: every node, from discovery, the bucket and the stream's heartbeats."""
    from pool_managerd.cli.fleet import gather_nodes, node_record, render_nodes

    views, _ = await gather_nodes(client.nc, client.subjects, timeout=client.timeout)
    now = time.time()
    if as_json:
        _print(json.dumps({"nodes": [node_record(view, now) for view in views]}))
    else:
        _print(render_nodes(views, now))
    return EXIT_OK if views else EXIT_UNAVAILABLE


async def _main(args: argparse.Namespace) -> int:
    # Everything that can be checked offline is checked before connecting.
    if args.verb in POOL_VERBS:
        if args.target is None:
            raise UsageError(f"{args.verb} needs a POOL")
        if args.node is not None:
            raise UsageError(f"--node does not apply to {args.verb}")
    if args.verb in FLEET_VERBS and (args.node is not None or args.target is not None):
        raise UsageError(f"{args.verb} lists every node; it takes no POOL or --node")
    if args.verb == GPU_CLEAR and (args.target is None or args.node is None):
        raise UsageError(f"{GPU_CLEAR} needs a GPU UUID and --node")
    if args.verb == GPU_CLEAR:
        try:
            msgspec.convert({"uuid": args.target}, GpuClearCmd)
        except msgspec.ValidationError as exc:
            raise UsageError(f"{GPU_CLEAR}: {args.target!r} is not a GPU UUID (GPU-... or MIG-...): {exc}") from None
    fields = command_fields(args)
    wait_target(args)
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    Subjects(args.prefix)  # raises on an invalid prefix
    try:
        target = resolve_target(args, default_role(args.verb))
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    denials = PermissionDenials()
    try:
        nc = await connect(target, args.timeout, error_cb=denials)
    except ConnectionError as exc:
        _print(f"unavailable: {exc}", sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        client = PoolClient(nc, prefix=args.prefix, timeout=args.timeout, denials=denials)
        if args.verb in POOL_VERBS:
            return await _pool_command(client, args, fields)
        if args.verb == "nodes":
            return await _fleet_nodes(client, args.json)
        if args.verb == GPU_CLEAR:
            return await _gpu_clear(client, args)
        return await _node_command(client, args)
    finally:
        await nc.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pool-managerd ctl``."""
    if args.verb == "ack-corrupt":
        args.verb = "ack_corrupt"
    try:
        return asyncio.run(_main(args))
    except UsageError as exc:
        _print(f"pool-managerd ctl: error: {exc}", sys.stderr)
        return EXIT_USAGE
    except PoolManagerError as exc:  # e.g. an invalid --prefix
        _print(f"pool-managerd ctl: error: {exc.message}", sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pool_managerd.cli.ctl``: the same as ``pool-managerd ctl``."""
    parser = argparse.ArgumentParser(prog="pool-managerd ctl")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
