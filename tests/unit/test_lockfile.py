"""requirements.lock agrees with pyproject.toml, and make installs from it.

The checker itself (``tools/lockfile.py``) is exercised against edited copies of both files, so each
kind of disagreement is shown to be caught, not only the happy case.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from support.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def _load_tool() -> ModuleType:
    return load_script(REPO / "tools" / "lockfile.py", "lockfile")


lockfile = _load_tool()


def test_the_committed_lock_agrees_with_pyproject() -> None:
    assert lockfile.problems(REPO / "pyproject.toml", REPO / "requirements.lock") == []


def test_every_pin_is_exact_and_hashed() -> None:
    lock = lockfile.parse_lock((REPO / "requirements.lock").read_text())
    assert len(lock.pins) >= 20
    for name, pin in lock.pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", pin.version), name
        assert pin.hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), name
    # The build backend is locked too, so the editable install needs no unpinned download.
    assert {"setuptools", "wheel", "msgspec", "nats-py", "pytest"} <= set(lock.pins)


# --- the checker catches each kind of disagreement ------------------------------------------


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    pyproject = tmp_path / "pyproject.toml"
    lock = tmp_path / "requirements.lock"
    shutil.copy(REPO / "pyproject.toml", pyproject)
    shutil.copy(REPO / "requirements.lock", lock)
    return pyproject, lock


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _redigest(pyproject: Path, lock: Path) -> None:
    """Record the edited pyproject's digest, so only the disagreement under test remains."""
    current = lockfile.digest(tomllib.loads(pyproject.read_text()))
    text = re.sub(
        r"(?m)^# pyproject-digest: sha256:[0-9a-f]+$", f"# pyproject-digest: sha256:{current}", lock.read_text()
    )
    lock.write_text(text)


def test_a_range_the_pin_does_not_satisfy(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    _edit(pyproject, '"msgspec>=0.22"', '"msgspec>=99"')
    _redigest(pyproject, lock)
    found = lockfile.problems(pyproject, lock)
    assert len(found) == 1 and "does not satisfy msgspec>=99" in found[0], found


def test_a_new_dependency_without_a_pin(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    _edit(pyproject, '"PyYAML>=6.0",', '"PyYAML>=6.0",\n    "left-pad-nowhere>=1",')
    _redigest(pyproject, lock)
    found = lockfile.problems(pyproject, lock)
    assert found == [f"left-pad-nowhere>=1 (dependencies) has no pin in {lock.name}"]


def test_a_new_extra_without_a_pin(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    _edit(
        pyproject,
        "[project.optional-dependencies]\n",
        '[project.optional-dependencies]\ndocs = ["sphinx-nowhere>=7"]\n',
    )
    _redigest(pyproject, lock)
    found = lockfile.problems(pyproject, lock)
    assert found == [f"sphinx-nowhere>=7 (extra 'docs') has no pin in {lock.name}"]


def test_a_dependency_removed_from_pyproject_leaves_a_stale_pin(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    _edit(pyproject, '    "prometheus-client>=0.26",\n', "")
    _redigest(pyproject, lock)
    found = lockfile.problems(pyproject, lock)
    assert len(found) == 1 and found[0].startswith("prometheus-client==") and "stale" in found[0], found


def test_a_pin_nothing_needs_is_stale(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    lock.write_text(lock.read_text() + "orphan-pkg==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via gone-pkg\n")
    found = lockfile.problems(pyproject, lock)
    assert found == ["orphan-pkg==1.0 is stale: nothing in pyproject or the lock needs it"]


def test_any_other_change_to_the_dependency_tables_asks_for_make_lock(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    # Still satisfied by every pin, but the lock was not resolved from it.
    _edit(pyproject, '"msgspec>=0.22"', '"msgspec>=0.21"')
    found = lockfile.problems(pyproject, lock)
    assert len(found) == 1 and "changed since requirements.lock was written" in found[0], found
    assert "make lock" in found[0]
    # Formatting and key order of pyproject do not count.
    assert lockfile.digest({"project": {"dependencies": ["a"], "requires-python": ">=3.11"}}) == lockfile.digest(
        {"project": {"requires-python": ">=3.11", "dependencies": ["a"]}}
    )


def test_a_pin_without_hashes_and_a_missing_lock(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    text = lock.read_text()
    start = text.index("\nsix==")
    end = text.index("\n    # via", start)
    lock.write_text(text[:start] + "\nsix==1.17.0" + text[end:])
    assert lockfile.problems(pyproject, lock) == ["six==1.17.0 has no hashes"]
    lock.unlink()
    assert lockfile.problems(pyproject, lock) == ["requirements.lock is missing: run `make lock`"]


def test_a_pin_marked_away_from_a_supported_python(copies: tuple[Path, Path]) -> None:
    pyproject, lock = copies
    text = lock.read_text()
    line = next(x for x in text.splitlines() if x.startswith("msgspec=="))
    lock.write_text(text.replace(line, line.replace(" \\", " ; python_full_version < '3.13' \\"), 1))
    found = lockfile.problems(pyproject, lock)
    assert found == [
        "msgspec (dependencies) is needed on Python 3.13 but the lock installs it only where "
        "python_full_version < '3.13'"
    ]


# --- make installs from the lock --------------------------------------------------------------


def _make_dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.adapter  # runs a process: dearer than its folder
def test_a_changed_lock_reinstalls_the_venv_from_it() -> None:
    # -W: as if requirements.lock had just changed, whatever the venv's stamp says.
    out = _make_dry_run("-W", "requirements.lock", ".venv/.installed")
    assert "pip install -q --require-hashes -r requirements.lock" in out
    assert "pip install -q --no-deps --no-build-isolation -e ." in out
    assert "rm -rf .venv" in out


@pytest.mark.adapter  # runs a process: dearer than its folder
@pytest.mark.parametrize("target", ["test", "demo"])
def test_test_and_demo_go_through_the_locked_venv(target: str) -> None:
    out = _make_dry_run("-W", "requirements.lock", target)
    assert out.index("--require-hashes -r requirements.lock") < out.index("--no-deps --no-build-isolation -e .")
    assert "install -q -e" not in out  # no unpinned resolution of the project's dependencies
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"(?m)^make test$", ci)
