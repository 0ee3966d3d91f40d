"""JSON logs with the pool id, command id and trace id of whatever is being handled."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

pool_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pool", default=None)
command_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("command_id", default=None)
trace_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``), if well formed."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("pool", pool_var), ("command_id", command_var), ("trace_id", trace_var)):
            value = getattr(record, key, None) or var.get()
            if value:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", *, json_logs: bool = True) -> None:
    """Configure the root logger once for the daemon."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # transitions logs every callback at INFO: far too chatty for a daemon's log.
    logging.getLogger("transitions").setLevel(logging.WARNING)
