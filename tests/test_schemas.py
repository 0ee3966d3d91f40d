"""schemas/ is generated from the code; any drift fails CI."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from pool_managerd.cli import schemas as schemagen
from pool_managerd.contract import messages

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


# --- descriptions do not depend on msgspec's or the interpreter's docstring handling ----------


# How a docstring reaches msgspec: as written (Python <= 3.12 with msgspec 0.22), through
# inspect.cleandoc (msgspec 0.23), or with the indentation of its later lines already gone (the
# Python 3.13 compiler). The schema text must be the same for all three.
def _compiler_dedent(doc: str) -> str:
    first, _, rest = doc.partition("\n")
    return first + ("\n" + textwrap.dedent(rest) if rest else "")


def _struct_classes() -> list[type]:
    seen: dict[str, type] = {}
    for obj in vars(messages).values():
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__doc__:
            seen[obj.__qualname__] = obj
    return list(seen.values())


def test_every_docstring_gives_one_description_however_it_was_dedented() -> None:
    classes = _struct_classes()
    # The case that drifted: docstrings of several lines (their indentation differs by version).
    assert sum("\n" in (c.__doc__ or "") for c in classes) >= 3
    for cls in classes:
        raw = cls.__doc__ or ""
        want = schemagen.clean_text(raw)
        assert schemagen.clean_text(inspect.cleandoc(raw)) == want, cls.__qualname__
        assert schemagen.clean_text(_compiler_dedent(raw)) == want, cls.__qualname__


def test_generated_descriptions_have_no_common_indent() -> None:
    for rel, text in schemagen.render().items():
        if not rel.endswith(".json"):
            continue
        for desc in _descriptions(json.loads(text)):
            later = [line for line in desc.split("\n")[1:] if line]
            assert not later or min(len(line) - len(line.lstrip(" ")) for line in later) == 0, (rel, desc)


def _descriptions(node: object) -> list[str]:
    if isinstance(node, dict):
        out = [v for k, v in node.items() if k == "description" and isinstance(v, str)]
        for k, v in node.items():
            if not (k == "description" and isinstance(v, str)):
                out += _descriptions(v)
        return out
    if isinstance(node, list):
        return [d for v in node for d in _descriptions(v)]
    return []


_DOC_LINES = st.lists(
    st.tuples(st.integers(0, 12), st.text(alphabet="ab `.:-", max_size=12)),
    min_size=1,
    max_size=8,
)


@given(_DOC_LINES, st.integers(0, 8))
def test_clean_text_agrees_with_cleandoc_and_is_idempotent(lines: list[tuple[int, str]], first_indent: int) -> None:
    doc = "\n".join(" " * (first_indent if i == 0 else n) + t for i, (n, t) in enumerate(lines))
    once = schemagen.clean_text(doc)
    assert schemagen.clean_text(once) == once
    assert schemagen.clean_text(inspect.cleandoc(doc)) == once
    assert schemagen.clean_text(_compiler_dedent(doc)) == once
    if lines[0][1].strip():
        # A docstring that starts on its first line (this project's style) reads as cleandoc gives it.
        assert once == inspect.cleandoc("\n".join(line.rstrip() for line in doc.split("\n")))


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
