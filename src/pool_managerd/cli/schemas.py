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

from pool_managerd.contract import messages
from pool_managerd.contract.subjects import AUDIT_STREAM, DEFAULT_PREFIX, KV_BUCKET, SERVICE_NAME, STREAM_NAME
from pool_managerd.core import table

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


_COMMAND_TYPES: dict[str, str] = {
    cls.__name__: str(cls.__struct_config__.tag)
    for cls in (*messages.POOL_COMMANDS.values(), *messages.NODE_COMMANDS.values())
}


def _optional_command_tags(defs: dict[str, Any]) -> dict[str, Any]:
    """Commands may leave out ``type``: the subject names the verb, and the daemon decodes the
    payload as that verb's command. msgspec marks a tag as required; the daemon does not, so the
    schema says what the daemon does. A ``type`` that is given must still equal the verb."""
    for name, verb in _COMMAND_TYPES.items():
        schema = defs.get(name)
        if schema is None:
            continue
        schema["required"] = [field for field in schema.get("required", []) if field != "type"]
        if not schema["required"]:
            del schema["required"]
        schema["properties"]["type"] = {
            **schema["properties"]["type"],
            "default": verb,
            "description": f"optional: the subject names the verb; when given it must be {verb!r}",
        }
    return defs


def _written_fields(cls: type[msgspec.Struct]) -> list[str]:
    tag = cls.__struct_config__.tag_field
    return ([tag] if tag else []) + [field.encode_name for field in msgspec.structs.fields(cls)]


_ALWAYS_WRITTEN: dict[str, list[str]] = {
    obj.__name__: _written_fields(obj)
    for obj in vars(messages).values()
    if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and not obj.__struct_config__.omit_defaults
}


def _always_present(defs: dict[str, Any]) -> dict[str, Any]:
    """A message that never omits a field lists every field as required: what a reader can rely
    on is what the daemon writes, not what msgspec would accept (defaults let old values decode)."""
    for name, fields in _ALWAYS_WRITTEN.items():
        if name in defs:
            defs[name]["required"] = list(fields)
    return defs


def message_schema(name: str, cls: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON Schema 2020-12 document of one wire message."""
    schema = msgspec.json.schema(cls)
    _always_present(_optional_command_tags(schema.get("$defs", {})))
    doc: dict[str, Any] = normalise(schema)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"pool-managerd/{name}.json", "title": name, **doc}


def _channel(address: str, summary: str, messages_: dict[str, str], params: list[str]) -> dict[str, Any]:
    return {
        "address": address,
        "summary": summary,
        "parameters": {p: {"description": f"{p} id, ^[a-z0-9][a-z0-9_-]{{0,62}}$"} for p in params},
        "messages": {key: {"$ref": f"#/components/messages/{ref}"} for key, ref in messages_.items()},
    }


def _asyncapi_schema(node: Any) -> Any:
    """msgspec's JSON Schema → AsyncAPI's schema format (a superset of JSON Schema draft-07).

    Two things differ: ``discriminator`` is the property name itself (msgspec writes OpenAPI's
    ``{"propertyName": ..., "mapping": ...}``; every variant still pins its tag with ``const``), and
    tuples are ``items`` arrays (draft-07) rather than ``prefixItems`` (2020-12)."""
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "discriminator" and isinstance(value, dict):
            out[key] = value["propertyName"]
        elif key == "prefixItems":
            out["items"] = _asyncapi_schema(value)
        elif key == "items" and "prefixItems" in node:
            if value is False:
                out["additionalItems"] = False
        else:
            out[key] = _asyncapi_schema(value)
    return out


REJECTION_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "nats micro error convention: every rejected reply carries both headers; $SRV.STATS "
    "counts it as an endpoint error.",
    "properties": {
        "Nats-Service-Error": {"type": "string", "description": "the rejection's message (one line)"},
        "Nats-Service-Error-Code": {
            "type": "string",
            "description": "HTTP-style status of the body's code: "
            + ", ".join(f"{code} {status}" for code, status in messages.REJECT_STATUS.items()),
            "enum": sorted(set(messages.REJECT_STATUS.values())),
        },
    },
    "required": ["Nats-Service-Error", "Nats-Service-Error-Code"],
}

EVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "Nats-Msg-Id": {"type": "string", "description": "<pool>:<seq> (pool events), <node>:n<seq> (node events)"},
        "Nats-Expected-Last-Subject-Sequence": {"type": "string"},
        "Nats-Expected-Last-Subject-Sequence-Subject": {"type": "string"},
        "traceparent": {"type": "string", "description": "W3C trace context of the causing command, when it had one"},
    },
}


def asyncapi(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the whole NATS contract.

    Payload schemas live once under ``components.schemas`` and messages refer to them there, so
    every ``$ref`` resolves against the document root, as AsyncAPI requires. Each request/reply
    channel lists every reply its subject can produce (``rejected`` included)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages_: dict[str, type[msgspec.Struct]] = {}
    headers: dict[str, dict[str, Any]] = {}

    def component(name: str, cls: type[msgspec.Struct], header_schema: dict[str, Any] | None = None) -> str:
        messages_[name] = cls
        if header_schema is not None:
            headers[name] = header_schema
        return name

    def request_reply(op: str, request: str, address: str, summary: str, param: str, replies: dict[str, str]) -> None:
        key = str(messages_[request].__struct_config__.tag)
        channels[request] = _channel(address, summary, {key: request}, [param])
        channels[f"{request}_reply"] = {
            "address": None,
            "summary": f"every reply to {address} (on the request's reply subject): {', '.join(replies)}",
            "messages": {k: {"$ref": f"#/components/messages/{v}"} for k, v in replies.items()},
        }
        operations[op] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{request}"},
            "reply": {"channel": {"$ref": f"#/channels/{request}_reply"}},
        }

    component("accepted", messages.Accepted)
    component("rejected", messages.Rejected, REJECTION_HEADERS)
    component("status_reply", messages.StatusReply)
    for verb, cls in messages.POOL_COMMANDS.items():
        cname = component(f"cmd_{verb}", cls)
        first = {"status": "status_reply"} if verb == "status" else {"accepted": "accepted"}
        address = f"{prefix}.cmd.{{pool}}.{verb}"
        summary = f"{verb} command for one pool (request/reply)"
        request_reply(f"handle_{verb}", cname, address, summary, "pool", {**first, "rejected": "rejected"})
    node_replies: dict[str, type[msgspec.Struct]] = {
        "pools": messages.PoolsReply,
        "inventory": messages.InventoryReply,
        "lifecycle": messages.LifecycleReply,
        "gpu_clear": messages.GpuClearReply,
    }
    for verb, node_cls in messages.NODE_COMMANDS.items():
        cname = component(f"node_cmd_{verb}", node_cls)
        component(f"{verb}_reply", node_replies[verb])
        address = f"{prefix}.node.{{node}}.cmd.{verb}"
        summary = f"node {verb} command (request/reply)"
        request_reply(
            f"handle_node_{verb}", cname, address, summary, "node", {verb: f"{verb}_reply", "rejected": "rejected"}
        )
    component("event", messages.Event, EVENT_HEADERS)
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
    component("audit_record", messages.AuditRecord)
    channels["audit"] = _channel(
        f"{prefix}.audit.{{node}}.{{code}}",
        f"refused commands, stored in JetStream stream {AUDIT_STREAM} (size-bounded, oldest discarded)",
        {"audit": "audit_record"}, ["node", "code"],
    )  # fmt: skip
    operations["publish_audit"] = {"action": "send", "channel": {"$ref": "#/channels/audit"}}

    names = list(messages_)
    payloads, schemas = msgspec.json.schema_components(
        [messages_[name] for name in names], ref_template="#/components/schemas/{name}"
    )
    components_messages: dict[str, Any] = {}
    for name, payload in zip(names, payloads, strict=True):
        message: dict[str, Any] = {"name": name, "contentType": "application/json", "payload": payload}
        if name in headers:
            message["headers"] = headers[name]
        components_messages[name] = message
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
        "components": {
            "messages": components_messages,
            "schemas": _asyncapi_schema(_always_present(_optional_command_tags(schemas))),
        },
    }


def _dump(obj: object) -> str:
    # Every generated JSON file passes here: normalising at the last step covers whatever produced it.
    return json.dumps(normalise(obj), indent=2, sort_keys=True) + "\n"


def render() -> dict[str, str]:
    """Every generated file: relative path → content."""
    files = {f"messages/{name}.json": _dump(message_schema(name, cls)) for name, cls in messages.ALL_MESSAGES.items()}
    files["lifecycle.json"] = _dump(msgspec.to_builtins(table.describe()))
    files["lifecycle.mmd"] = table.mermaid()
    files["asyncapi.json"] = _dump(asyncapi())
    files["README.md"] = _README
    return files


_README = """# schemas/

Generated from the code by `make schemas` (`pool-managerd schemas`); do not edit. CI fails when
these files drift from the code (`tests/unit/test_schemas.py`, `pool-managerd schemas --check`).

- `messages/<name>.json`: JSON Schema 2020-12 of every top-level wire message (`messages.py`);
- `lifecycle.json`, `lifecycle.mmd`: the lifecycle table (`core/table.py`), as data and as a
  Mermaid diagram (the dashboard draws the former);
- `asyncapi.json`: an AsyncAPI 3.0 document of every subject the daemon serves or publishes
  (`make asyncapi` runs the official parser on it).
"""


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
