"""Every JSON example in README.md is checked against schemas/, and its requests against a daemon.

A client that validates what it sends with ``schemas/`` and the README's examples must meet no
disagreement: each request example validates against its command schema, each reply against a
reply its channel declares, each event against ``event.json``; and sent to a daemon (a real
nats-server, a real fake engine), each request gets the reply the README shows.
"""

from __future__ import annotations

import json

import pytest

from support.contract import README, Example, matching_reply, message_schema, parse

EXAMPLES, UNCLAIMED = parse(README.read_text(encoding="utf-8"))
REQUESTS = [e for e in EXAMPLES if e.kind == "request"]


def test_the_readme_has_examples_and_no_json_outside_them() -> None:
    assert len(REQUESTS) >= 4 and any(e.kind == "event" for e in EXAMPLES)
    assert not UNCLAIMED, "JSON in README.md that no example parse covers:\n" + "\n".join(UNCLAIMED)


def test_the_parser_finds_what_it_must() -> None:
    text = '```\n$ nats req poold.cmd.p.status \'\'\n{"a":\n 1}\n\n{"stray":1}\n```\n'
    examples, unclaimed = parse(text)
    assert [(e.subject, e.body, e.shown) for e in examples] == [("poold.cmd.p.status", "", {"a": 1})]
    assert unclaimed == ['README.md:6: {"stray":1}']


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_every_readme_example_validates_against_its_schema(example: Example) -> None:
    if example.kind == "event":
        message_schema("event").validate(example.shown)
        _, pool, event = example.subject.rsplit(".", 2)
        assert (example.shown["pool"], example.shown["body"]["type"]) == (pool, event)
        return
    verb = example.subject.rsplit(".", 1)[1]
    assert example.body is not None
    matching_reply(example.subject, example.shown)
    message_schema(f"reply.{example.shown['type']}").validate(example.shown)
    if not example.body and verb == "status":
        return  # a bare status has no body (README: "needs no body")
    # The schema and the daemon agree: a request is refused as bad_request exactly when it does
    # not validate against its command schema.
    refused = example.shown.get("code") == "bad_request"
    errors = list(message_schema(f"cmd.{verb}").iter_errors(json.loads(example.body)))
    assert bool(errors) == refused, f"{example}: schema errors {[e.message for e in errors]}, reply {example.shown}"
