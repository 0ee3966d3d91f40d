"""Every test gets one kind marker, read from what it uses, so a new test is classified without
anyone editing a list.

* ``unit``: in-process and pure enough to run anywhere in milliseconds: no subprocess, no
  nats-server, no engine (sockets to nowhere and files under ``tmp_path`` are fine).
* ``adapter``: real processes or a real nats-server behind one piece (an adapter, the runtime,
  the harnesses, a command run in-process).
* ``e2e``: a whole daemon (``Daemon``, the ``start_daemon`` fixture) or a ``pool-managerd``
  command run as a subprocess.

Hypothesis properties (hundreds of examples each) are also marked ``slow``: ``make test-fast``
runs ``unit and not slow``, ``make test`` runs everything.

The kind comes from the module's source (:func:`module_kinds`, read with :mod:`ast`, so a module
whose tests are none of them ``unit`` is never even imported by ``make test-fast``) and from the
fixtures a test ends up requesting (``item.fixturenames``). Each test function (or test class) is
classified on its own: the names it references, followed through the module's own helper
functions and fixtures, are looked up in :data:`ADAPTER_ORIGINS` and :data:`E2E_ORIGINS`. A module
can still say it outright with ``pytestmark = pytest.mark.<kind>``; a marker already on a test
wins over the guess.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import is_hypothesis_test
from hypothesis.stateful import RuleBasedStateMachine

KINDS = ("unit", "adapter", "e2e")
"""From the cheapest to the dearest; a test is the dearest kind anything it uses makes it."""

ADAPTER_ORIGINS = (
    "subprocess",
    "nats",
    "support.procs",
    "support.nats_versions",
    "pool_managerd.adapters.process",
    "pool_managerd.adapters.http_probe",
    "pool_managerd.adapters.event_log",
    "pool_managerd.adapters.nats_connect",
    "pool_managerd.adapters.replication",
    "pool_managerd.runtime",
    "pool_managerd.adapters.embedded_nats",
    "pool_managerd.testing.nats_cluster",
    "pool_managerd.client",
    "pool_managerd.cli.ctl",
    "pool_managerd.cli.watch",
    "pool_managerd.cli.run",
    "pool_managerd.cli.replay",
    "pool_managerd.cli.demo",
    "pool_managerd.cli.dashboard",
    "pool_managerd.dashboard",
)
"""Where a name comes from (a module, or a prefix of one) that makes a test at least ``adapter``."""

E2E_ORIGINS = ("pool_managerd.runtime.daemon", "playwright")
"""... and at least ``e2e``."""

ADAPTER_FIXTURES = frozenset(
    {"nats_server", "nats_url", "fresh_nats_server", "nats_connect", "nc", "js_ns", "nats_cluster"}
)
E2E_FIXTURES = frozenset({"start_daemon"})

_SUBPROCESS_CALLS = frozenset({"create_subprocess_exec", "create_subprocess_shell"})
_COMMAND_NAMES = frozenset({"pool_managerd", "pool-managerd"})


def _rank(kind: str) -> int:
    return KINDS.index(kind)


def _dearest(kinds: Iterable[str]) -> str:
    return max(kinds, key=_rank, default="unit")


def _origin_kind(origin: str) -> str:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(origin == p or origin.startswith(p + ".") for p in prefixes)

    if under(E2E_ORIGINS):
        return "e2e"
    return "adapter" if under(ADAPTER_ORIGINS) else "unit"


def fixture_kind(names: Iterable[str]) -> str:
    """The kind the fixtures ``names`` (a test's whole fixture closure) make a test."""
    found = set(names)
    if found & E2E_FIXTURES:
        return "e2e"
    return "adapter" if found & ADAPTER_FIXTURES else "unit"


def _imports(tree: ast.Module, here: Path) -> dict[str, str]:
    """name bound by an import anywhere in the module → the kind of where it comes from."""
    kinds: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                kinds[alias.asname or alias.name.split(".")[0]] = _origin_kind(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            sibling = here.parent / f"{node.module}.py"
            borrowed = module_kinds(sibling) if node.module.startswith("test_") and sibling.is_file() else {}
            for alias in node.names:
                name = alias.asname or alias.name
                origins = (node.module, f"{node.module}.{alias.name}")
                kinds[name] = _dearest([*map(_origin_kind, origins), borrowed.get(alias.name, "unit")])
    return kinds


def _direct_kind(node: ast.AST, imported: dict[str, str]) -> tuple[str, set[str]]:
    """The kind ``node``'s own body makes it, and the module-level names it refers to."""
    names: set[str] = set()
    kinds = ["unit"]
    runs_command = False
    spawns = False
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.arg):
            names.add(sub.arg)
        elif isinstance(sub, ast.Attribute) and sub.attr in _SUBPROCESS_CALLS:
            spawns = True
        elif isinstance(sub, ast.Constant) and sub.value in _COMMAND_NAMES:
            runs_command = True
        elif isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Div) and _is_bench(sub):
            kinds.append("e2e")  # a path into bench/: the benches drive whole daemons
    kinds += [imported[n] for n in names if n in imported]
    kinds.append(fixture_kind(names))
    spawns = spawns or "subprocess" in names
    if spawns:
        kinds.append("e2e" if runs_command else "adapter")
    return _dearest(kinds), names


def _is_bench(path: ast.BinOp) -> bool:
    return any(isinstance(side, ast.Constant) and side.value == "bench" for side in (path.left, path.right))


def _declared(tree: ast.Module) -> str | None:
    """The kind of a module-level ``pytestmark = pytest.mark.<kind>``, if any."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Attribute) and sub.attr in KINDS:
                    return sub.attr
    return None


@functools.cache
def module_kinds(path: Path) -> dict[str, str]:
    """Top-level function / class name → kind, for the module at ``path``."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError):
        return {}
    imported = _imports(tree, path)
    declared = _declared(tree)
    direct: dict[str, str] = {}
    refs: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            direct[node.name], refs[node.name] = _direct_kind(node, imported)
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            # A module constant (a path, an argv) counts for the tests that use it.
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            kind, used = _direct_kind(node.value, imported)
            for target in targets:
                if isinstance(target, ast.Name):
                    direct[target.id], refs[target.id] = kind, used
    # A test is as dear as the module's own helpers and fixtures it reaches, however indirectly.
    kinds = dict(direct)
    changed = True
    while changed:
        changed = False
        for name, used in refs.items():
            new = _dearest([kinds[name], *(kinds[u] for u in used if u in kinds and u != name)])
            if new != kinds[name]:
                kinds[name], changed = new, True
    if declared is not None:
        kinds = dict.fromkeys(kinds, declared)
    return kinds


def has_unit_tests(path: Path) -> bool:
    """Whether any test in the module could be ``unit`` (the fixtures can only make it dearer)."""
    kinds = module_kinds(path)
    return any(k == "unit" for name, k in kinds.items() if name.startswith(("test", "Test")))


def _is_property(item: pytest.Item) -> bool:
    obj = getattr(item, "obj", None)
    cls = getattr(item, "cls", None)
    if is_hypothesis_test(obj) or (cls is not None and issubclass(cls, RuleBasedStateMachine.TestCase)):
        return True
    # A plain test that runs a state machine itself.
    return "run_state_machine_as_test" in getattr(getattr(obj, "__code__", None), "co_names", ())


def classify(items: list[pytest.Item]) -> None:
    """Give every collected test its kind marker, and ``slow`` to the properties
    (``pytest_collection_modifyitems``)."""
    for item in items:
        if _is_property(item) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if any(item.get_closest_marker(k) for k in KINDS):
            continue
        top = item.name.split("[")[0]
        cls = getattr(item, "cls", None)
        static = module_kinds(Path(item.path)).get(cls.__name__ if cls is not None else top, "unit")
        kind = _dearest([static, fixture_kind(getattr(item, "fixturenames", ()))])
        item.add_marker(getattr(pytest.mark, kind))
