"""Every test gets one kind marker, from the folder its module lives in, so the tree shows what
each test costs and a new test is classified by where it is put:

* ``tests/unit/`` → ``unit``: in-process and pure enough to run anywhere in milliseconds: no
  nats-server, no engine (sockets to nowhere and files under ``tmp_path`` are fine).
* ``tests/adapters/`` → ``adapter``: real processes or a real nats-server behind one piece (an
  adapter, the runtime, the harnesses).
* ``tests/e2e/`` → ``e2e``: a whole daemon, a ``pool-managerd`` command as a subprocess, a browser.

A test that is dearer than its folder (a pure module's one test that runs a command) says so with
its own ``@pytest.mark.adapter`` / ``@pytest.mark.e2e``: a marker already on a test wins.

Hypothesis properties (hundreds of examples each) are also marked ``slow``: ``make test-fast``
runs ``unit and not slow``, ``make test`` runs everything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import is_hypothesis_test
from hypothesis.stateful import RuleBasedStateMachine

KINDS = ("unit", "adapter", "e2e")
"""From the cheapest to the dearest."""

FOLDERS = {"unit": "unit", "adapters": "adapter", "e2e": "e2e"}
"""The folder under ``tests/`` → the kind of the tests in it."""


def folder_kind(path: Path) -> str | None:
    """The kind the folder of ``path`` gives, or ``None`` for a path outside the three."""
    return next((FOLDERS[part] for part in reversed(path.parts) if part in FOLDERS), None)


def _is_property(item: pytest.Item) -> bool:
    obj = getattr(item, "obj", None)
    cls = getattr(item, "cls", None)
    if is_hypothesis_test(obj) or (cls is not None and issubclass(cls, RuleBasedStateMachine.TestCase)):
        return True
    # A plain test that runs a state machine itself.
    return "run_state_machine_as_test" in getattr(getattr(obj, "__code__", None), "co_names", ())


def classify(items: list[pytest.Item]) -> None:
    """Give every collected test its kind marker, and ``slow`` to the properties
    (``pytest_collection_modifyitems``). A test outside the three folders is an error: it would
    otherwise run in no selection that names a kind."""
    for item in items:
        if _is_property(item) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if any(item.get_closest_marker(k) for k in KINDS):
            continue
        kind = folder_kind(Path(item.path))
        if kind is None:
            raise pytest.UsageError(f"{item.nodeid}: a test module belongs in tests/unit, tests/adapters or tests/e2e")
        item.add_marker(getattr(pytest.mark, kind))
