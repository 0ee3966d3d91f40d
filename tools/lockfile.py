"""``requirements.lock``: write it from ``pyproject.toml`` with a pinned uv, and check that the two agree.

The lock pins every runtime dependency, every extra (``dev``, ``gpu``, ``embedded``) and the build
backend (``[build-system] requires``), with hashes, in pip's requirements format, resolved once for
every Python from ``requires-python`` up (``uv pip compile --universal``). ``make`` installs from it
with ``pip install --require-hashes``, then the project itself with ``--no-deps --no-build-isolation``.

Its header records a digest of the dependency tables of ``pyproject.toml`` it was resolved from, so
a changed range, an added dependency or a new extra makes :func:`problems` (and
``tests/unit/test_lockfile.py``) fail until ``make lock`` runs again.

Usage::

    python tools/lockfile.py write --uv PATH [--upgrade]   # what `make lock` runs
    python tools/lockfile.py check                         # exit 1 naming each disagreement
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "requirements.lock"

# The lowest Python the lock is resolved for; universal resolution covers every later one too.
LOCK_PYTHON = "3.11"
# The interpreters the project is proven on (`make test-pythons`); a pyproject requirement must be
# installed by the lock on each of them.
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")
PROJECT = "pool-managerd"
# uv annotates requirements read from pyproject.toml so; the build backend comes from stdin and
# carries no annotation.
PROJECT_ORIGIN = f"{PROJECT} (pyproject.toml)"
DIGEST_PREFIX = "# pyproject-digest: sha256:"


@dataclass
class Pin:
    """One package of the lock: its exact version, the environments it applies to, its hashes."""

    name: str
    version: str
    marker: str | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


@dataclass
class Lock:
    """A parsed lock file: the recorded pyproject digest and the pins by canonical name."""

    digest: str | None
    pins: dict[str, Pin]


def dependency_tables(pyproject: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``pyproject.toml`` the lock is resolved from."""
    project = pyproject.get("project", {})
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": list(project.get("dependencies", [])),
        "optional-dependencies": {k: list(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
        "build-system.requires": list(pyproject.get("build-system", {}).get("requires", [])),
    }


def digest(pyproject: dict[str, Any]) -> str:
    """sha256 of the dependency tables in canonical JSON (key order and TOML layout don't matter)."""
    blob = json.dumps(dependency_tables(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]+))?\\?\s*$")


def parse_lock(text: str) -> Lock:
    """Parse the requirements-format lock uv writes (``name==version ; marker \\`` then hashes and ``# via``)."""
    recorded: str | None = None
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if raw.startswith(DIGEST_PREFIX):
            recorded = raw[len(DIGEST_PREFIX) :].strip()
            continue
        if not line:
            continue
        if not raw[0].isspace() and not line.startswith("#"):
            m = _PIN.match(line)
            if m is None:
                raise ValueError(f"lock line is not a pin (name==version): {line!r}")
            marker = m.group("marker")
            current = Pin(canonicalize_name(m.group("name")), m.group("version"), marker.strip() if marker else None)
            if current.name in pins:
                raise ValueError(f"{current.name} is pinned twice")
            pins[current.name] = current
            in_via = False
            continue
        if current is None:
            continue
        if line.startswith("--hash="):
            current.hashes.append(line.removeprefix("--hash=").rstrip("\\").strip())
        elif line == "# via":
            in_via = True
        elif line.startswith("# via "):
            current.via.append(line.removeprefix("# via ").strip())
        elif in_via and line.startswith("#   "):
            current.via.append(line.removeprefix("#   ").strip())
    return Lock(recorded, pins)


def _environments() -> list[dict[str, str]]:
    return [
        {
            "python_version": v,
            "python_full_version": f"{v}.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "platform_machine": "x86_64",
            "extra": "",
        }
        for v in SUPPORTED_PYTHONS
    ]


def _requirements(pyproject: dict[str, Any]) -> list[tuple[str, Requirement]]:
    tables = dependency_tables(pyproject)
    reqs = [("dependencies", Requirement(r)) for r in tables["dependencies"]]
    for extra, items in tables["optional-dependencies"].items():
        reqs += [(f"extra {extra!r}", Requirement(r)) for r in items]
    reqs += [("build-system.requires", Requirement(r)) for r in tables["build-system.requires"]]
    return reqs


def problems(pyproject_path: Path = PYPROJECT, lock_path: Path = LOCK) -> list[str]:
    """Every way the lock disagrees with ``pyproject.toml``; empty when they agree.

    * each dependency, extra and build requirement has a pin satisfying its specifier, installed on
      every supported Python where the requirement applies;
    * every pin has hashes and comes from somewhere: pyproject (still named there), the build
      backend, or another pin;
    * the recorded digest of pyproject's dependency tables is the current one.
    """
    if not lock_path.is_file():
        return [f"{lock_path.name} is missing: run `make lock`"]
    pyproject = tomllib.loads(pyproject_path.read_text(encoding="utf-8"))
    try:
        lock = parse_lock(lock_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"{lock_path.name} is unreadable: {exc}"]
    found: list[str] = []
    reqs = _requirements(pyproject)
    envs = _environments()
    for where, req in reqs:
        name = canonicalize_name(req.name)
        pin = lock.pins.get(name)
        if pin is None:
            found.append(f"{req} ({where}) has no pin in {lock_path.name}")
            continue
        if not req.specifier.contains(Version(pin.version), prereleases=True):
            found.append(f"{name}=={pin.version} in {lock_path.name} does not satisfy {req} ({where})")
        if pin.marker is not None:
            lock_marker = Marker(pin.marker)
            for env in envs:
                if (req.marker is None or req.marker.evaluate(env)) and not lock_marker.evaluate(env):
                    found.append(
                        f"{name} ({where}) is needed on Python {env['python_version']} "
                        f"but the lock installs it only where {pin.marker}"
                    )
    named = {canonicalize_name(req.name) for where, req in reqs if where != "build-system.requires"}
    build = {canonicalize_name(req.name) for where, req in reqs if where == "build-system.requires"}
    for pin in sorted(lock.pins.values(), key=lambda p: p.name):
        if not pin.hashes:
            found.append(f"{pin.name}=={pin.version} has no hashes")
        from_pyproject = PROJECT_ORIGIN in pin.via
        if from_pyproject and pin.name not in named:
            found.append(f"{pin.name}=={pin.version} is stale: the lock says pyproject needs it; pyproject does not")
        needed = (
            (from_pyproject and pin.name in named)
            or (not pin.via and pin.name in build)
            or any(canonicalize_name(v) in lock.pins for v in pin.via if v != PROJECT_ORIGIN)
        )
        if not needed and not from_pyproject:
            found.append(f"{pin.name}=={pin.version} is stale: nothing in pyproject or the lock needs it")
    current = digest(pyproject)
    if lock.digest is None:
        found.append(f"{lock_path.name} records no pyproject digest: run `make lock`")
    elif lock.digest != current:
        found.append(
            f"pyproject.toml's dependency tables changed since {lock_path.name} was written "
            f"(digest {lock.digest[:12]}, now {current[:12]}): run `make lock`"
        )
    return found


def _header(pyproject: dict[str, Any], uv_version: str) -> str:
    return (
        "# requirements.lock: every runtime, extra, dev and build dependency of pool-managerd, pinned with\n"
        "# hashes, for every Python the project supports. Generated: edit pyproject.toml, then run `make lock`;\n"
        "# tests/unit/test_lockfile.py fails when the two disagree.\n"
        f"# resolver: {uv_version}, `uv pip compile --universal --python-version {LOCK_PYTHON} --all-extras "
        "--generate-hashes`\n"
        f"{DIGEST_PREFIX}{digest(pyproject)}\n"
    )


def write(uv: str, *, upgrade: bool = False, pyproject_path: Path = PYPROJECT, lock_path: Path = LOCK) -> None:
    """Resolve the lock with ``uv`` and replace ``lock_path`` atomically.

    Pins already in the lock are kept where they still satisfy pyproject (uv reads the output file
    as preferences); ``upgrade`` resolves everything to the newest allowed versions instead.
    """
    pyproject = tomllib.loads(pyproject_path.read_text(encoding="utf-8"))
    build_requires = "".join(f"{r}\n" for r in dependency_tables(pyproject)["build-system.requires"])
    # "uv 0.13.9 (x86_64-unknown-linux-gnu)": keep name and version, so the header is the same on every host.
    version = subprocess.run([uv, "--version"], capture_output=True, text=True, check=True).stdout
    uv_version = " ".join(version.split()[:2])
    with tempfile.TemporaryDirectory(prefix="lock-") as tmp:
        out = Path(tmp) / "requirements.lock"
        if lock_path.is_file():
            out.write_bytes(lock_path.read_bytes())
        cmd = [
            uv, "pip", "compile", "--quiet", "--no-config",
            pyproject_path.name, "-",  # the build backend's requirements come on stdin
            "--all-extras", "--universal", "--python-version", LOCK_PYTHON, "--generate-hashes",
            "--custom-compile-command", "make lock", "--output-file", str(out),
        ]  # fmt: skip
        if upgrade:
            cmd.append("--upgrade")
        subprocess.run(cmd, input=build_requires, text=True, check=True, cwd=pyproject_path.parent)
        body = out.read_text(encoding="utf-8")
        staged = lock_path.with_name(lock_path.name + ".tmp")
        staged.write_text(_header(pyproject, uv_version) + body, encoding="utf-8")
        os.replace(staged, lock_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockfile.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="regenerate requirements.lock")
    w.add_argument("--uv", required=True, help="the pinned uv binary to resolve with")
    w.add_argument("--upgrade", action="store_true", help="move every pin to the newest allowed version")
    sub.add_parser("check", help="exit 1 when requirements.lock and pyproject.toml disagree")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        write(args.uv, upgrade=args.upgrade)
    found = problems()
    for p in found:
        print(f"lock: {p}", file=sys.stderr)
    if args.cmd == "write" and not found:
        print(f"wrote {LOCK.name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
