"""Choosing a port for an engine (checking one is free is :func:`~pool_managerd.adapters.host_facts.port_is_free`)."""

from __future__ import annotations

import socket
from typing import Final

__all__ = ["PortAllocator", "allocate_port"]

_ATTEMPTS: Final = 64
"""Kernel answers :meth:`PortAllocator.allocate` asks for at most before giving up. Each is a
random free port, so meeting a held one 64 times in a row needs most of the range held."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def allocate_port(host: str = "127.0.0.1") -> int:
    """Return a port the kernel considers free on ``host`` (bind to port 0, then release it).

    Another process may take it before the engine binds; the engine then fails to bind and
    exits, which supervision handles like any early exit. Two calls may return the same port
    (nothing is bound in between): engines use :class:`PortAllocator`.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class PortAllocator:
    """Ports for the engines of one daemon: never one handed out again before it is given back.

    A port the kernel calls free stays unbound until its engine binds it, and a gated engine
    binds only once its spawn record and its ``engine_spawned`` event are durable: milliseconds,
    or seconds in a bulk preload. Asked again meanwhile, the kernel may well answer the same
    port (``bind`` to port 0 starts from a random point of the range each time: 1,000 engines
    started at once met 38 such pairs in one measured run), and the second engine to bind it
    exits with ``EADDRINUSE``. So a port stays held here from :meth:`allocate` until
    :meth:`release` (its engine exited, or never started). Once an engine listens on it, the
    kernel itself no longer offers it. Loop-confined: no lock.
    """

    def __init__(self) -> None:
        self._held: set[tuple[str, int]] = set()

    @property
    def held(self) -> int:
        """How many ports are handed out and not given back."""
        return len(self._held)

    def allocate(self, host: str = "127.0.0.1") -> int:
        """A port free on ``host`` now and not handed out by this allocator since its release.

        Raises :class:`OSError` when the kernel has no free port, or keeps offering held ones.
        """
        for _ in range(_ATTEMPTS):
            port = allocate_port(host)
            if (host, port) not in self._held:
                self._held.add((host, port))
                return port
        raise OSError(f"no free port on {host} that is not already handed to an engine")

    def release(self, host: str, port: int) -> None:
        """Give ``port`` back (its engine is gone or never ran); a port not held costs nothing."""
        self._held.discard((host, port))
