"""A clone of the repository is all the tests and the daemon need: nothing refers to a path outside it.

What counts as leaving the repository: ``Path(__file__)`` climbed past the repository root
(``parents[k]`` and ``.parent`` hops), a ``..`` path segment that names something beyond it
(``"../shared"``), ``os.pardir``, a bare ``".."`` path part, the sibling ``shared`` folder of the
workplace, or an absolute path into it. The checker is shown to catch each form on snippets first.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["src", "tests", "bench", "tools", ".ci", "Makefile", "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".json", ".jsonl", ".md", ".toml", ".txt", ".sh", ".yml", ".yaml", ".cfg", ".csv", ".mmd", ""}

_FILE_HOPS = re.compile(
    r"Path\(\s*__file__\s*\)(?:\.resolve\(\))?(?P<pre>(?:\.parent(?!s))*)(?:\.parents\[(?P<k>\d+)\])?"
    r"(?P<post>(?:\.parent(?!s))*)"
)
_TEXT_PATTERNS = [
    (re.compile(r"\.\.[/\\]+[\w.-]"), "a '..' path segment naming something beyond it"),
    (re.compile(r"\bshared[/\\]+fixtures\b|[\"']shared[\"']"), "the shared folder beside the repository"),
    (re.compile(r"\bos\.pardir\b"), "os.pardir"),
    (re.compile(r"(?<![\w.])/work/"), "an absolute path into the workplace"),
]


def outside_refs(rel: str, text: str) -> list[str]:
    """Every reference in ``text`` (the file at ``rel``, relative to the root) to a path outside the root."""
    found: list[str] = []
    # From a file `depth` parts below the root, `depth` hops up (parents[depth - 1]) is the root itself.
    depth = len(Path(rel).parts)
    for m in _FILE_HOPS.finditer(text):
        hops = m.group("pre").count(".parent") + m.group("post").count(".parent")
        if m.group("k") is not None:
            hops += int(m.group("k")) + 1
        if hops > depth:
            found.append(f"{rel}: {m.group(0)} climbs {hops} levels, past the root {depth} levels up")
    for pattern, what in _TEXT_PATTERNS:
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{rel}:{line}: {what}: {m.group(0)!r}")
    if rel.endswith(".py"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return found
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "..":
                found.append(f"{rel}:{node.lineno}: a '..' path part")
    return found


@pytest.mark.parametrize(
    ("rel", "snippet"),
    [
        ("tests/test_x.py", 'GPU = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"'),
        ("tests/test_x.py", "X = Path(__file__).parents[2]"),
        ("tests/test_x.py", "X = Path(__file__).parent.parent.parent"),
        ("src/pool_managerd/x.py", "X = Path(__file__).resolve().parents[3]"),
        ("tests/x.py", 'open("../shared/fixtures/gpu/h200-x1/nvml.json")'),
        ("tests/x.py", 'X = ROOT / ".." / "elsewhere"'),
        ("tests/x.py", "X = os.path.join(ROOT, os.pardir)"),
        ("tests/x.md", "recorded in /work/shared/fixtures/gpu"),
        ("src/pool_managerd/adapters/gpu_profile_data/h200.json", '{"_comment": "from ..\\\\shared\\\\x"}'),
    ],
)
def test_the_checker_catches_a_path_outside(rel: str, snippet: str) -> None:
    assert outside_refs(rel, snippet)


@pytest.mark.parametrize(
    ("rel", "snippet"),
    [
        ("tests/test_x.py", 'GPU = Path(__file__).resolve().parent / "fixtures" / "gpu"'),
        ("tests/test_x.py", "REPO = Path(__file__).resolve().parents[1]"),
        ("src/pool_managerd/x.py", "ROOT = Path(__file__).parents[2]"),
        ("src/pool_managerd/lifecycle/preload.py", 'm.startswith(("/", "./", "../", "~"))  # ``../`` paths'),
        ("tests/x.py", 'Path("/tmp") / "run"'),
    ],
)
def test_the_checker_lets_paths_inside_pass(rel: str, snippet: str) -> None:
    assert outside_refs(rel, snippet) == []


def _scanned_files() -> list[Path]:
    files: list[Path] = []
    for top in SCANNED:
        path = REPO / top
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [
            p
            for p in candidates
            # node_modules: what `make asyncapi` installs from tools/asyncapi's lock, not the repository's.
            if p.suffix in TEXT_SUFFIXES
            and "__pycache__" not in p.parts
            and "node_modules" not in p.parts
            and p != Path(__file__).resolve()
        ]
    return files


def test_nothing_in_the_repository_refers_outside_it() -> None:
    files = _scanned_files()
    assert len(files) > 50  # the scan saw the tree, not an empty folder
    found = [ref for p in files for ref in outside_refs(p.relative_to(REPO).as_posix(), p.read_text(errors="replace"))]
    assert found == []


def test_the_gpu_recordings_are_inside_the_repository() -> None:
    from support.gpu import GPU_FIXTURES, H200

    assert GPU_FIXTURES.resolve().is_relative_to(REPO)
    for name in ("nvml.json", "nvidia-smi-query.csv", "cuda_visible_devices.json"):
        assert (H200 / name).is_file(), name
