"""The one place that reaches into nats-py and nats micro beyond their public API.

Each function says what the public API lacks. Kept here, in one module, so a client upgrade that
renames a private member breaks one file, and a test of this module, not the daemon."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS
from nats.micro.service import Service


def server_info(nc: NATS) -> Mapping[str, Any]:
    """The connected server's INFO as it sent it.

    nats-py exposes a few INFO fields (``connected_server_version``, ``max_payload``) but not the
    whole message, and whether the server is part of a cluster is only in its ``cluster`` field."""
    info: Mapping[str, Any] = nc._server_info
    return info


def count_endpoint_error(service: Service, endpoint: str, last_error: str) -> None:
    """Count one error in ``endpoint``'s statistics, the ones ``$SRV.STATS`` reports.

    nats micro counts an error only when the handler raises, and then replies with an empty body
    and the exception text. A typed rejection must stay the reply body, so the handler answers
    normally and the error is counted here instead (``last_error`` as nats micro writes it:
    ``code:description``). An unknown endpoint name counts nothing."""
    for ep in service._endpoints:
        if ep._name == endpoint:
            ep._num_errors += 1
            ep._last_error = last_error
            return
