"""The supported nats-server floor and the verdict on a reported version (pure)."""

from __future__ import annotations

import pytest

from pool_managerd.contract.nats_version import (
    NATS_SERVER_FLOOR,
    NATS_SERVER_FLOOR_TEXT,
    NatsServerTooOld,
    ServerVersion,
    check_server_version,
    parse_server_version,
)


def test_the_floor_is_the_release_that_added_the_fencing_header() -> None:
    assert NATS_SERVER_FLOOR == (2, 11, 0)
    assert NATS_SERVER_FLOOR_TEXT == "2.11.0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.11.0", ServerVersion(2, 11, 0)),
        ("v2.15.1", ServerVersion(2, 15, 1)),
        ("2.12.0-RC.2", ServerVersion(2, 12, 0, "RC.2")),
        ("2.11.3+build.7", ServerVersion(2, 11, 3)),
        (" 2.10.26 ", ServerVersion(2, 10, 26)),
    ],
)
def test_versions_are_parsed(text: str, expected: ServerVersion) -> None:
    assert parse_server_version(text) == expected


@pytest.mark.parametrize("text", ["", "2.11", "two.eleven.zero", "2.11.0.1", "02.11.0", "2.11.0-", "9" * 300])
def test_what_is_not_a_version_parses_to_none(text: str) -> None:
    assert parse_server_version(text) is None


@pytest.mark.parametrize(
    ("text", "supported"),
    [
        ("2.10.26", False),
        ("2.11.0-RC.1", False),  # a pre-release of the floor precedes it
        ("2.11.0", True),
        ("2.11.0+build", True),
        ("2.12.0-RC.1", True),
        ("2.15.1", True),
        ("3.0.0", True),
        ("1.99.99", False),
    ],
)
def test_at_or_above_the_floor(text: str, supported: bool) -> None:
    version = parse_server_version(text)
    assert version is not None
    assert version.at_least(NATS_SERVER_FLOOR) is supported


def test_a_supported_version_is_returned() -> None:
    assert check_server_version("2.15.1") == ServerVersion(2, 15, 1)
    assert check_server_version(ServerVersion(2, 11, 0)) == ServerVersion(2, 11, 0)


def test_below_the_floor_the_refusal_is_one_line_naming_version_floor_and_why() -> None:
    with pytest.raises(NatsServerTooOld) as err:
        check_server_version("2.10.26", url="nats://10.0.0.5:4222")
    message = err.value.message
    assert "\n" not in message
    assert message.startswith("nats-server 2.10.26 at nats://10.0.0.5:4222 is older than 2.11.0")
    assert "Nats-Expected-Last-Subject-Sequence-Subject" in message
    assert "fence every pool" in message and message.endswith("upgrade nats-server to 2.11.0 or newer")
    assert err.value.reported == "2.10.26"


@pytest.mark.parametrize("version", [None, "not-a-version", "x" * 500])
def test_a_server_without_a_readable_version_is_refused(version: str | None) -> None:
    with pytest.raises(NatsServerTooOld) as err:
        check_server_version(version)
    assert err.value.message.startswith("nats-server reports no usable version; pool-managerd needs 2.11.0")
    assert "x" * 50 not in err.value.message  # what the server sent is bounded out of the message
