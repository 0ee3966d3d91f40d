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
