"""schemas/ is generated from the code; any drift fails CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pool_managerd import messages, schemagen

REPO = Path(__file__).resolve().parents[1]


def test_committed_schemas_match_the_code(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    result = subprocess.run(
        [sys.executable, "-m", "pool_managerd", "schemas", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    generated = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(REPO / "schemas").as_posix(): p.read_text() for p in (REPO / "schemas").rglob("*") if p.is_file()
    }
    assert sorted(generated) == sorted(committed), "schema files added or removed: run `make schemas`"
    drift = [name for name in generated if generated[name] != committed[name]]
    assert not drift, f"schemas drift from the code in {drift}: run `make schemas`"


def test_check_mode_reports_drift(tmp_path: Path) -> None:
    schemagen.write(tmp_path)
    assert schemagen.run(_ns(tmp_path, check=True)) == 0
    (tmp_path / "lifecycle.mmd").write_text("stale\n")
    assert schemagen.run(_ns(tmp_path, check=True)) == 1


def test_every_message_schema_is_2020_12_and_named() -> None:
    for name, cls in messages.ALL_MESSAGES.items():
        schema = schemagen.message_schema(name, cls)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["title"] == name
        json.dumps(schema)


def test_asyncapi_covers_every_verb_and_channel() -> None:
    doc = schemagen.asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    addresses = {ch["address"] for ch in doc["channels"].values()}
    for verb in messages.POOL_COMMANDS:
        assert f"poold.cmd.{{pool}}.{verb}" in addresses
    for verb in messages.NODE_COMMANDS:
        assert f"poold.node.{{node}}.cmd.{verb}" in addresses
    assert {"poold.evt.{pool}.{event}", "poold.health.{pool}", "poold.node.{node}.evt.{event}"} <= addresses
    for op in doc["operations"].values():
        ref = op["channel"]["$ref"].split("/")[-1]
        assert ref in doc["channels"]


def _ns(out: Path, *, check: bool) -> object:
    import argparse

    return argparse.Namespace(out=out, check=check)


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _pointer(doc: dict[str, object], ref: str) -> object:
    node: object = doc
    for part in ref.removeprefix("#/").split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve against the document root"
        node = node[part]
    return node


def test_asyncapi_refs_resolve_against_the_document_root_and_discriminators_are_names() -> None:
    # What the official parser demands (make asyncapi runs it); checked here too so a machine
    # without node still catches the two ways the document broke before.
    doc = json.loads((REPO / "schemas" / "asyncapi.json").read_text())
    refs = _refs(doc)
    assert any(ref.startswith("#/components/schemas/") for ref in refs)
    for ref in refs:
        assert ref.startswith("#/"), ref
        _pointer(doc, ref)

    def discriminators(node: object) -> list[object]:
        if isinstance(node, dict):
            own = [node["discriminator"]] if "discriminator" in node else []
            return own + [d for value in node.values() for d in discriminators(value)]
        if isinstance(node, list):
            return [d for item in node for d in discriminators(item)]
        return []

    found = discriminators(doc["components"]["schemas"])
    assert found and all(d == "type" for d in found)


def test_every_request_reply_channel_declares_rejected() -> None:
    doc = schemagen.asyncapi()
    for name, op in doc["operations"].items():
        if "reply" not in op:
            continue
        reply = doc["channels"][op["reply"]["channel"]["$ref"].split("/")[-1]]
        assert "rejected" in reply["messages"], name
    assert "headers" in doc["components"]["messages"]["rejected"]


def test_command_schemas_leave_type_optional_but_pinned() -> None:
    for verb in messages.POOL_COMMANDS:
        schema = json.loads((REPO / "schemas" / "messages" / f"cmd.{verb}.json").read_text())
        body = schema["$defs"][messages.POOL_COMMANDS[verb].__name__]
        assert "type" not in body.get("required", []), verb
        assert body["properties"]["type"]["enum"] == [verb]
