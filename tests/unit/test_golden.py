"""Golden event logs replay to their committed states; broken logs are named, not folded quietly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pool_managerd.contract.errors import MalformedMessage
from pool_managerd.contract.messages import SCHEMA_VERSION, Event
from pool_managerd.core import upcast as upcast_mod
from pool_managerd.core.fold import Fold, fold
from pool_managerd.core.state import PoolValue, initial
from pool_managerd.core.table import ROWS
from pool_managerd.core.upcast import UPCASTERS, decode_event, upcast
from support.scripts import load_script

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
LOGS = sorted(GOLDEN.glob("v*_all_triggers.jsonl"))


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pool_managerd", "replay", *args], capture_output=True, text=True, check=False
    )


def test_there_is_a_golden_log_for_the_current_schema() -> None:
    assert GOLDEN / f"v{SCHEMA_VERSION}_all_triggers.jsonl" in LOGS


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.name)
def test_golden_log_replays_to_the_committed_states(log: Path) -> None:
    expected = json.loads(log.with_name(log.name.replace(".jsonl", ".expected.json")).read_text())
    result = replay("--file", str(log), "--json")
    assert result.returncode == 0, result.stderr
    pools = json.loads(result.stdout)["pools"]
    got = {
        pool: {k: view[k] for k in ("state", "seq", "restarts", "crashes", "engine_pid")}
        for pool, view in pools.items()
    }
    assert got == expected


@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.name)
def test_golden_log_covers_every_row_of_the_table(log: Path) -> None:
    events = [decode_event(line) for line in log.read_bytes().splitlines() if line.strip()]
    taken = {(e.body.src, e.body.trigger, e.body.dst) for e in events if e.type == "state_changed"}  # type: ignore[union-attr]
    # internal_error rows are taken only by a bug (tests/unit/test_machine_properties.py injects one).
    assert {(r.source, r.trigger, r.dest) for r in ROWS if r.trigger != "internal_error"} <= taken


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_timeline_names_triggers_and_commands() -> None:
    result = replay("--file", str(LOGS[-1]))
    assert result.returncode == 0
    assert "unready -> preloading" in result.stdout
    assert "[cmd cmd-" in result.stdout
    assert "6 pools" in result.stdout


def _rewrite(tmp_path: Path, edit: int, change: dict[str, object]) -> Path:
    lines = LOGS[-1].read_text().splitlines()
    obj = json.loads(lines[edit])
    for key, value in change.items():
        target = obj["body"] if key in obj["body"] else obj
        target[key] = value
    lines[edit] = json.dumps(obj)
    out = tmp_path / "edited.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _first_state_change(line_index_from: int = 0) -> int:
    lines = LOGS[-1].read_text().splitlines()
    return next(i for i, line in enumerate(lines) if i >= line_index_from and '"state_changed"' in line)


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_illegal_transition_exits_non_zero_and_names_it(tmp_path: Path) -> None:
    idx = _first_state_change(5)
    edited = _rewrite(tmp_path, idx, {"dst": "failed"})
    result = replay("--file", str(edited), "--quiet")
    assert result.returncode == 1
    assert "violation: illegal_transition" in result.stderr


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_sequence_gap_exits_non_zero_and_names_it(tmp_path: Path) -> None:
    lines = LOGS[-1].read_text().splitlines()
    del lines[3]
    gapped = tmp_path / "gap.jsonl"
    gapped.write_text("\n".join(lines) + "\n")
    result = replay("--file", str(gapped), "--quiet")
    assert result.returncode == 1
    assert "violation: seq_gap" in result.stderr


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_second_writer_exits_non_zero(tmp_path: Path) -> None:
    lines = LOGS[-1].read_text().splitlines()
    pool = json.loads(lines[0])["pool"]
    idx = [i for i, line in enumerate(lines) if json.loads(line)["pool"] == pool]
    for i in idx[3:4]:
        obj = json.loads(lines[i])
        obj["node"] = "intruder"
        lines[i] = json.dumps(obj)
    out = tmp_path / "writers.jsonl"
    out.write_text("\n".join(lines) + "\n")
    result = replay("--file", str(out), "--quiet")
    assert result.returncode == 1
    assert "violation: two_writers" in result.stderr


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_malformed_line_is_named_with_its_number(tmp_path: Path) -> None:
    lines = LOGS[-1].read_text().splitlines()
    lines[2] = '{"v": 1, "seq": "x"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = replay("--file", str(bad))
    assert result.returncode == 2
    assert "bad.jsonl:3" in result.stderr


@pytest.mark.e2e  # runs a pool-managerd command: dearer than its folder
def test_until_time_and_pool_filters() -> None:
    events = [decode_event(line) for line in LOGS[-1].read_bytes().splitlines()]
    cut = events[40].ts
    result = replay("--file", str(LOGS[-1]), "--json", "--until-time", str(cut), "--pool", "alpha")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data["pools"]) == ["alpha"]
    assert data["events"] == sum(1 for e in events if e.pool == "alpha" and e.ts <= cut)


def test_upcasters_form_a_contiguous_chain() -> None:
    # Every version from the first to the current one has its step: a shape change that bumps
    # SCHEMA_VERSION without an upcaster fails here (and the golden logs fail to decode).
    assert all(v in UPCASTERS for v in range(upcast_mod.FIRST_VERSION, SCHEMA_VERSION))


def test_upcast_steps_an_older_event_to_the_current_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the build is at v2 with one step that renamed `reason` to `why`... and back.
    monkeypatch.setattr(upcast_mod, "SCHEMA_VERSION", 2)

    def v1_to_v2(data: dict[str, object]) -> dict[str, object]:
        body = dict(data["body"])  # type: ignore[call-overload]
        body["reason"] = f"upcast: {body.get('reason', '')}"
        return {**data, "body": body}

    line = LOGS[-1].read_bytes().splitlines()[_first_state_change()]
    data = msgspec.json.decode(line)
    up = upcast(data, {1: v1_to_v2})
    assert up["v"] == 2
    assert up["body"]["reason"].startswith("upcast: ")
    with pytest.raises(MalformedMessage, match="no upcaster from event schema v1"):
        upcast(data, {})


def test_decode_refuses_newer_and_versionless_events() -> None:
    line = LOGS[-1].read_bytes().splitlines()[0]
    data = msgspec.json.decode(line)
    with pytest.raises(MalformedMessage, match="newer"):
        decode_event(msgspec.json.encode({**data, "v": SCHEMA_VERSION + 1, "body": {"type": "unknown_future"}}))
    with pytest.raises(MalformedMessage, match="no valid schema version"):
        upcast({k: v for k, v in data.items() if k != "v"})


def test_fold_of_golden_log_has_no_violations() -> None:
    events: list[Event] = [decode_event(line) for line in LOGS[-1].read_bytes().splitlines()]
    result = fold(events, expect_start=True)
    assert result.violations == []
    assert result.events == len(events)


def _golden_script() -> Any:
    return load_script(GOLDEN / "make_golden.py", "make_golden")


def test_the_live_machine_driven_by_the_golden_script_writes_the_golden_log() -> None:
    """The golden script's commands and facts, through today's live machine, produce the
    committed events: every field the v1 log has holds the same value, and the only fields added
    since are optional ones later versions introduced (the reader of a v1 log lacks nothing)."""
    script = _golden_script().scenario()
    # Refusals were events in v1; today they go to the audit stream, and each pool's sequence
    # counts only the facts that remain.
    committed = [json.loads(msgspec.json.encode(e)) for e in _without_refusals(LOGS[0])]
    produced = [json.loads(msgspec.json.encode(event)) for event in script.events]
    assert len(produced) == len(committed)
    for n, (ours, theirs) in enumerate(zip(produced, committed, strict=True), start=1):
        mine, golden = _flat(ours), _flat(theirs)
        golden = {k: v for k, v in golden.items() if v is not None}
        # Rejection texts were reworded since (they list ``status`` among the allowed verbs).
        changed = {k for k in golden if golden[k] != mine.get(k)} - {"body.message"}
        assert not changed, (n, {k: (mine.get(k), golden[k]) for k in changed})
        assert set(mine) - set(golden) <= _ADDED_SINCE_V1, (n, set(mine) - set(golden))


_ADDED_SINCE_V1 = {"fingerprint", "command_id", "traceparent", "body.mask", "body.policy", "body.crashed"}
"""Optional fields later than the v1 golden log: command fingerprints, the cause carried by
fact events, the mask and policy asked for, whether an exit was a crash."""


REFUSALS = frozenset({"command_rejected", "preload_rejected"})


def _without_refusals(log: Path) -> list[Event]:
    """The events of a v1 log as the live machine writes them today: refusals left out, each
    pool's ``seq`` renumbered over what remains."""
    out: list[Event] = []
    seqs: dict[str, int] = {}
    for line in log.read_bytes().splitlines():
        event = decode_event(line)
        if event.type in REFUSALS or event.pool is None:
            continue
        seqs[event.pool] = seqs.get(event.pool, 0) + 1
        out.append(msgspec.structs.replace(event, seq=seqs[event.pool]))
    return out


def _flat(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_evolve_over_the_golden_log_is_the_state_the_live_machine_holds() -> None:
    """Replay of the committed log, started from each pool's definition, holds exactly the value
    each live pool holds after the script: one evolve for both."""
    script = _golden_script().scenario()
    lc = script.lc
    start: Callable[[str], PoolValue] = lambda pool: initial(pool, lc.pool(pool).definition.spec)  # noqa: E731
    replayed = Fold(expect_start=True, start=start)
    for event in _without_refusals(LOGS[0]):
        replayed.apply(event)
    assert not replayed.violations
    assert set(replayed.views) == set(lc.pools)
    for pool, value in replayed.views.items():
        live = lc.pool(pool).value
        # Without fingerprints the log cannot tell a command's own events from later ones, so the
        # v1 log leaves ``cause`` unknown; every other field is the live one.
        assert value.cause == (None, None)
        assert msgspec.structs.replace(value, cause=live.cause) == live, pool
    # The same events as the live machine writes them today (with fingerprints) give ``cause`` too.
    folded = Fold(expect_start=True, start=start)
    for event in script.events:
        folded.apply(event)
    assert folded.views == {pool: model.value for pool, model in lc.pools.items()}
