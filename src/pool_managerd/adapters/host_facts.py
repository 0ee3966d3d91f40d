"""Gather the host facts preflight judges: executables, files (with digests), free ports.

This is the I/O half of ``validation.preflight``: it looks, the pure half decides. Hashing is
capped by size because a 100 GiB model takes over a minute to hash and preflight runs on every
preload and restart; a file over the cap gets ``sha256=None`` (preflight then reports
``digest_unverified`` if a digest was required).
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import socket
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from pool_managerd.contract.messages import Problem
from pool_managerd.validation.preflight import ExecutableFact, FileFact, HostFacts

DEFAULT_HASH_CAP = 8 * 1024**3
"""Files larger than this are not hashed (8 GiB: ~5 s at typical NVMe read speeds)."""
_CHUNK = 1024 * 1024


def find_executable(name: str) -> ExecutableFact:
    """Resolve argv[0] like ``execvp`` would, but also report a file that exists and is not
    executable (``shutil.which`` alone would call that missing)."""
    if os.sep in name or (os.altsep and os.altsep in name):
        p = Path(name)
        if not p.exists():
            return ExecutableFact(path=None)
        return ExecutableFact(path=str(p.resolve()), executable=p.is_file() and os.access(p, os.X_OK))
    found = shutil.which(name)
    if found is not None:
        return ExecutableFact(path=str(Path(found).resolve()), executable=True)
    for folder in os.get_exec_path():
        candidate = Path(folder) / name
        if candidate.is_file():
            return ExecutableFact(path=str(candidate.resolve()), executable=False)
    return ExecutableFact(path=None)


_DIGESTS: collections.OrderedDict[tuple[str, int, int, int, int], str] = collections.OrderedDict()
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 64


def sha256_file(path: str | os.PathLike[str], cap: int = DEFAULT_HASH_CAP) -> str | None:
    """Hex SHA-256 of a regular file no larger than ``cap`` bytes; None otherwise.

    Digests are cached by (path, device and inode, size, mtime): a model of several GiB is
    hashed once, not at every preload and restart; any rewrite of the file changes its mtime or
    size and is hashed again."""
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
            return None
        key = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _DIGESTS_LOCK:
            cached = _DIGESTS.get(key)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with _DIGESTS_LOCK:
            _DIGESTS[key] = digest
            while len(_DIGESTS) > _DIGESTS_MAX:
                _DIGESTS.popitem(last=False)
        return digest
    except OSError:
        return None


def file_fact(path: str, *, want_hash: bool = False, hash_cap: int = DEFAULT_HASH_CAP) -> FileFact:
    """Existence, readability, size and (optionally) digest of ``path``."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return FileFact(exists=False)
    except OSError:
        # Exists as far as we can tell (e.g. a directory we may not search), but unusable.
        return FileFact(exists=True, readable=False)
    is_dir = stat.S_ISDIR(st.st_mode)
    readable = os.access(p, os.R_OK | (os.X_OK if is_dir else 0))
    digest = sha256_file(p, hash_cap) if want_hash and readable and not is_dir else None
    return FileFact(exists=True, readable=readable, size=None if is_dir else st.st_size, sha256=digest, is_dir=is_dir)


def port_is_free(host: str, port: int) -> bool:
    """Whether an engine could bind ``host:port`` now (port 0 or out of range: False).

    SO_REUSEADDR matches what HTTP engines set, so a port held only by TIME_WAIT sockets from the
    previous engine counts as free, and one with a live listener does not (on Linux, also a
    listener on the wildcard address). The one such check: preflight and spawning both use it.
    """
    if not 0 < port < 65536:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def gather_host_facts(
    *,
    executables: Iterable[str] = (),
    files: Iterable[str] = (),
    hash_files: Iterable[str] = (),
    ports: Iterable[int] = (),
    host: str = "127.0.0.1",
    hash_cap: int = DEFAULT_HASH_CAP,
    gpu_problem: Problem | None = None,
) -> HostFacts:
    """Look at the host for one preflight.

    ``files`` are checked for existence/readability/size; ``hash_files`` also get a SHA-256 (up
    to ``hash_cap`` bytes). ``ports`` are test-bound on ``host``. ``gpu_problem`` is passed
    through (the ``Problem`` of a ``GpuUnavailable`` when no snapshot could be taken).
    """
    to_hash = set(hash_files)
    file_facts = {
        path: file_fact(path, want_hash=path in to_hash, hash_cap=hash_cap)
        for path in dict.fromkeys([*files, *sorted(to_hash)])
    }
    return HostFacts(
        executables={name: find_executable(name) for name in executables},
        files=file_facts,
        free_ports=frozenset(p for p in ports if port_is_free(host, p)),
        gpu_problem=gpu_problem,
    )
