"""Choosing a port for an engine (checking one is free is :func:`~pool_managerd.adapters.host_facts.port_is_free`)."""

from __future__ import annotations

import socket

__all__ = ["allocate_port"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def allocate_port(host: str = "127.0.0.1") -> int:
    """Return a port the kernel considers free on ``host`` (bind to port 0, then release it).

    Another process may take it before the engine binds; the engine then fails to bind and
    exits, which supervision handles like any early exit.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
