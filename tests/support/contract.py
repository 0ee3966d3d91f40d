"""What a client that knows only ``schemas/`` and README.md makes of the contract.

Shared by the contract tests: validators for ``schemas/messages/*.json``, the replies the
AsyncAPI document declares for a subject, and the examples README.md shows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT7

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SCHEMAS = REPO / "schemas"
ASYNCAPI: dict[str, Any] = json.loads((SCHEMAS / "asyncapi.json").read_text())
_ASYNCAPI_URI = "urn:pool-managerd:asyncapi"
_REGISTRY: Registry[Any] = Registry().with_resource(_ASYNCAPI_URI, DRAFT7.create_resource(ASYNCAPI))


def message_schema(name: str) -> Draft202012Validator:
    """The validator of ``schemas/messages/<name>.json``."""
    return Draft202012Validator(json.loads((SCHEMAS / "messages" / f"{name}.json").read_text()))


def channel_of(subject: str) -> str:
    """The AsyncAPI channel whose address ``subject`` matches (parameters match one token)."""
    found = []
    for name, channel in ASYNCAPI["channels"].items():
        address = channel.get("address")
        if not address:
            continue
        pattern = re.escape(address).replace(r"\{pool\}", "[^.]+").replace(r"\{node\}", "[^.]+")
        pattern = pattern.replace(r"\{event\}", "[^.]+")
        if re.fullmatch(pattern, subject):
            found.append(name)
    assert len(found) == 1, f"{subject} matches channels {found}"
    return found[0]


def declared_replies(subject: str) -> dict[str, Draft7Validator]:
    """Message name → payload validator for every reply the document declares for ``subject``."""
    channel = channel_of(subject)
    ops = [op for op in ASYNCAPI["operations"].values() if op["channel"]["$ref"] == f"#/channels/{channel}"]
    replies = [op["reply"] for op in ops if "reply" in op]
    assert len(replies) == 1, f"{subject}: no single request/reply operation"
    reply_channel = ASYNCAPI["channels"][replies[0]["channel"]["$ref"].split("/")[-1]]
    out = {}
    for ref in reply_channel["messages"].values():
        name = ref["$ref"].split("/")[-1]
        payload = ASYNCAPI["components"]["messages"][name]["payload"]["$ref"]
        out[name] = Draft7Validator({"$ref": _ASYNCAPI_URI + payload}, registry=_REGISTRY)
    return out


def matching_reply(subject: str, reply: dict[str, Any]) -> str:
    """The declared reply message ``reply`` is, or a failure naming what it matched none of."""
    declared = declared_replies(subject)
    matches = [name for name, validator in declared.items() if validator.is_valid(reply)]
    assert matches, f"reply on {subject} is none of {sorted(declared)}: {reply}"
    return matches[0]


_REQUEST = re.compile(r"^\$ nats req (?P<subject>\S+) '(?P<body>[^']*)'\s*(#.*)?$")
_EVENT = re.compile(r"^event on (?P<subject>\S+):$")


@dataclass(frozen=True)
class Example:
    """One example: a request and the reply shown under it, or an event and its subject."""

    kind: str
    subject: str
    line: int
    shown: dict[str, Any]
    body: str | None = None

    def __str__(self) -> str:
        return f"README.md:{self.line} {self.kind} {self.subject}"


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced code block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip(), number + 1, []
            else:
                blocks.append((lang, start, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def parse(text: str) -> tuple[list[Example], list[str]]:
    """The examples of ``text`` and every code line with JSON in it that belongs to none."""
    examples: list[Example] = []
    unclaimed: list[str] = []
    for lang, start, lines in _blocks(text):
        if lang == "mermaid":
            continue
        i = 0
        while i < len(lines):
            line, number = lines[i], start + i
            head = _REQUEST.match(line) or _EVENT.match(line)
            if head is None:
                # JSON, as opposed to other braces (a nats-server config block): an object with a
                # quoted key, on its own or quoted in a command line.
                if line.lstrip().startswith('{"') or "'{\"" in line:
                    unclaimed.append(f"README.md:{number}: {line}")
                i += 1
                continue
            j = i + 1
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("$ ", "event on ")):
                j += 1
            shown = json.loads(" ".join(part.strip() for part in lines[i + 1 : j]))
            kind = "request" if "body" in head.groupdict() else "event"
            examples.append(Example(kind, head["subject"], number, shown, head.groupdict().get("body")))
            i = j
    return examples, unclaimed
