"""``pool-managerd schemas``: generate ``schemas/`` from the code.

Outputs (all deterministic, so CI can diff them):

* ``messages/<name>.json``: JSON Schema 2020-12 of every top-level wire message;
* ``lifecycle.json``: the lifecycle table (states, rows, triggers allowed per state);
* ``lifecycle.mmd``: the table as a Mermaid state diagram;
* ``asyncapi.json``: an AsyncAPI 3.0 document of every subject the daemon serves or publishes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from pool_managerd import messages
from pool_managerd.core import machine
from pool_managerd.subjects import DEFAULT_PREFIX, KV_BUCKET, SERVICE_NAME, STREAM_NAME

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def clean_text(text: str) -> str:
    """One dedent for every docstring-derived text, so the bytes written never depend on the library.

    msgspec 0.22 copies ``__doc__`` as written, 0.23 runs it through ``inspect.cleandoc``, and Python
    3.13 strips the indentation at compile time: three different texts for one docstring. This trims
    every line's trailing blanks and the blank lines at both ends, then takes the first line without
    its leading blanks and removes the common indentation of the others. Blank lines go first because
    cleandoc drops them too; that makes the result a fixed point (``clean_text(clean_text(t)) ==
    clean_text(t)``), so text one of them already dedented comes out the same as the raw docstring.
    """
    lines = [line.rstrip() for line in text.expandtabs(8).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        return ""
    margin = min((len(line) - len(line.lstrip(" ")) for line in lines[1:] if line), default=0)
    return "\n".join([lines[0].lstrip(" "), *(line[margin:] for line in lines[1:])])


def normalise(node: Any) -> Any:
    """A copy of a generated schema (or AsyncAPI) tree with every ``description`` run through :func:`clean_text`."""
    if isinstance(node, dict):
        return {
            k: clean_text(v) if k == "description" and isinstance(v, str) else normalise(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [normalise(v) for v in node]
    return node


def message_schema(name: str, cls: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON Schema 2020-12 document of one wire message."""
    schema = msgspec.json.schema(cls)
    doc: dict[str, Any] = normalise(schema)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"pool-managerd/{name}.json", "title": name, **doc}


def _channel(address: str, summary: str, messages_: dict[str, str], params: list[str]) -> dict[str, Any]:
    return {
        "address": address,
        "summary": summary,
        "parameters": {p: {"description": f"{p} id, ^[a-z0-9][a-z0-9_-]{{0,62}}$"} for p in params},
        "messages": {key: {"$ref": f"#/components/messages/{ref}"} for key, ref in messages_.items()},
    }


def asyncapi(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the whole NATS contract."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components: dict[str, Any] = {}

    def component(name: str, cls: type[msgspec.Struct]) -> str:
        components[name] = {"name": name, "contentType": "application/json", "payload": msgspec.json.schema(cls)}
        return name

    component("accepted", messages.Accepted)
    component("rejected", messages.Rejected)
    for verb, cls in messages.POOL_COMMANDS.items():
        cname = f"cmd_{verb}"
        component(cname, cls)
        reply = "status_reply" if verb == "status" else None
        if reply:
            component(reply, messages.StatusReply)
        channels[cname] = _channel(
            f"{prefix}.cmd.{{pool}}.{verb}", f"{verb} command for one pool (request/reply)", {verb: cname}, ["pool"]
        )
        replies = (
            {"accepted": "accepted", "rejected": "rejected"} if not reply else {"status": reply, "rejected": "rejected"}
        )
        channels[f"{cname}_reply"] = {
            "address": None,
            "summary": f"reply to {verb} (the request's inbox)",
            "messages": {k: {"$ref": f"#/components/messages/{v}"} for k, v in replies.items()},
        }
        operations[f"handle_{verb}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{cname}"},
            "reply": {"channel": {"$ref": f"#/channels/{cname}_reply"}},
        }
    node_replies: dict[str, type[msgspec.Struct]] = {
        "pools": messages.PoolsReply,
        "inventory": messages.InventoryReply,
        "lifecycle": messages.LifecycleReply,
    }
    for verb, node_cls in messages.NODE_COMMANDS.items():
        cname = f"node_cmd_{verb}"
        component(cname, node_cls)
        reply_cls = node_replies[verb]
        component(f"{verb}_reply", reply_cls)
        channels[cname] = _channel(
            f"{prefix}.node.{{node}}.cmd.{verb}", f"node {verb} command (request/reply)", {verb: cname}, ["node"]
        )
        channels[f"{cname}_reply"] = {
            "address": None,
            "summary": f"reply to node {verb}",
            "messages": {verb: {"$ref": f"#/components/messages/{verb}_reply"}},
        }
        operations[f"handle_node_{verb}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{cname}"},
            "reply": {"channel": {"$ref": f"#/channels/{cname}_reply"}},
        }
    component("event", messages.Event)
    channels["pool_events"] = _channel(
        f"{prefix}.evt.{{pool}}.{{event}}",
        f"pool events, stored in JetStream stream {STREAM_NAME}; headers Nats-Msg-Id <pool>:<seq>, "
        "Nats-Expected-Last-Subject-Sequence(-Subject), traceparent",
        {"event": "event"},
        ["pool", "event"],
    )
    channels["node_events"] = _channel(
        f"{prefix}.node.{{node}}.evt.{{event}}", f"node events, stored in {STREAM_NAME}", {"event": "event"},
        ["node", "event"],
    )  # fmt: skip
    operations["publish_pool_events"] = {"action": "send", "channel": {"$ref": "#/channels/pool_events"}}
    operations["publish_node_events"] = {"action": "send", "channel": {"$ref": "#/channels/node_events"}}
    component("health", messages.HealthReport)
    channels["health"] = _channel(
        f"{prefix}.health.{{pool}}", "health reports (core NATS): the prober and external reporters publish",
        {"health": "health"}, ["pool"],
    )  # fmt: skip
    operations["publish_health"] = {"action": "send", "channel": {"$ref": "#/channels/health"}}
    operations["consume_health"] = {"action": "receive", "channel": {"$ref": "#/channels/health"}}
    component("pool_snapshot", messages.PoolSnapshot)
    channels["pool_snapshots"] = _channel(
        f"$KV.{KV_BUCKET}.{{pool}}", f"KV bucket {KV_BUCKET}: latest snapshot per pool (derived)",
        {"snapshot": "pool_snapshot"}, ["pool"],
    )  # fmt: skip
    operations["put_snapshot"] = {"action": "send", "channel": {"$ref": "#/channels/pool_snapshots"}}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": SERVICE_NAME,
            "version": f"schema-v{messages.SCHEMA_VERSION}",
            "description": "NATS contract of pool-managerd: commands (request/reply), events (JetStream), "
            f"health reports, KV snapshots. Discovery via $SRV.PING/INFO/STATS.{SERVICE_NAME} (nats.micro).",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": components},
    }


def _dump(obj: object) -> str:
    # Every generated JSON file passes here: normalising at the last step covers whatever produced it.
    return json.dumps(normalise(obj), indent=2, sort_keys=True) + "\n"


def render() -> dict[str, str]:
    """Every generated file: relative path → content."""
    files = {f"messages/{name}.json": _dump(message_schema(name, cls)) for name, cls in messages.ALL_MESSAGES.items()}
    files["lifecycle.json"] = _dump(msgspec.to_builtins(machine.describe()))
    files["lifecycle.mmd"] = machine.mermaid()
    files["asyncapi.json"] = _dump(asyncapi())
    return files


def write(out: Path) -> list[Path]:
    """Write :func:`render` under ``out``, removing stale generated files; returns what was written."""
    files = render()
    written: list[Path] = []
    for old in sorted(out.glob("messages/*.json")):
        if f"messages/{old.name}" not in files:
            old.unlink()
    for rel, content in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("schemas"), help="output directory (default: schemas)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the directory differs from the code")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.check:
        stale = [rel for rel, content in render().items() if _read(out / rel) != content]
        for rel in stale:
            print(f"schemas drift: {out / rel}", file=sys.stderr)
        return 1 if stale else 0
    written = write(out)
    print(f"wrote {len(written)} files under {out}")
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
