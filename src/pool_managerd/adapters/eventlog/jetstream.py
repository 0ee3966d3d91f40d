"""What the event log relies on of JetStream: error codes, header names, a context from a client."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

__all__ = [
    "ERR_NO_MESSAGE_FOUND",
    "ERR_STREAM_NAME_IN_USE",
    "ERR_WRONG_LAST_SEQUENCE",
    "HDR_EXPECTED_LAST_SUBJECT_SEQ",
    "HDR_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT",
    "HDR_MSG_ID",
    "HDR_TRACEPARENT",
    "as_jetstream",
]

ERR_WRONG_LAST_SEQUENCE = 10071
"""JetStream ``JSStreamWrongLastSequenceErrF``: the expected last (subject) sequence is stale."""
ERR_NO_MESSAGE_FOUND = 10037
"""JetStream ``JSNoMessageFoundErr``: a message get matched nothing."""
ERR_STREAM_NAME_IN_USE = 10058
"""JetStream ``JSStreamNameExistErr``: add with a config that differs from the existing one."""

HDR_MSG_ID = "Nats-Msg-Id"
HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
HDR_TRACEPARENT = "traceparent"


def as_jetstream(js_or_nc: JetStreamContext | NATS) -> JetStreamContext:
    """A JetStream context of ``js_or_nc`` (itself when it is one already)."""
    return js_or_nc.jetstream() if isinstance(js_or_nc, NATS) else js_or_nc
